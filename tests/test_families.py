"""The model-family table: adding a family is one entry in pace_llm.families.FAMILIES.

GPT-NeoX has no entry. Registered here (presets, head, full-precision and embedding names, the
shape formulas), it trains with ``lora.targets: attn+mlp``, exports and passes the vLLM contract
check with shape checks; nothing else in the package knows about it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pace_llm import families as F
from pace_llm.families import Family, Sizes, expected_shape
from conftest import save_fixture_tokenizer
from tests.launch import argv, run

NEOX = Family(
    "gpt-neox", ("gpt_neox",), attn=("query_key_value", "dense"),
    mlp=("dense_h_to_4h", "dense_4h_to_h"),
    shapes=lambda s: {"query_key_value": (3 * s.q, s.hidden), "dense": (s.hidden, s.q),
                      "dense_h_to_4h": (s.intermediate, s.hidden),
                      "dense_4h_to_h": (s.hidden, s.intermediate)},
    heads=("score",), full_precision=("embed_out", "score"), embeddings=("embed_in", "embed_out"))


def save_neox(out: Path) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = save_fixture_tokenizer(out)
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, vocab_size=len(tok), max_position_embeddings=512,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPTNeoXForCausalLM(cfg).save_pretrained(out)
    return out


def test_shape_lookup_prefers_the_longest_name():
    sizes = Sizes.from_config({"hidden_size": 64, "num_attention_heads": 4,
                               "intermediate_size": 128})
    bert = F.FAMILIES["bert-style"]
    assert bert.shape("attention.output.dense", sizes) == (64, 64)
    assert bert.shape("output.dense", sizes) == (64, 128)
    assert expected_shape("self_attn.k_proj", {"model_type": "llama", "hidden_size": 64,
                                               "num_attention_heads": 4,
                                               "num_key_value_heads": 2}) == (32, 64)


def test_a_registered_family_trains_exports_and_checks(tmp_path, monkeypatch):
    base = save_neox(tmp_path / "neox")
    opts = dict(train__max_steps=3, lora__targets="attn+mlp", pace__mode="full")
    codes, log = run(argv(base, tmp_path / "before", **opts), 1, tmp_path / "logs-before")
    assert codes == [2] and "no preset for model type 'gpt_neox'" in log, log

    monkeypatch.setitem(F.FAMILIES, "gpt-neox", NEOX)  # the one table entry (forks inherit it)
    out = tmp_path / "run"
    codes, log = run(argv(base, out, **opts), 1, tmp_path / "logs")
    assert codes == [0], log
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(NEOX.attn + NEOX.mlp)

    from pace_llm.export import main as export_main

    assert export_main(["--run", str(out), "--check", "vllm"]) == 0
    # the shape formulas are what the check compares against: a wrong one is caught
    wrong = Family(**{**NEOX.__dict__, "shapes": lambda s: {"query_key_value": (s.q, s.hidden)}})
    monkeypatch.setitem(F.FAMILIES, "gpt-neox", wrong)
    assert export_main(["--run", str(out), "--check", "vllm"]) == 2

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                     str(out / "adapter"))
    assert len([n for n, _ in peft.named_modules() if n.endswith("lora_A")]) == 8
