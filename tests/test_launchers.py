"""The real launchers: deepspeed (which appends --local_rank) and a two-"node" torchrun on
127.0.0.1. Each spawns fresh interpreters, so these are the slowest engine tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pace_llm.distributed import free_port
from tests.launch import argv

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["task_loss"] for r in rows if "task_loss" in r]


@pytest.mark.multiproc
def test_deepspeed_launcher_two_ranks(tiny_base, tmp_path):
    launcher = shutil.which("deepspeed", path=str(BIN)) or shutil.which("deepspeed")
    out = tmp_path / "ds"
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "pace_llm" / "train.py"),
           *argv(tiny_base, out, train__max_steps=4, train__micro_batch_size=2,
                 deepspeed=ROOT / "ds_configs" / "zero2.json")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=400, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "--local_rank" in res.stdout + res.stderr  # the launcher really passed it
    assert len(_losses(out)) == 4 and (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.multiproc
def test_torchrun_two_nodes_on_localhost(tiny_base, tmp_path):
    torchrun = shutil.which("torchrun", path=str(BIN)) or shutil.which("torchrun")
    out = tmp_path / "nodes"
    port = free_port()
    args = argv(tiny_base, out, train__max_steps=4, train__micro_batch_size=2,
                deepspeed=ROOT / "ds_configs" / "zero1.json")
    procs = [subprocess.Popen([torchrun, "--nnodes", "2", "--node_rank", str(node),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                               "--master_port", str(port), str(ROOT / "pace_llm" / "train.py"),
                               *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=_env(), cwd=tmp_path) for node in (0, 1)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    assert "2 rank(s)" in logs[0]
    assert len(_losses(out)) == 4


def test_cpu_ranks_share_the_cores():
    from pace_llm.distributed import threads_per_rank

    assert threads_per_rank({"LOCAL_SIZE": "2"}, 16) == 8  # the deepspeed launcher
    assert threads_per_rank({"LOCAL_WORLD_SIZE": "3"}, 16) == 5  # torchrun
    assert threads_per_rank({"LOCAL_SIZE": "4"}, 2) == 1
    assert threads_per_rank({}, 2) == 2
    assert threads_per_rank({"OMP_NUM_THREADS": "1", "LOCAL_SIZE": "2"}, 16) is None
