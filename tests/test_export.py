"""Export: PEFT (the peer) loads our adapter and reproduces our logits; the merged model
reproduces base+adapter; atomic, refusing writes; the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL, tiny_llama
from safetensors.torch import load_file
from torch import nn

import pace_llm.quant
from pace_llm.errors import UserError
from pace_llm.export import export_adapter, main
from pace_llm.inject import inject_noisy_lora
from pace_llm.lora import NoisyLoRALinear, adapters_disabled, lora_layers
from pace_llm.merge import merge_and_save
from pace_llm.peft_format import peft_targets
from pace_llm.schema import LoraArgs, ModelArgs, PaceArgs, Recipe, TrainArgs, dump_recipe

IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 64, 11], [8, 2, 31, 77, 120, 6, 1, 9]])
FILES = ["adapter_config.json", "adapter_model.safetensors", "pace_config.json"]


def trained(model, targets="attn+mlp", r=4, rslora=False, head=None, seed=1):
    """Inject adapters; give every lora_B (and the head) random values, as training would."""
    inject_noisy_lora(model, LoraArgs(r=r, alpha=8, targets=targets, rslora=rslora),
                      PaceArgs(mode="full", sigma=0.5), trainable_head=head)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
        for name in head or []:
            for p in model.get_submodule(name).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


def peft_logits(base, adapter_dir, **kw):
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(base, str(adapter_dir)).eval(), **kw)


def tiny_seqcls_llama(seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(LlamaConfig(**SMALL, num_labels=3, pad_token_id=0)).eval()


def tiny_roberta(seed=0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, vocab_size=128, max_position_embeddings=64,
                        num_labels=2, pad_token_id=1)
    return RobertaForSequenceClassification(cfg).eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(124)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


# --------------------------------------------------------------------------------------------
# PEFT parity
# --------------------------------------------------------------------------------------------

def test_causal_lm_peft_parity(tmp_path):
    model = trained(tiny_llama())
    ours = logits(model)
    out = export_adapter(model, tmp_path / "a", base_model_name_or_path="tiny-llama",
                         task_type="CAUSAL_LM", dtype=torch.float32,
                         pace_info={"pace": {"sigma": 0.5, "consistency_weight": 0.1, "mode": "full",
                                             "sigma_schedule": "linear_decay"}})
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * 2
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in tensors
    assert all(t.dtype == torch.float32 for t in tensors.values())
    peft = peft_logits(tiny_llama(), out)
    assert (peft - ours).abs().max().item() <= 1e-5
    assert (logits(tiny_llama()) - ours).abs().max().item() > 1e-2  # the adapter matters
    notes = json.loads((out / "pace_config.json").read_text())
    assert (notes["sigma"], notes["consistency_weight"], notes["mode"]) == (0.5, 0.1, "full")
    assert notes["layer_sigma"]["model.layers.1.mlp.up_proj"] == 0.25  # σ·(L−l)/L, L=2, l=1


def test_rslora_peft_parity(tmp_path):
    model = trained(tiny_llama(), targets=["q_proj", "v_proj", "down_proj"], r=8, rslora=True)
    out = export_adapter(model, tmp_path / "a", base_model_name_or_path="x", task_type="CAUSAL_LM",
                         dtype=torch.float32)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert (peft_logits(tiny_llama(), out) - logits(model)).abs().max().item() <= 1e-5


def test_config_mirrors_peft_save_pretrained(tmp_path):
    from peft import LoraConfig, get_peft_model

    export_adapter(trained(tiny_llama()), tmp_path / "ours", base_model_name_or_path="tiny",
                   task_type="CAUSAL_LM", dtype=torch.bfloat16)
    peft = get_peft_model(tiny_llama(), LoraConfig(
        r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"]))
    peft.save_pretrained(str(tmp_path / "peft"))
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours) <= set(theirs)
    differ = {k for k in ours if ours[k] != theirs[k]}
    assert differ == {"base_model_name_or_path", "target_modules"}
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    ours_t = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs_t = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours_t.items()} == {k: v.shape for k, v in theirs_t.items()}


def test_seq_cls_llama_head_peft_parity(tmp_path):
    model = trained(tiny_seqcls_llama(), head=["score"])
    out = export_adapter(model, tmp_path / "a", base_model_name_or_path="x", task_type="SEQ_CLS",
                         dtype=torch.float32, head_modules=["score"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"] and config["task_type"] == "SEQ_CLS"
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.score.weight"].shape == (3, 64)
    ours = logits(model)
    assert ours.shape == (2, 3)
    assert (peft_logits(tiny_seqcls_llama(), out) - ours).abs().max().item() <= 1e-5
    assert (logits(tiny_seqcls_llama()) - ours).abs().max().item() > 1e-2


@pytest.mark.parametrize("targets,wrapped", [("attn+mlp", 12), (["output.dense"], 2)])
def test_roberta_classifier_peft_parity(tmp_path, targets, wrapped):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = trained(tiny_roberta(), targets=targets, head=["classifier"])
    out = export_adapter(model, tmp_path / "a", base_model_name_or_path="x", task_type="SEQ_CLS",
                         dtype=torch.float32, head_modules=["classifier"])
    config = json.loads((out / "adapter_config.json").read_text())
    if targets == ["output.dense"]:  # PEFT's suffix rule would also take attention.output.dense
        assert config["target_modules"] == ["output.dense"]
        assert config["exclude_modules"] == ["attention.output.dense"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.dense.weight", "base_model.model.classifier.out_proj.bias"} <= set(tensors)
    peft = PeftModel.from_pretrained(tiny_roberta(), str(out)).eval()
    assert sum(isinstance(m, LoraLayer) for m in peft.modules()) == wrapped
    ours = logits(model)
    assert (logits(peft) - ours).abs().max().item() <= 1e-5
    assert (logits(tiny_roberta()) - ours).abs().max().item() > 1e-3


def test_peft_targets_pick_unambiguous_names():
    model = tiny_roberta()
    inject_noisy_lora(model, LoraArgs(targets=["dense"]), PaceArgs(mode="off"))
    names = [n for n, _ in lora_layers(model)]
    targets, excludes = peft_targets(model, names)  # 'dense' alone would also hit classifier.dense
    assert targets == ["attention.output.dense", "intermediate.dense", "output.dense"]
    assert excludes == []


# --------------------------------------------------------------------------------------------
# Refusals, dtype, atomic writes
# --------------------------------------------------------------------------------------------

def test_refuses_empty_zero_and_bad_args(tmp_path):
    kw = {"base_model_name_or_path": "x", "task_type": "CAUSAL_LM", "dtype": torch.float32}
    with pytest.raises(UserError, match="no NoisyLoRALinear layers: refusing to write an empty adapter"):
        export_adapter(tiny_llama(), tmp_path / "a", **kw)
    fresh = tiny_llama()
    inject_noisy_lora(fresh, LoraArgs(), PaceArgs())
    with pytest.raises(UserError, match="every lora_B of the 14 adapted layers is zero"):
        export_adapter(fresh, tmp_path / "a", **kw)
    model = trained(tiny_llama())
    with pytest.raises(UserError, match="task_type 'SEQ_CLASSIFICATION' is not supported"):
        export_adapter(model, tmp_path / "a", **{**kw, "task_type": "SEQ_CLASSIFICATION"})
    with pytest.raises(UserError, match="head_modules \\['lm_head'\\] with task_type CAUSAL_LM"):
        export_adapter(model, tmp_path / "a", **kw, head_modules=["lm_head"])
    with pytest.raises(UserError, match="head module 'classifier' is not in the model"):
        export_adapter(model, tmp_path / "a", **{**kw, "task_type": "SEQ_CLS"}, head_modules=["classifier"])
    assert list(tmp_path.iterdir()) == []


def test_never_overwrites_unless_asked(tmp_path):
    kw = {"base_model_name_or_path": "x", "task_type": "CAUSAL_LM", "dtype": torch.bfloat16}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty"):
        export_adapter(trained(tiny_llama()), tmp_path / "a", **kw)
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"
    export_adapter(trained(tiny_llama(), seed=2), tmp_path / "a", **kw, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == FILES
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_export_refuses_what_vllm_would_reject(tmp_path):
    model = trained(tiny_llama(), r=600)
    with pytest.raises(UserError, match="r = 600 is above vLLM's largest --max-lora-rank"):
        export_adapter(model, tmp_path / "a", base_model_name_or_path="x", task_type="CAUSAL_LM",
                       dtype=torch.bfloat16)
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------------------------
# Merged export
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_merged_causal_lm_matches_base_plus_adapter(tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = trained(tiny_llama(tie_word_embeddings=tied))
    ours = logits(model)
    out = merge_and_save(model, tmp_path / "m", tokenizer=tiny_tokenizer())
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (logits(merged) - ours).abs().max().item() <= 1e-5
    assert set(merged.state_dict()) == set(tiny_llama(tie_word_embeddings=tied).state_dict())
    assert not any(isinstance(m, NoisyLoRALinear) for m in merged.modules())
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is tied
    assert AutoTokenizer.from_pretrained(out)("w3 w5")["input_ids"] == [7, 9]
    assert len(list(lora_layers(model))) == 14  # the live model is restored, still unmerged
    assert (logits(model) - ours).abs().max().item() == 0.0
    with adapters_disabled(model):
        assert (logits(model) - logits(tiny_llama(tie_word_embeddings=tied))).abs().max().item() == 0.0


def test_merged_classifier_and_dtype(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = trained(tiny_seqcls_llama(), head=["score"])
    ours = logits(model)
    merge_and_save(model, tmp_path / "m")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert (logits(merged) - ours).abs().max().item() <= 1e-5
    merge_and_save(model, tmp_path / "b", dtype=torch.bfloat16)
    weights = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    with pytest.raises(UserError, match="exists and is not empty"):
        merge_and_save(model, tmp_path / "b")


def test_merge_dequantizes_a_quantized_base(tmp_path, monkeypatch):
    """Quantized linears (adapted bases and plain ones) go through quant.dequantize_linear."""

    class Linear4bit(nn.Module):  # stands in for bitsandbytes' class of that name
        def __init__(self, lin: nn.Linear):
            super().__init__()
            self.in_features, self.out_features = lin.in_features, lin.out_features
            self.packed = nn.Parameter(lin.weight.detach().clone(), requires_grad=False)

        def forward(self, x):
            return x @ self.packed.T

    calls = []

    def dequantize_linear(module):
        calls.append(module)
        lin = nn.Linear(module.in_features, module.out_features, bias=False)
        lin.weight.data.copy_(module.packed)
        return lin

    monkeypatch.setattr(pace_llm.quant, "dequantize_linear", dequantize_linear)
    model = trained(tiny_llama(), targets="attn")
    for _, layer in lora_layers(model):
        layer.base = Linear4bit(layer.base)
    for block in model.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(block.mlp, name, Linear4bit(getattr(block.mlp, name)))
    ours = logits(model)
    from transformers import AutoModelForCausalLM

    merge_and_save(model, tmp_path / "m")
    assert len(calls) == 8 + 6
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert (logits(merged) - ours).abs().max().item() <= 1e-5
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)  # restored


def test_merge_real_4bit_base(tmp_path):
    """QLoRA: a bitsandbytes NF4 base (mlp left without adapters) merges into plain floats."""
    from transformers import AutoModelForCausalLM

    from pace_llm.quant import load_quantized
    from pace_llm.schema import QuantArgs

    tiny_llama().save_pretrained(tmp_path / "base")
    model = load_quantized(AutoModelForCausalLM, str(tmp_path / "base"), QuantArgs(bits=4),
                           torch.float32, 0)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    model = trained(model, targets="attn")
    ours = logits(model)
    merge_and_save(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert (logits(merged) - ours).abs().max().item() <= 1e-5
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"  # restored


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run as the engine writes it: recipe.yaml, base_model/, adapter/, checkpoints/step-2/."""
    run = tmp_path / "run"
    base = run / "base_model"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    recipe = Recipe(model=ModelArgs(name_or_path=str(base)), lora=LoraArgs(r=4, alpha=8),
                    train=TrainArgs(output_dir=str(run), precision="fp32"))
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    kw = {"base_model_name_or_path": str(base), "task_type": "CAUSAL_LM", "dtype": torch.float32}
    export_adapter(trained(tiny_llama(), seed=1), run / "adapter", **kw)
    export_adapter(trained(tiny_llama(), seed=2), run / "checkpoints" / "step-2" / "adapter", **kw)
    return run


def test_cli_check_reexport_and_merge(run_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    assert main(["--run", str(run_dir), "--check", "vllm"]) == 0
    printed = capsys.readouterr().out
    assert "vLLM contract: OK" in printed and "--enable-lora --max-lora-rank 8 " in printed
    assert f"shapes checked against {run_dir / 'base_model'}/config.json" in printed
    assert main(["--run", str(run_dir), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    tensors = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert len(tensors) == 28 and {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert (tmp_path / "bf16" / "pace_config.json").is_file()
    assert main(["--run", str(run_dir), "--step", "2", "--out", str(tmp_path / "m"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert (logits(merged) - logits(trained(tiny_llama(), seed=2))).abs().max().item() <= 1e-5
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    assert main(["--adapter", str(run_dir / "adapter"), "--check", "vllm", "--max-lora-rank", "8"]) == 0


def _bad_dora(run: Path) -> None:
    path = run / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_dora": True}))


CLI_BAD = [
    (lambda r, o: ["--run", str(r.parent / "nope"), "--check", "vllm"], "run directory", "does not exist"),
    (lambda r, o: ["--run", str(r), "--step", "7", "--out", o], "step-7/adapter does not exist",
     "checkpoints with an adapter in"),
    (lambda r, o: ["--run", str(r)], "nothing to do", "--check vllm"),
    (lambda r, o: ["--run", str(r), "--merge"], "--merge needs --out DIR", ""),
    (lambda r, o: ["--run", str(r), "--adapter", str(r / "adapter"), "--out", o], "exactly one source", ""),
    (lambda r, o: ["--adapter", str(r / "adapter"), "--step", "2", "--out", o], "--step goes with --run", ""),
    (lambda r, o: ["--run", str(r), "--out", o, "--dtype", "int8"], "invalid choice: 'int8'", ""),
    (lambda r, o: ["--run", str(r), "--out", str(r), "--overwrite"],
     "is, or holds, the run this export reads", "choose another directory"),
    (lambda r, o: ["--run", str(r), "--check", "vllm", "--max-lora-rank", "1"],
     "r = 4 is greater than max_lora_rank 1", "serve with --max-lora-rank 8"),
    (lambda r, o: (_bad_dora(r), ["--run", str(r), "--check", "vllm"])[1],
     "vLLM does not support DoRA", ""),
    (lambda r, o: (_bad_dora(r), ["--run", str(r), "--out", o, "--merge"])[1],
     "use_dora=true — only plain LoRA adapters load here", ""),
]


@pytest.mark.parametrize("argv,text,more", CLI_BAD, ids=range(len(CLI_BAD)))
def test_cli_bad_input_exits_2(run_dir, tmp_path, capsys, argv, text, more):
    from pace_llm.cli import main as cli_main

    assert cli_main(["export", *argv(run_dir, str(tmp_path / "out"))]) == 2
    err = capsys.readouterr().err
    assert text in err and more in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# ZeRO-3, two real ranks: gathered export equals the single-process export
# --------------------------------------------------------------------------------------------

ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def _zero3_rank(rank: int, port: int, out: Path) -> None:
    import os

    fd = os.open(out / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    from pace_llm.distributed import init_distributed

    init_distributed()
    model = trained(tiny_llama())
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=0.0),
                                      config=ZERO3)
    q = engine.module.model.layers[0].self_attn.q_proj
    assert q.base.weight.numel() == 0 and q.lora_B.numel() == 0  # really partitioned
    export_adapter(engine, out / "adapter", base_model_name_or_path="tiny", task_type="CAUSAL_LM",
                   dtype=torch.float32)
    merge_and_save(engine, out / "merged")
    assert q.lora_B.numel() == 0  # released again after the gather
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.multiproc
def test_zero3_two_ranks_export_and_merge(tmp_path):
    import multiprocessing as mp

    from transformers import AutoModelForCausalLM

    from pace_llm.distributed import free_port

    ctx, port = mp.get_context("fork"), free_port()
    procs = [ctx.Process(target=_zero3_rank, args=(r, port, tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text() for r in range(2))
    assert [p.exitcode for p in procs] == [0, 0], logs
    model = trained(tiny_llama())
    ref = export_adapter(model, tmp_path / "ref", base_model_name_or_path="tiny",
                         task_type="CAUSAL_LM", dtype=torch.float32)
    got, want = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "adapter", ref))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(merged) - logits(model)).abs().max().item() <= 1e-5
