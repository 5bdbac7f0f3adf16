"""QLoRA through the training engine: a 4-bit NF4 base trains with PACE under 1 and 2 ranks,
ZeRO-0/2/3, with the same loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import save_tiny_base
from tests.launch import DS, rel_close, train_ok

pytest.importorskip("bitsandbytes", reason="the quant extra is installed by .ci/run")


@pytest.fixture(scope="module")
def base128(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("base128"), hidden_size=128,
                          intermediate_size=256)


@pytest.mark.multiproc
def test_qlora_loss_curve_same_on_one_and_two_ranks(base128, tmp_path):
    common = dict(quant__bits=4, pace__mode="full", pace__sigma=0.0, train__max_steps=8,
                  train__lr=1e-2)
    ref, _ = train_ok(base128, tmp_path / "z0", **common)
    curve = [r["task_loss"] for r in ref]
    assert curve[-1] < curve[0]
    recipe = (tmp_path / "z0" / "recipe.yaml").read_text()
    assert "bits: 4" in recipe
    for stage in (2, 3):
        got, _ = train_ok(base128, tmp_path / f"z{stage}", world=2, train__micro_batch_size=2,
                          deepspeed=DS / f"zero{stage}.json", **common)
        assert rel_close(curve, [r["task_loss"] for r in got], 1e-4), (stage, curve, got)
    config = json.loads((tmp_path / "z3" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4


@pytest.mark.multiproc
def test_qlora_pace_full_with_noise_trains(base128, tmp_path):
    rows, _ = train_ok(base128, tmp_path / "full", quant__bits=4, pace__mode="full",
                       train__max_steps=12, train__lr=1e-2)
    assert rows[-1]["task_loss"] < rows[0]["task_loss"]
    assert any(r["consistency_loss"] > 0 for r in rows)


@pytest.mark.multiproc
def test_merged_export_of_a_qlora_run_uses_the_dequantized_base(base128, tmp_path):
    """`pace-llm export --merge` on a 4-bit run folds the adapter into the dequantized weights it
    was trained against: the merged fp32 model's logits equal PEFT's adapter on the 4-bit base,
    far inside the NF4 error that separates either from the original fp32 base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from pace_llm.export import main as export_main

    run = tmp_path / "q"
    train_ok(base128, run, quant__bits=4, pace__mode="full", train__max_steps=6, train__lr=2e-2)
    merged = tmp_path / "merged"
    assert export_main(["--run", str(run), "--merge", "--out", str(merged),
                        "--dtype", "float32"]) == 0
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    q4 = AutoModelForCausalLM.from_pretrained(base128, quantization_config=bnb, device_map="cpu")
    for m in q4.modules():  # the canonical dequantize-then-matmul path (see quant._keep_cpu_layout)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    plain = logits(AutoModelForCausalLM.from_pretrained(base128, dtype=torch.float32))
    base4 = logits(q4)
    peft4 = logits(PeftModel.from_pretrained(q4, run / "adapter"))
    got = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    assert rel(peft4, base4) > 1e-3  # the adapter moved the outputs
    nf4 = rel(base4, plain)
    assert nf4 > 1e-2, nf4
    assert rel(got, peft4) < 1e-4, (rel(got, peft4), nf4)
