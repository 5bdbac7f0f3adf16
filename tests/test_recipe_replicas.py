"""The shipped real-model recipes, run as shipped on tiny local replicas of their models.

There is no model hub here, so each recipe's hub model is replaced by a random-init model of
the same architecture (Phi-3's fused qkv/gate_up projections, Qwen2, RoBERTa, a Llama
classifier) with a real sentencepiece tokenizer (a ChatML template where the recipe prompts in
chat style), and its hub dataset by a sample of it in tests/fixtures (GSM8K, SST-2, the
Self-Instruct seeds for the Alpaca recipe).
Everything else is the recipe's own: precision (bf16), DeepSpeed config, LoRA targets, PACE
settings, prompt style, gradient checkpointing. A couple of steps each, then the export is
checked: the adapter's target modules are the architecture's, PEFT loads it onto the replica,
and (causal LM) the export passed the vLLM contract check on the way out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pace_llm.tinymodel import tokenizer_from_sentencepiece
from conftest import DATA
from tests.launch import run
from tests.test_tasks_gsm8k import CHATML

ROOT = Path(__file__).resolve().parents[1]
SPM = DATA / "tokenizers" / "llama2c_tinystories_bpe512_bytefallback.model"
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=1100)


def replica(out: Path, arch: str, config_cls: str, chat: bool = False, **extra) -> Path:
    """A random-init ``arch`` model (transformers class names) with the test tokenizer."""
    import transformers as tf

    tok = tokenizer_from_sentencepiece(SPM, out)
    if chat:
        tok.chat_template = CHATML
        tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = getattr(tf, config_cls)(**{**SIZES, "vocab_size": len(tok), "pad_token_id":
                                     tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                                     "eos_token_id": tok.eos_token_id, **extra})
    getattr(tf, arch)(cfg).save_pretrained(out)
    return out


CASES = {
    # recipe: (replica, local data, world, adapter target modules, eval metric)
    "gsm8k.yaml": (dict(arch="Phi3ForCausalLM", config_cls="Phi3Config", num_key_value_heads=2),
                   DATA / "gsm8k", 2, {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
                   "exact_match"),
    "gsm8k_qwen.yaml": (dict(arch="Qwen2ForCausalLM", config_cls="Qwen2Config", chat=True,
                             num_key_value_heads=2),
                        DATA / "gsm8k", 1,
                        {f"{m}_proj" for m in ("q", "k", "v", "o", "gate", "up", "down")},
                        "exact_match"),
    "instruct_alpaca.yaml": (dict(arch="Qwen2ForCausalLM", config_cls="Qwen2Config", chat=True,
                                  num_key_value_heads=2),
                             DATA / "instruct" / "self_instruct_seed_tasks.jsonl", 1,
                             {f"{m}_proj" for m in ("q", "k", "v", "o", "gate", "up", "down")},
                             "token_f1"),
    "glue_sst2.yaml": (dict(arch="RobertaForSequenceClassification", config_cls="RobertaConfig",
                            num_labels=2, type_vocab_size=1),
                       DATA / "glue" / "SST-2", 1, {"query", "value"}, "accuracy"),
    "glue_sst2_llama.yaml": (dict(arch="LlamaForSequenceClassification", config_cls="LlamaConfig",
                                  num_labels=2, num_key_value_heads=2),
                             DATA / "glue" / "SST-2", 2, {"q_proj", "v_proj"}, "accuracy"),
}


@pytest.mark.multiproc
@pytest.mark.parametrize("recipe", list(CASES))
def test_recipe_runs_as_shipped_on_a_replica(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name ds_configs/*.json relative to the repo root
    spec, data, world, targets, metric = CASES[recipe]
    base = replica(tmp_path / "base", **spec)
    out = tmp_path / "run"
    argv = ["--recipe", f"recipes/{recipe}", "--model.name_or_path", str(base),
            "--data.path", str(data), "--data.limit", "24", "--train.output_dir", str(out),
            "--train.max_steps", "2", "--train.micro_batch_size", "2",
            "--train.warmup_steps", "1", "--train.save_every", "0", "--train.log_every", "1",
            "--eval.every", "0", "--eval.limit", "4", "--eval.batch_size", "4",
            "--eval.max_new_tokens", "4", "--eval.save_best", "false"]
    codes, log = run(argv, world, tmp_path / "logs")
    assert codes == [0] * world, log

    engine = json.loads((out / "engine.json").read_text())
    assert engine["requested"]["precision"] == "bf16"  # the recipe's precision, as on a GPU
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["task_loss"] for r in rows if "task_loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    evals = [r["eval"] for r in rows if "eval" in r]
    assert evals and metric in evals[-1]["metrics"] and evals[-1]["examples"] == 4

    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == targets, config["target_modules"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors if ".lora_" in k}
    assert adapted == targets

    import transformers as tf
    from peft import PeftModel

    model = getattr(tf, spec["arch"]).from_pretrained(base)
    peft_model = PeftModel.from_pretrained(model, adapter)
    loaded = {n for n, _ in peft_model.named_parameters() if "lora_B" in n}
    assert len(loaded) == sum(1 for k in tensors if "lora_B" in k)
    lora_b = [k for k in tensors if "lora_B" in k]
    assert any(tensors[k].abs().sum() > 0 for k in lora_b)  # two steps moved B off zero
