"""Run-directory safety and content-verified checkpoints: nothing of a finished run is lost,
nothing in a checkpoint is executed, a resume is explicit about what changed."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import time
from pathlib import Path

import pytest

from pace_llm.checkpoint import MANIFEST, sha256
from pace_llm.schedule import lr_lambda
from tests.launch import Ranks, argv, ckpt_exists, run, train_ok


def tree_hash(root: Path) -> dict[str, str]:
    """path -> sha256 of every file under root (the bytes of a run)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_base, tmp_path_factory) -> Path:
    """A finished run without checkpoints (train.save_every 0)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_ok(tiny_base, out, train__max_steps=3)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "checkpoints").exists()
    return out


def test_resume_auto_on_a_finished_run_changes_nothing(tiny_base, finished, tmp_path):
    before = tree_hash(finished)
    codes, log = run(argv(tiny_base, finished, train__max_steps=3, train__resume="auto"), 1,
                     tmp_path / "logs")
    assert codes == [0], log
    assert "is a finished run" in log and "nothing changed" in log
    assert "Traceback" not in log
    assert tree_hash(finished) == before


def test_overwrite_with_bad_data_keeps_the_finished_run(tiny_base, finished, tmp_path):
    before = tree_hash(finished)
    missing = tmp_path / "typo.jsonl"
    codes, log = run(argv(tiny_base, finished, train__overwrite=True, data__task="gsm8k",
                          data__path=missing), 1, tmp_path / "logs")
    assert codes == [2], log
    assert "does not exist" in log and "Traceback" not in log
    assert tree_hash(finished) == before
    assert not list(finished.parent.glob(f".{finished.name}.*"))  # no staging, no lock left


def test_a_failed_start_leaves_a_new_directory_as_it_found_it(tiny_base, tmp_path):
    out = tmp_path / "new"
    codes, log = run(argv(tiny_base, out, data__task="gsm8k", data__path=tmp_path / "no.jsonl"),
                     1, tmp_path / "logs")
    assert codes == [2], log
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["logs"]


def test_overwrite_replaces_a_finished_run_only_once_the_new_one_has_loaded(tiny_base, tmp_path):
    out = tmp_path / "run"
    train_ok(tiny_base, out, train__max_steps=2)
    first = tree_hash(out)
    rows, _ = train_ok(tiny_base, out, train__max_steps=3, train__overwrite=True)
    assert [r["step"] for r in rows] == [1, 2, 3]  # the new run's metrics alone
    assert tree_hash(out) != first and (out / "adapter" / "adapter_config.json").is_file()


def test_a_second_run_into_the_same_directory_is_refused(tiny_base, tmp_path):
    out = tmp_path / "run"
    first = Ranks(argv(tiny_base, out, train__max_steps=100000), 1, tmp_path / "first")
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    codes, log = run(argv(tiny_base, out, train__resume="auto"), 1, tmp_path / "second")
    assert codes == [2], log
    assert f"{out} is in use by pid {first.procs[0].pid}" in log
    first.signal(signal.SIGTERM)
    assert first.wait(120) == [0]
    assert "stop requested" in first.output()


def _killed_at(tiny_base, out: Path, logs: Path, step: int, **common) -> None:
    ranks = Ranks(argv(tiny_base, out, **common), 1, logs)
    ranks.kill_when(ckpt_exists(out, step))


def _rewrite_manifest(ckpt: Path, rel: str) -> None:
    """An attacker with write access fixes the manifest entry of a file it replaced."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    f = ckpt / rel
    manifest["files"][rel] = {"size": f.stat().st_size, "sha256": sha256(f)}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_never_executed(tiny_base, tmp_path):
    """DeepSpeed's engine writes pickles (read weights-only); the flat engine writes none."""
    flat = tmp_path / "flat"
    train_ok(tiny_base, flat, train__max_steps=2, train__save_every=2, eval__at_start=False)
    assert not list((flat / "checkpoints").rglob("*.pt"))
    common = dict(train__max_steps=8, train__save_every=2, pace__mode="full",
                  train__optimizer_path="deepspeed")
    out = tmp_path / "run"
    _killed_at(tiny_base, out, tmp_path / "killed", 2, **common)
    ckpt = out / "checkpoints" / "step-2"
    rel = "ds/mp_rank_00_model_states.pt"
    marker = tmp_path / "PWNED"
    (ckpt / rel).write_bytes(pickle.dumps({"module": _Payload(marker)}))
    _rewrite_manifest(ckpt, rel)
    codes, log = run(argv(tiny_base, out, train__resume="auto", **common), 1, tmp_path / "logs")
    assert codes == [2], log
    assert "holds objects other than tensors" in log and rel.split("/")[-1] in log
    assert not marker.exists()
    assert "Traceback" not in log


def test_a_changed_checkpoint_falls_back_or_is_refused(tiny_base, tmp_path):
    common = dict(train__max_steps=8, train__save_every=2, train__keep_last=3)
    out = tmp_path / "run"
    _killed_at(tiny_base, out, tmp_path / "killed", 4, **common)
    newest = out / "checkpoints" / "step-4" / "trainable.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    newest.write_bytes(bytes(data))
    codes, log = run(argv(tiny_base, out, train__resume=str(newest.parent), **common), 1,
                     tmp_path / "explicit")
    assert codes == [2] and "trainable.safetensors does not match its SHA-256" in log, log
    codes, log = run(argv(tiny_base, out, train__resume="auto", **common), 1, tmp_path / "auto")
    assert codes == [0], log
    assert "skipping checkpoint" in log and "step-4" in log and "resumed from" in log
    assert "step-2 at step 2" in log


def test_resume_applies_a_new_lr_and_logs_each_step_once(tiny_base, tmp_path):
    common = dict(train__max_steps=10, train__save_every=5, train__warmup_steps=2)
    out = tmp_path / "run"
    _killed_at(tiny_base, out, tmp_path / "killed", 5, **common)
    rows, _ = train_ok(tiny_base, out, train__resume="auto", train__lr=1e-3, **common)
    assert [r["step"] for r in rows] == list(range(1, 11))  # each step once
    f = lr_lambda("cosine", 2, 10)
    assert all(r["lr"] == pytest.approx(5e-3 * f(r["step"])) for r in rows if r["step"] <= 5)
    assert all(r["lr"] == pytest.approx(1e-3 * f(r["step"])) for r in rows if r["step"] > 5)
    log = (tmp_path / "run-logs" / "rank0.log").read_text()
    assert "resume: applied train.lr 0.005 -> 0.001" in log


def test_resume_refuses_a_change_of_shape_and_keeps_the_recipe(tiny_base, tmp_path):
    common = dict(train__max_steps=10, train__save_every=5)
    out = tmp_path / "run"
    _killed_at(tiny_base, out, tmp_path / "killed", 5, **common)
    recipe, logged = (out / "recipe.yaml").read_bytes(), (out / "metrics.jsonl").read_bytes()
    codes, log = run(argv(tiny_base, out, train__resume="auto", lora__r=8, **common), 1,
                     tmp_path / "logs")
    assert codes == [2], log
    assert "lora.r 4 -> 8" in log and "nothing was changed" in log
    assert (out / "recipe.yaml").read_bytes() == recipe
    assert (out / "metrics.jsonl").read_bytes() == logged


def test_exports_are_readable_as_the_umask_says(tmp_path):
    from pace_llm.export import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "adapter") as tmp:
            (tmp / "adapter_config.json").write_text("{}")
            (tmp / "sub").mkdir()
    finally:
        os.umask(old)
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "adapter" / "adapter_config.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter" / "sub").stat().st_mode & 0o777 == 0o755


def test_a_file_size_limit_during_a_checkpoint_is_one_message(tiny_base, tmp_path):
    """ulimit -f is told apart from a full disk (a full disk: tests/test_edges.py)."""
    common = dict(train__max_steps=8, train__save_every=2, train__keep_last=3)
    out = tmp_path / "run"
    _killed_at(tiny_base, out, tmp_path / "killed", 2, **common)
    intact = tree_hash(out / "checkpoints" / "step-2")
    # no file may reach the size of the optimizer state file: the next checkpoint's cannot
    limit = (out / "checkpoints" / "step-2" / "optimizer-rank0.safetensors").stat().st_size - 1
    ranks = Ranks(argv(tiny_base, out, train__resume="auto", **common), 1, tmp_path / "full",
                  file_size_limit=limit)
    assert ranks.wait(120) == [2], ranks.output()
    log = ranks.output()
    assert "reached this process's file-size limit (ulimit -f: " in log, log
    assert "the disk is not full" in log and "no space left" not in log, log
    assert "earlier checkpoints are intact" in log and "Traceback" not in log
    assert tree_hash(out / "checkpoints" / "step-2") == intact
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-2"]


def test_no_room_for_a_checkpoint_is_refused_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from pace_llm.errors import UserError
    from pace_llm.rundir import RunDir

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    RunDir(tmp_path / "run").check_space(trainable=40, save_every=0)  # no checkpoints: fine
    RunDir(tmp_path / "run").check_space(trainable=40, save_every=5)  # 960 bytes fit
    with pytest.raises(UserError, match="needs about 2400 bytes, but .* has 1000 bytes free"):
        RunDir(tmp_path / "run").check_space(trainable=100, save_every=5)


def test_recipe_changes_on_resume_classify_keys():
    from pace_llm.checkpoint import recipe_changes
    from pace_llm.schema import Recipe, recipe_to_dict

    saved = recipe_to_dict(Recipe())
    del saved["data"]["streaming"]  # a checkpoint older than the key: it was off then
    now = recipe_to_dict(Recipe())
    assert recipe_changes(saved, now) == ([], [])
    now["data"]["streaming"] = True
    now["data"]["pad_to_multiple_of"] = 64  # layout only
    now["train"]["lr"] = 1e-3
    now["data"]["mix"] = [{"path": "x.jsonl"}]
    refused, applied = recipe_changes(saved, now)
    assert refused == ["data.mix None -> [{'path': 'x.jsonl'}]", "data.streaming None -> True"]
    assert applied == ["train.lr 0.0002 -> 0.001"]


def test_what_a_killed_start_left_beside_the_run_is_removed_only_when_a_run_wrote_it(tmp_path):
    """``.NAME.new`` (a start's staging directory) and ``.NAME.old`` (the run it replaces, until
    it settles) are removed by the next start only when they hold nothing but what a run writes;
    the user's own file, directory or link by that name is one message, nothing changed."""
    import shutil

    from pace_llm.errors import UserError
    from pace_llm.rundir import RunDir

    out = tmp_path / "run"
    staging, old = tmp_path / ".run.new", tmp_path / ".run.old"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")

    def refused(path: Path, found: str) -> None:
        kept = "its staging directory" if path == staging else "the run it replaces"
        rundir = RunDir(out)
        with pytest.raises(UserError) as err:
            rundir.open(None, False, 10, print)
        rundir.release()  # the process would have exited
        assert str(err.value) == (f"train.output_dir: {path} is where a start of {out} keeps "
                                  f"{kept}, but it is {found}; nothing was changed: move it "
                                  "away, or choose another train.output_dir")
        assert not out.exists() and (elsewhere / "keep.txt").read_text() == "mine"

    for path in (staging, old):
        path.mkdir()
        (path / "notes.txt").write_text("mine")
        (path / "recipe.yaml").write_text("train: {}\n")
        refused(path, "a directory holding notes.txt, which no run writes")
        assert (path / "notes.txt").read_text() == "mine"
        shutil.rmtree(path)
        path.symlink_to(elsewhere)
        refused(path, "a symbolic link")
        path.unlink()
        path.write_text("mine")
        refused(path, "a file")
        assert path.read_text() == "mine"
        path.unlink()

    # what a start killed before its commit (staging) or before it settled (old) leaves: only
    # what a run writes; the next start removes the first at once, the second when it commits
    for path in (staging, old):
        (path / "checkpoints").mkdir(parents=True)
        (path / "recipe.yaml").write_text("train: {}\n")
        (path / "metrics.jsonl.tmp").write_text("{}\n")
    rundir = RunDir(out)
    assert rundir.open(None, False, 10, print).mode == "new"
    assert list(staging.iterdir()) == [] and (old / "recipe.yaml").is_file()
    (staging / "recipe.yaml").write_text("train: {max_steps: 10}\n")
    rundir.commit()
    assert not old.exists() and not staging.exists()
    assert (out / "recipe.yaml").read_text() == "train: {max_steps: 10}\n"
    rundir.settle()
    rundir.release()
