"""QLoRA (pace_llm.quant): 4-bit/8-bit loading, PACE training on a 4-bit base, dequantization,
the ZeRO-3 rules, and the refusals. CPU, fp32 compute, a tiny Llama with hidden 128.

The 2-process ZeRO-2 vs ZeRO-3 QLoRA loss-equality test belongs with the engine
(pace_llm/engine.py); here a 1-rank run checks that ZeRO-3 partitions the 4-bit base.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from pace_llm import quant as Q
from pace_llm.config import load_recipe
from pace_llm.errors import RecipeError, UserError
from pace_llm.inject import inject_noisy_lora, trainable_parameters
from pace_llm.lora import NoisyLoRALinear, shared_views
from pace_llm.schema import LoraArgs, PaceArgs, QuantArgs
from conftest import tiny_llama

QLLAMA = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False}
VOCAB = QLLAMA["vocab_size"]
TARGETS = 14  # 2 blocks x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("qbase")
    tiny_llama(seed=0, **QLLAMA).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def fp32_base(base_dir) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def load4(base_dir, zero_stage: int = 0, **quant) -> LlamaForCausalLM:
    return Q.load_quantized(LlamaForCausalLM, str(base_dir), QuantArgs(bits=4, **quant),
                            torch.float32, zero_stage)


def batch(seed: int = 0, rows: int = 4, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state entry except the adapters: packed 4-bit bytes, quant states, norms, head."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.endswith(("lora_A", "lora_B"))}


# --------------------------------------------------------------------------------------------
# bnb_config
# --------------------------------------------------------------------------------------------

def test_bnb_config_fields():
    c = Q.bnb_config(QuantArgs(bits=4), torch.bfloat16, zero_stage=2)
    assert (c.load_in_4bit, c.bnb_4bit_quant_type, c.bnb_4bit_use_double_quant) == (
        True, "nf4", True)
    assert c.bnb_4bit_compute_dtype == torch.bfloat16
    assert c.bnb_4bit_quant_storage == torch.uint8
    assert {"lm_head", "score", "classifier"} <= set(c.llm_int8_skip_modules)
    # ZeRO-3: packed weights stored in the training dtype, even with another compute dtype
    c3 = Q.bnb_config(QuantArgs(bits=4, type="fp4", double_quant=False, compute_dtype="float32"),
                      torch.bfloat16, zero_stage=3)
    assert (c3.bnb_4bit_quant_type, c3.bnb_4bit_use_double_quant) == ("fp4", False)
    assert (c3.bnb_4bit_compute_dtype, c3.bnb_4bit_quant_storage) == (torch.float32, torch.bfloat16)
    assert Q.bnb_config(QuantArgs(bits=4, storage_dtype="float16"), torch.float16,
                        3).bnb_4bit_quant_storage == torch.float16
    c8 = Q.bnb_config(QuantArgs(bits=8), torch.bfloat16, zero_stage=2)
    assert c8.load_in_8bit and not c8.load_in_4bit and "lm_head" in c8.llm_int8_skip_modules
    assert Q.bnb_config(QuantArgs(bits="none"), torch.bfloat16, zero_stage=3) is None


# --------------------------------------------------------------------------------------------
# Loading and NF4 error
# --------------------------------------------------------------------------------------------

def test_load_4bit_layout_and_nf4_error(base_dir, fp32_base):
    q = load4(base_dir).eval()
    linears = {n: m for n, m in q.named_modules() if Q.is_quantized_linear(m)}
    assert len(linears) == TARGETS
    for m in linears.values():
        assert isinstance(m, bnb.nn.Linear4bit)
        assert m.weight.dtype == torch.uint8
        assert m.weight.numel() == m.in_features * m.out_features // 2  # two codes per byte
        assert m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested
    assert type(q.lm_head) is nn.Linear and q.lm_head.weight.dtype == torch.float32
    assert q.model.norm.weight.dtype == torch.float32
    assert torch.equal(q.lm_head.weight, fp32_base.lm_head.weight)

    # weight error mean|W_q - W| / mean|W|: NF4 on N(0, 0.02) init measures 0.091
    ref = fp32_base.get_submodule("model.layers.0.mlp.down_proj").weight
    w_err = ((Q.dequantize_weight(linears["model.layers.0.mlp.down_proj"]) - ref).abs().mean()
             / ref.abs().mean()).item()
    assert 0.06 < w_err < 0.12
    # logits ||q - fp32|| / ||fp32|| measures 0.163 on this random tiny model
    x = batch()
    with torch.no_grad():
        err = rel_err(q(x).logits, fp32_base(x).logits)
    assert 0.1 < err < 0.25


def test_dequantize_linear_matches_bnb(base_dir):
    q = load4(base_dir)
    layer = q.get_submodule("model.layers.1.self_attn.o_proj")
    ref = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    lin = Q.dequantize_linear(layer, torch.float32)
    assert type(lin) is nn.Linear and lin.weight.dtype == torch.float32
    assert torch.equal(lin.weight, ref.float())
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-6)
    assert Q.dequantize_linear(layer, torch.bfloat16).weight.dtype == torch.bfloat16

    # bitsandbytes' CPU bf16-kernel layout (what a no-grad eval forward on an AVX512-BF16 CPU
    # would produce) dequantizes back to the same weight, up to its bf16-rounded scales
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    packed = copy.deepcopy(layer)
    packed.weight.data, packed.weight.quant_state = _convert_weight_packed_for_cpu(
        packed.weight.data, packed.weight.quant_state)
    assert packed.weight.quant_state.packing_format_for_cpu
    assert rel_err(Q.dequantize_weight(packed), ref.float()) < 5e-3


def test_8bit_dequantize_and_wrap(base_dir, fp32_base):
    q = Q.load_quantized(LlamaForCausalLM, str(base_dir), QuantArgs(bits=8), torch.float32, 2)
    layer = q.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
    lin = Q.dequantize_linear(layer)
    expect = layer.weight.data.float() * layer.weight.SCB.float()[:, None] / 127
    torch.testing.assert_close(lin.weight, expect, rtol=1e-6, atol=1e-7)
    ref = fp32_base.get_submodule("model.layers.0.mlp.up_proj").weight
    # int8 row-wise absmax: mean relative weight error measures 0.0068
    assert ((lin.weight - ref).abs().mean() / ref.abs().mean()).item() < 0.015

    # wrapped like nn.Linear: fp32 adapter, gradients reach A and B, the int8 base is untouched
    wrap = NoisyLoRALinear(layer, r=4, alpha=8.0, dropout=0.1, sigma=0.5).train()
    cb = layer.weight.data.clone()
    assert wrap.lora_A.dtype == torch.float32 and not layer.weight.requires_grad
    with torch.no_grad():
        wrap.lora_B.fill_(0.01)
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
    with shared_views(wrap, 2):
        wrap(torch.cat([x, x])).pow(2).mean().backward()
    assert wrap.lora_A.grad.abs().sum() > 0 and wrap.lora_B.grad.abs().sum() > 0
    assert torch.equal(layer.weight.data, cb)


# --------------------------------------------------------------------------------------------
# NoisyLoRALinear on a 4-bit base
# --------------------------------------------------------------------------------------------

def test_noisy_lora_wraps_4bit_like_linear(base_dir):
    """Same A, B, seed: the wrapper of Linear4bit and of its dequantized nn.Linear agree with
    noise, LoRA dropout and the doubled batch; the adapter is fp32 (the compute dtype)."""
    q = load4(base_dir)
    l4 = q.get_submodule("model.layers.0.self_attn.v_proj")
    wrap4 = NoisyLoRALinear(l4, r=4, alpha=8.0, dropout=0.3, sigma=1.0)
    wrapd = NoisyLoRALinear(Q.dequantize_linear(l4), r=4, alpha=8.0, dropout=0.3, sigma=1.0)
    assert wrap4.lora_A.dtype == torch.float32 and wrap4.lora_A.device == wrapd.lora_A.device
    with torch.no_grad():
        wrap4.lora_B.normal_(generator=torch.Generator().manual_seed(3))
        wrapd.lora_A.copy_(wrap4.lora_A)
        wrapd.lora_B.copy_(wrap4.lora_B)
    x = torch.randn(3, 7, l4.in_features, generator=torch.Generator().manual_seed(4))
    xx = torch.cat([x, x])
    outs = []
    for layer in (wrap4, wrapd):
        layer.train()
        torch.manual_seed(11)
        with shared_views(layer, 2):
            outs.append(layer(xx))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    # views share the dropout mask: with σ = 0 the two halves are identical
    wrap4.sigma = 0.0
    with shared_views(wrap4, 2):
        a, b = wrap4(xx).chunk(2)
    assert torch.equal(a, b)
    # and differ (only) by z when σ > 0
    a, b = outs[0].chunk(2)
    assert (a - b).abs().max().item() > 1e-3


@pytest.mark.parametrize("mode", ["full", "off"])
def test_qlora_trains_only_adapters(base_dir, mode):
    lam = 0.05
    q = load4(base_dir)
    torch.manual_seed(0)
    replaced = inject_noisy_lora(q, LoraArgs(r=8, alpha=16, targets="attn+mlp"),
                                 PaceArgs(mode=mode, sigma=1.0, consistency_weight=lam))
    assert len(replaced) == TARGETS
    params = trainable_parameters(q)
    assert len(params) == 2 * TARGETS and all(p.dtype == torch.float32 for p in params)
    frozen, start = frozen_state(q), [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = batch(rows=4)
    q.train()
    losses, cons = [], []
    for _ in range(6):
        if mode == "full":  # one forward on [x, x]; CE on view 1 + λ·mean squared logit gap
            with shared_views(q, 2):
                logits = q(torch.cat([x, x])).logits
            v1, v2 = logits.chunk(2)
            c = (v1 - v2).pow(2).sum(-1).mean()
        else:
            v1, c = q(x).logits, torch.zeros(())
        ce = F.cross_entropy(v1[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss = ce + lam * c
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(ce.item())
        cons.append(c.item())
    # measured CE: full 5.569 -> 4.968, off 5.569 -> 4.628 (consistency 0 -> 4.70 in full)
    assert losses[0] == pytest.approx(5.569, abs=0.01)
    assert losses[-1] < losses[0] - 0.3
    if mode == "full":
        assert cons[0] == 0.0 and cons[-1] > 0.1  # B = 0 at init, then z makes the views differ
    after = frozen_state(q)
    assert after.keys() == frozen.keys()
    assert all(torch.equal(after[k], frozen[k]) for k in frozen)  # packed bytes identical
    assert all(not torch.equal(p, s) for p, s in zip(params, start))
    assert {n.rsplit(".", 1)[-1] for n, p in q.named_parameters() if p.requires_grad} == {
        "lora_A", "lora_B"}


def test_adapter_on_dequantized_base(base_dir, fp32_base):
    """A QLoRA adapter gives the same logits on the dequantized base as on the 4-bit base, and
    stays within the NF4 error of the same adapter on the original fp32 base."""
    q = load4(base_dir)
    torch.manual_seed(0)
    inject_noisy_lora(q, LoraArgs(r=8, alpha=16), PaceArgs(mode="off"))
    opt = torch.optim.AdamW(trainable_parameters(q), lr=1e-2)
    x = batch(rows=2)
    q.train()
    for _ in range(3):
        loss = F.cross_entropy(q(x).logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.eval()
    y = batch(seed=5, rows=2)
    with torch.no_grad():
        logits4 = q(y).logits
        replaced = Q.dequantize_model(q, torch.float32)
        logits_dq = q(y).logits
    assert len(replaced) == TARGETS and not getattr(q, "is_loaded_in_4bit", False)
    assert not any(Q.is_quantized_linear(m) for m in q.modules())
    assert rel_err(logits_dq, logits4) < 1e-5

    full = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    inject_noisy_lora(full, LoraArgs(r=8, alpha=16), PaceArgs(mode="off"))
    full.load_state_dict({k: v for k, v in q.state_dict().items() if "lora_" in k}, strict=False)
    with torch.no_grad():
        err = rel_err(logits4, full(y).logits)
    assert 0.1 < err < 0.25  # measures 0.154: the NF4 error of the base alone (0.163)


# --------------------------------------------------------------------------------------------
# ZeRO-3: deepspeed.initialize partitions the 4-bit base (1 rank, gloo, CPU)
# --------------------------------------------------------------------------------------------

ZERO3_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch, deepspeed
    from transformers import LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from pace_llm.inject import trainable_parameters, inject_noisy_lora
    from pace_llm.distributed import init_distributed
    from pace_llm.quant import load_quantized
    from pace_llm.schema import LoraArgs, PaceArgs, QuantArgs
    base = sys.argv[1]
    init_distributed()  # gloo, and no JIT build of DeepSpeed's shm comm op
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for stage in (2, 3):
        ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "steps_per_print": 10**9}
        keep = HfDeepSpeedConfig(ds) if stage == 3 else None
        model = load_quantized(LlamaForCausalLM, base, QuantArgs(bits=4), torch.float32, stage)
        torch.manual_seed(1)
        inject_noisy_lora(model, LoraArgs(r=8), PaceArgs(mode="off"))
        w = model.model.layers[0].self_attn.q_proj.base.weight
        storage = str(w.dtype)
        eng, *_ = deepspeed.initialize(model=model, model_parameters=trainable_parameters(model),
                                       config=ds)
        losses = []
        for _ in range(3):
            loss = eng(input_ids=x, labels=x).loss
            eng.backward(loss)
            eng.step()
            losses.append(loss.item())
        out[stage] = dict(losses=losses, storage=storage, local=list(w.shape),
                          full=list(getattr(w, "ds_shape", w.shape)))
        del keep
    print("RESULT " + json.dumps(out))
""")


def test_zero3_partitions_4bit_base(base_dir, tmp_path):
    script = tmp_path / "z3.py"
    script.write_text(ZERO3_SCRIPT)
    with socket.socket() as sock:  # a free port: other test runs may share the machine
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, str(script), str(base_dir)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    z2, z3 = out["2"], out["3"]
    assert z2["storage"] == "torch.uint8" and z3["storage"] == "torch.float32"  # auto storage
    assert z3["local"] == [0] and z3["full"] == [128 * 128 // 8, 1]  # partitioned away
    assert z2["local"] == [128 * 128 // 2, 1]
    assert z3["losses"] == pytest.approx(z2["losses"], rel=1e-5)
    assert z3["losses"][-1] < z3["losses"][0]


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

def write_recipe(tmp_path: Path, base: Path | str, **quant) -> str:
    body = {"model": {"name_or_path": str(base)}, "quant": quant,
            "train": {"output_dir": str(tmp_path / "run")}}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return str(path)


def test_bits_3_is_a_recipe_error(tmp_path, base_dir):
    with pytest.raises(RecipeError) as e:
        load_recipe(["--recipe", write_recipe(tmp_path, base_dir, bits=3)])
    assert "quant.bits: 3 is not allowed; expected one of 'none', 4, 8" in str(e.value)


def test_8bit_zero3_refused(tmp_path, base_dir):
    recipe = load_recipe(["--recipe", write_recipe(tmp_path, base_dir, bits=8)])
    assert Q.quant_problems(recipe, zero_stage=2) == []
    (msg,) = Q.quant_problems(recipe, zero_stage=3)
    assert msg.startswith("quant.bits: 8 is not supported with ZeRO-3") and "quant.bits: 4" in msg
    with pytest.raises(UserError, match="quant.bits: 8 is not supported with ZeRO-3"):
        Q.load_quantized(LlamaForCausalLM, str(base_dir), QuantArgs(bits=8), torch.float32, 3)


def test_missing_bitsandbytes(tmp_path, base_dir, monkeypatch):
    monkeypatch.setattr(Q, "bnb_available", lambda: False)
    recipe = load_recipe(["--recipe", write_recipe(tmp_path, base_dir, bits=4)])
    (msg,) = Q.quant_problems(recipe, zero_stage=2)
    assert msg == ("quant.bits: 4 needs bitsandbytes, which is not installed; install it with: "
                   "pip install 'pace-llm[quant]'")
    with pytest.raises(UserError, match=r"pip install 'pace-llm\[quant\]'"):
        load4(base_dir)
    recipe.quant.bits = "none"
    assert Q.quant_problems(recipe, zero_stage=3) == []


def test_storage_dtype_rules(tmp_path, base_dir):
    recipe = load_recipe(["--recipe", write_recipe(tmp_path, base_dir, bits=4,
                                                   storage_dtype="uint8")])
    assert Q.quant_problems(recipe, 2) == Q.quant_problems(recipe, 3) == []
    recipe.quant.storage_dtype, recipe.train.precision = "float32", "bf16"
    (msg,) = Q.quant_problems(recipe, 2)
    assert "differs from the training precision (torch.bfloat16)" in msg
    recipe.train.precision = "fp32"
    assert Q.quant_problems(recipe, 3) == []


def test_prequantized_gptq(tmp_path, base_dir):
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    config = json.loads((base_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (gptq / "config.json").write_text(json.dumps(config))
    assert Q.prequantized_method(config) == "gptq"
    assert Q.prequantized_method({"model_type": "llama"}) is None
    assert Q.prequantized_method(None) is None
    assert Q.prequantized_method(tiny_llama(**QLLAMA).config) is None

    recipe = load_recipe(["--recipe", write_recipe(tmp_path, gptq, bits="none")])
    assert Q.quant_problems(recipe, 2) == []
    (msg,) = Q.quant_problems(recipe, 3)
    assert msg.startswith(f"model {gptq} is pre-quantized with GPTQ: DeepSpeed ZeRO-3 cannot")
    recipe.quant.bits = 4
    (msg,) = Q.quant_problems(recipe, 2)
    assert "already quantized with GPTQ; set quant.bits: none" in msg


@pytest.mark.parametrize(("name", "stage", "storage"), [("gsm8k_qlora", 2, torch.uint8),
                                                        ("gsm8k_qlora_zero3", 3, torch.bfloat16)])
def test_shipped_qlora_recipes(monkeypatch, name, stage, storage):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    path = f"recipes/{name}.yaml"
    assert (repo / path).read_text().splitlines()[0] == (
        f"# deepspeed pace_llm/train.py --recipe {path}")
    recipe = load_recipe(["--recipe", path])
    assert (recipe.model.name_or_path, recipe.data.task, recipe.data.path) == (
        "microsoft/Phi-3-mini-4k-instruct", "gsm8k", "openai/gsm8k")
    assert (recipe.lora.r, recipe.lora.targets, recipe.pace.mode, recipe.train.precision) == (
        16, "attn+mlp", "full", "bf16")
    ds = json.loads((repo / recipe.deepspeed).read_text())
    assert ds["zero_optimization"]["stage"] == stage
    assert Q.quant_problems(recipe, stage) == []
    c = Q.bnb_config(recipe.quant, torch.bfloat16, stage)
    assert (c.bnb_4bit_quant_type, c.bnb_4bit_use_double_quant) == ("nf4", True)
    assert (c.bnb_4bit_compute_dtype, c.bnb_4bit_quant_storage) == (torch.bfloat16, storage)
