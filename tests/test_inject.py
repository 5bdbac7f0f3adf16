"""Injection: presets per family, exact-suffix matching, σ schedule, trainable set, GC parity."""

import pytest
import torch
import transformers as tf

from pace_llm import LoraArgs, NoisyLoRALinear, PaceArgs, UserError, inject_noisy_lora
from pace_llm.inject import block_relative, trainable_parameters
from pace_llm.lora import lora_layers, shared_views
from conftest import SMALL, noisy_llama, tiny_llama

DEC = dict(SMALL, num_hidden_layers=3)
ENC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
           vocab_size=128)

FAMILIES = [
    ("llama", lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**DEC)), 7),
    ("mistral", lambda: tf.MistralForCausalLM(tf.MistralConfig(**DEC)), 7),
    ("qwen2", lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**DEC)), 7),
    ("qwen3", lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**DEC, head_dim=16)), 7),
    ("gemma", lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**DEC, head_dim=16)), 7),
    ("phi3", lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**DEC, pad_token_id=0)), 4),
    ("bert", lambda: tf.BertForSequenceClassification(tf.BertConfig(**ENC)), 6),
    ("roberta", lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**ENC)), 6),
]


@pytest.mark.parametrize("family,build,per_block", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_presets_replace_expected_modules(family, build, per_block):
    torch.manual_seed(0)
    model = build()
    head = "lm_head" if hasattr(model, "lm_head") else "classifier"
    head_before = {k: v.clone() for k, v in model.get_submodule(head).state_dict().items()}
    replaced = inject_noisy_lora(model, LoraArgs(r=4, alpha=8), PaceArgs(mode="full", sigma=1.5))
    assert len(replaced) == 3 * per_block
    layers = dict(lora_layers(model))
    assert sorted(layers) == sorted(replaced)
    L = 3
    for name, layer in layers.items():
        block, _ = block_relative(name)
        assert layer.sigma == pytest.approx(1.5 * (L - block) / L)
    # heads and embeddings are never patched and stay frozen
    assert not any(isinstance(m, NoisyLoRALinear) for m in model.get_submodule(head).modules())
    for k, v in model.get_submodule(head).state_dict().items():
        assert torch.equal(v, head_before[k])
    assert all(not p.requires_grad for p in model.get_submodule(head).parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.lora_{ab}" for n in replaced for ab in "AB"}
    assert trainable == expected


def test_bert_mlp_preset_does_not_touch_attention_output():
    model = tf.BertForSequenceClassification(tf.BertConfig(**ENC))
    replaced = inject_noisy_lora(model, LoraArgs(targets="mlp"), PaceArgs())
    rel = sorted({block_relative(n)[1] for n in replaced})
    assert rel == ["intermediate.dense", "output.dense"]


def test_explicit_suffixes_and_attn_preset(llama):
    replaced = inject_noisy_lora(llama, LoraArgs(targets=["q_proj", "mlp.down_proj"]), PaceArgs())
    assert [block_relative(n)[1] for n in replaced] == ["self_attn.q_proj", "mlp.down_proj"] * 2
    model = tiny_llama()
    assert len(inject_noisy_lora(model, LoraArgs(targets="attn"), PaceArgs())) == 8
    model = tiny_llama()
    assert len(inject_noisy_lora(model, LoraArgs(targets="all-linear"), PaceArgs())) == 14


def test_unmatched_target_lists_linear_suffixes(llama):
    with pytest.raises(UserError) as exc:
        inject_noisy_lora(llama, LoraArgs(targets=["q_proj", "qkv"]), PaceArgs())
    msg = str(exc.value)
    assert "qkv matched no linear layer" in msg
    assert "self_attn.q_proj" in msg and "mlp.gate_proj" in msg


def test_sigma_schedules(llama):
    model = tiny_llama(num_hidden_layers=4)
    inject_noisy_lora(model, LoraArgs(), PaceArgs(sigma=2.0, sigma_schedule="constant",
                                                  skip_first_blocks=1))
    got = sorted({(block_relative(n)[0], m.sigma) for n, m in lora_layers(model)})
    assert got == [(0, 0.0), (1, 2.0), (2, 2.0), (3, 2.0)]
    model = tiny_llama(num_hidden_layers=4)
    inject_noisy_lora(model, LoraArgs(), PaceArgs(sigma=2.0))
    got = sorted({(block_relative(n)[0], m.sigma) for n, m in lora_layers(model)})
    assert got == [(0, 2.0), (1, 1.5), (2, 1.0), (3, 0.5)]
    model = tiny_llama()
    inject_noisy_lora(model, LoraArgs(), PaceArgs(mode="off", sigma=2.0))
    assert all(m.sigma == 0.0 for _, m in lora_layers(model))


def test_every_adapter_gets_gradient_after_one_step(llama):
    inject_noisy_lora(llama, LoraArgs(r=4), PaceArgs(sigma=0.5))
    llama.train()
    params = trainable_parameters(llama)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 128, (2, 16))
    for _ in range(2):
        opt.zero_grad()
        llama(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for name, layer in lora_layers(llama):
        assert layer.lora_A.grad.abs().sum() > 0, name
        assert layer.lora_B.grad.abs().sum() > 0, name


def _one_step_grads(checkpointing: bool):
    model, calls = noisy_llama(checkpointing)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    with shared_views(model, 2):
        loss = model(input_ids=torch.cat([ids, ids]), labels=torch.cat([ids, ids])).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, len(calls)


def test_gradient_checkpointing_reproduces_noise():
    loss_a, grads_a, calls_a = _one_step_grads(False)
    loss_b, grads_b, calls_b = _one_step_grads(True)
    assert calls_b == 2 * calls_a  # the recompute really ran
    assert loss_a == loss_b
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
