"""QLoRA through the training engine: a 4-bit NF4 base trains with PACE under 1 and 2 ranks,
ZeRO-0/2/3, with the same loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import save_tiny_base
from tests.test_engine import DS, rel_close, train_ok

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
