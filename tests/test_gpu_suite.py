"""bench/gpu_suite.py: the CPU dry run starts every stage, records a failing stage and goes on;
the figures, the ratios, the job plan, the budget and the wheel choice, checked on numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import suite_env  # noqa: E402
import suite_jobs  # noqa: E402
import suite_report as R  # noqa: E402

FILES = {"summary.json", "summary.md", "windows.jsonl", "counter.md", "logs.tar.gz"}


def test_dry_run_writes_everything_and_records_a_failing_job(tmp_path):
    out = tmp_path / "out"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--dry-run", "--out", str(out),
         "--workdir", str(tmp_path / "work"), "--contenders", "off,peft", "--shapes", "16",
         "--counter-contenders", "off", "--fail", "peft-mb16", "--threads", "1", "--pads", "1",
         "--wheels", str(tmp_path / "no-wheels")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == FILES
    s = json.loads((out / "summary.json").read_text())
    assert {"suite", "environment", "model", "runs", "table", "ratios", "counter", "errors",
            "skipped", "budget", "axes"} <= set(s)
    runs = {r["tag"]: r for r in s["runs"]}
    assert runs["off-mb16-r1"]["status"] == "ok" and runs["peft-mb16-r1"]["status"] == "failed"
    by = runs["off-mb16-r1"]["metrics"]["by_cudnn"]
    assert set(by) == {"on", "off"}
    for m in by.values():
        assert m["steps"] == 2 and m["tokens_per_s"] > 0 and m["mean_step_s"] > 0
        assert m["mean_over_median"] == pytest.approx(m["mean_step_s"] / m["median_step_s"])
    err = next(e for e in s["errors"] if e.get("job") == "peft-mb16-r1")
    assert err["stage"] == "throughput" and "forced failure" in err["log_tail"]
    assert [(r["who"], r["cudnn"]) for r in s["table"]] == [("off", "on"), ("off", "off")]
    ratios = {(r["name"], r["cudnn"]): r for r in s["ratios"]}
    assert len(ratios) == 6
    assert ratios[("off/PEFT tokens/s, micro 16", "on")]["status"] == "n/a"
    assert "peft micro 16" in ratios[("off/PEFT tokens/s, micro 16", "on")]["note"]
    mm = ratios[("off mean/median step, micro 16", "off")]
    assert mm["value"] == pytest.approx(by["off"]["mean_over_median"])
    assert s["counter"]["status"] == "ok"
    assert [r["config"] for r in s["counter"]["rows"]] == ["bf16_zero0_off"]
    assert s["counter"]["rows"][0]["total"] > 100
    assert s["model"]["base"]["mean_tokens"] > 150
    md = (out / "summary.md").read_text()
    assert "| off | 2 | 1 | no | on | 1 |" in md and "forced failure" in md
    lines = (out / "windows.jsonl").read_text().splitlines()
    assert len(lines) == 1 and len(json.loads(lines[0])["steps"]) == 2 + 4 * 1 + 1
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/prepare.log" in names and "logs/peft-mb16-r1.log" in names


def _steps(ends: list[float], tokens: int = 100, views: int = 1) -> list[dict]:
    return [{"end": e, "tokens": tokens, "supervised": 40, "padded": 125, "views": views}
            for e in ends]


def test_window_figures_and_mfu_formula():
    counts = {"frozen_linear": 1000, "adapter": 10, "lm_head": 200, "hidden": 4, "vocab": 50,
              "n_6nt": 1210}
    steps = _steps([0.0, 1.0, 1.5, 2.5, 3.0, 7.0], views=2)
    w = R.window(steps, 2, 6, counts, peak_flops=1e6)  # steps 3..6, from the end of step 2
    assert w["wall_s"] == pytest.approx(6.0)
    assert w["durations"] == pytest.approx([0.5, 1.0, 0.5, 4.0])
    assert w["flops_6nt"] == 6 * 1210 * 4 * 2 * 100
    assert w["flops_useful"] == 4 * 2 * (100 * (4 * 1000 + 6 * 10) + 40 * 4 * 4 * 50)
    m = R.combine([w], [None])
    assert m["tokens_per_s"] == pytest.approx(400 / 6.0)
    assert m["mean_step_s"] == pytest.approx(1.5) and m["median_step_s"] == pytest.approx(0.75)
    assert m["mean_over_median"] == pytest.approx(2.0)
    assert m["mfu_6nt"] == pytest.approx(6 * 1210 * 800 / 6.0 / 1e6)
    assert m["padding_frac"] == pytest.approx(0.2) and m["peak_mb"] is None


def _row(who, shape, cudnn, **k):
    per = {key: [v] for key, v in k.items()}
    return {"who": who, "shape": shape, "cudnn": cudnn, "pad": 1, "compile": False,
            "per_repeat": per, **k}


def test_acceptance_ratios():
    rows = [_row("off", "16", "on", tokens_per_s=13000.0, mean_over_median=1.05),
            _row("peft", "16", "on", tokens_per_s=10000.0),
            _row("off", "64", "on", mean_step_s=1.0), _row("full", "64", "on", mean_step_s=1.9)]
    got = {(r["name"], r["cudnn"]): r for r in R.ratios(rows)}
    r1 = got[("off/PEFT tokens/s, micro 16", "on")]
    assert r1["value"] == pytest.approx(1.3) and r1["status"] == "met"
    assert got[("off mean/median step, micro 16", "on")]["status"] == "met"
    r3 = got[("full/off step time, micro 64", "on")]
    assert r3["value"] == pytest.approx(1.9) and r3["status"] == "missed"
    assert got[("full/off step time, micro 64", "off")]["status"] == "n/a"


def test_job_plan_axes_and_repeat_order():
    micro = {"16": 16, "64": 64}
    jobs = suite_jobs.plan_jobs(["off", "full", "lazy", "peft"], ["16", "64"], micro, [1], False, 2)
    first = [j.key for j in jobs if j.repeat == 1]
    assert first == ["off-mb16", "peft-mb16", "full-mb16", "lazy-mb16", "off-mb64", "full-mb64",
                     "peft-mb64"]
    assert [j.key for j in jobs if j.repeat == 2] == first[::-1]
    axes = suite_jobs.plan_jobs(["off", "peft"], ["16"], micro, [1, 8, 64], True, 1)
    assert [j.key for j in axes] == ["off-mb16", "peft-mb16", "off-mb16-pad8", "peft-mb16-pad8",
                                     "off-mb16-pad64", "peft-mb16-pad64", "off-mb16-compile"]


def test_budget_skips_jobs_without_starting_them(tmp_path):
    jobs = suite_jobs.plan_jobs(["off", "peft"], ["16"], {"16": 2}, [1], False, 2)
    done = [{"key": "off-mb16", "shape": "16", "status": "ok", "duration_s": 40.0}]
    assert jobs[3].tag == "off-mb16-r2"
    assert suite_jobs.estimate(jobs[3], done, {"16": 75.0}) == 40.0  # its own first repeat
    assert suite_jobs.estimate(jobs[0], [], {"16": 75.0}) == 75.0
    s = {"runs": [], "errors": [], "skipped": [], "_t0": 0.0}
    a = Namespace(dry_run=True, no_prefetch=False, job_timeout=10, peak_tflops=989.0)
    suite_jobs.run_jobs(a, jobs, {}, tmp_path, {}, 0.0, {}, {}, s)  # deadline long past
    assert [x["job"] for x in s["skipped"]] == [j.tag for j in jobs]
    assert all(x["message"].startswith("budget") for x in s["skipped"])
    assert not s["runs"] and not (tmp_path / "logs").exists()


def test_wheel_choice():
    wheels = [Path(n) for n in ("deepspeed-0.19.8-py3-none-any.whl",
                                "transformers-5.24.0-py3-none-any.whl",
                                "regex-2026.11.19-cp312-cp312-manylinux_2_17_x86_64.whl",
                                "hjson-3.1.0-py3-none-any.whl",
                                "typing_extensions-4.16.0-py3-none-any.whl")]
    installed = {"deepspeed": None, "transformers": "5.17.0", "regex": "2026.12.1",
                 "hjson": None, "typing-extensions": "4.12.2"}
    plan = {w.name.split("-")[0]: why for w, why in suite_env.install_plan(wheels, installed,
                                                                            False)}
    assert plan == {"deepspeed": "missing", "transformers": "image has 5.17.0",
                    "hjson": "missing", "typing_extensions": "image has older 4.12.2"}
    kept = suite_env.install_plan(wheels, installed, keep_image=True)
    assert "transformers" not in {w.name.split("-")[0] for w, _ in kept}


def _wheel(folder: Path) -> Path:
    """A one-module wheel, as prepare_wheels.sh leaves them."""
    import zipfile

    folder.mkdir()
    path = folder / "suiteprobe-0.1-py3-none-any.whl"
    info = "suiteprobe-0.1.dist-info"
    files = {"suiteprobe.py": "VALUE = 7\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: suiteprobe\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_a_missing_package_is_installed_from_the_carried_wheels(tmp_path, monkeypatch):
    _wheel(tmp_path / "wheels")
    (tmp_path / "logs").mkdir()
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored afterwards
    info: dict = {}
    a = Namespace(wheels=str(tmp_path / "wheels"), keep_image_packages=False)
    suite_env.ensure_packages(a, tmp_path, info, timeout=120)
    assert info["installed_from_wheels"] == ["suiteprobe 0.1 (missing)"]
    assert info["missing"] == [] and info["before"]["suiteprobe"] is None
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "site")
    probe = subprocess.run([sys.executable, "-c", "import suiteprobe; print(suiteprobe.VALUE)"],
                           env=dict(os.environ), capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "7", probe.stderr
