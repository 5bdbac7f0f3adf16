"""The README's offline demo, end to end, exactly as a user runs it (one process, no launcher)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.multiproc
def test_demo_recipe_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    res = subprocess.run([sys.executable, "pace_llm/train.py", "--recipe", "recipes/demo.yaml",
                          "--train.output_dir", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in x]
    first, last = evals[0]["eval"], evals[-1]["eval"]
    assert evals[0]["step"] == 0 and last["eval_loss"] <= 0.7 * first["eval_loss"], evals
    assert "eval at step 0: exact_match " in res.stdout  # before and after, with the eval loss
    assert "eval at step 400: exact_match " in res.stdout and ", eval_loss " in res.stdout
    assert "400 steps of 16 examples = 3.2 epoch(s) of 2000 examples;" in res.stdout
    assert "[pace_llm] next steps:\n  pace-llm data-check --recipe " in res.stdout
    for name in ("recipe.yaml", "metrics.jsonl", "curves.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "base_model/config.json"):
        assert (out / name).is_file(), name
    assert str(out / "adapter") in res.stdout
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base_model").resolve())
