"""Trust at the edges (issue #20), through the real CLI: a received run never runs code, no
command deletes what it did not create, resume notices changed data, every file read back is
checked, disk and permission faults are one message, surprising input is refused.

Three tiny runs are trained once (a cached one, a streamed one, a mixture: 4 steps, checkpoints
at 2 and 4); each case copies what it needs into its own folder, may change it, runs one
command in a child forked from the test process (tests/launch.cli) and checks: the exit code,
exactly one ``error:`` line (none on success), no traceback, the message, and the SHA-256 of
every file that was there before (the case's folder, the data, the base model), unchanged but
for what the case documents. A full disk and a read-only filesystem are real: a small tmpfs
mounted in the child's own user and mount namespace."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import DATA, save_tiny_base

from pace_llm.checkpoint import MANIFEST, sha256
from tests.launch import Ranks, cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT)}

# one tiny gsm8k run: 4 steps of 2 rows, checkpoints at 2 and 4, the task cache in the world
RUN = ["--model.name_or_path", "{base}", "--data.task", "gsm8k", "--data.max_length", "128",
       "--data.on_too_long", "truncate",
       "--data.cache_dir", "{w}/cache", "--train.max_steps", "4", "--train.save_every", "2",
       "--train.keep_last", "2", "--train.micro_batch_size", "2", "--train.precision", "fp32",
       "--eval.limit", "2", "--eval.max_new_tokens", "2", "--eval.batch_size", "2",
       "--eval.at_start", "false", "--lora.r", "2", "--lora.alpha", "4", "--pace.mode", "off",
       "--deepspeed", str(ROOT / "ds_configs" / "zero0.json")]
KINDS = {"r0": ["--data.path", "{w}/data/train.jsonl"],
         "rs": ["--data.path", "{w}/data/train.jsonl", "--data.streaming", "true",
                "--data.shuffle_buffer", "8"],
         "rm": ["--data.mix", ('[{{"path": "{w}/data/train.jsonl"}}, {{"path": '
                               '"{w}/mix/b.jsonl", "eval_path": "{w}/mix/b_test.jsonl", "name": '
                               '"b"}}]')]}


def train(kind: str, out: str, *more: str) -> list[str]:
    """The train command of run ``kind`` (r0 cached, rs streamed, rm mixture) into ``out``."""
    return ["train", *RUN, *KINDS[kind], "--train.output_dir", out, *more]


def hashes(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


# --------------------------------------------------------------------------------- the world
def _data(w: Path) -> None:
    rows = (DATA / "gsm8k" / "train.jsonl").read_text().splitlines(keepends=True)
    tests = (DATA / "gsm8k" / "test.jsonl").read_text().splitlines(keepends=True)[:8]
    for folder, files in {"data": {"train.jsonl": rows, "test.jsonl": tests},
                          "mix": {"b.jsonl": rows[50:], "b_test.jsonl": tests[:4]}}.items():
        (w / folder).mkdir()
        for name, lines in files.items():
            (w / folder / name).write_text("".join(lines))


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict[str, Path]:
    """The base, the data and the three finished runs (each trained once), their hashes."""
    w = tmp_path_factory.mktemp("edges")
    save_tiny_base(w / "base")
    _data(w)
    fill = {"w": w, "base": w / "base"}
    for kind in KINDS:
        res = cli([a.format(**fill) for a in train(kind, str(w / kind))], w, ENV, 300)
        assert res.returncode == 0 and (w / kind / "adapter").is_dir(), res.stderr[-3000:]
        steps = sorted(p.name for p in (w / kind / "checkpoints").glob("step-*"))
        assert steps == ["step-2", "step-4"], steps
    return {**fill, "hashes": hashes(*(w / k for k in (*KINDS, "base", "data", "mix")))}


# --------------------------------------------------------------------------------- a case
@dataclass
class Case:
    """One command on a prepared folder ``{c}`` (args formatted with c, w, base)."""

    id: str
    args: list[str]
    needle: str
    code: int = 2
    prepare: Callable[[Path, Path], None] | None = None
    """(case folder, world folder): copy runs, edit files (restored after: see ``edits``)."""
    before: Callable[[Path], Callable[[], None]] | None = None
    """(case folder) -> what the forked child does before the command (mounts, limits)."""
    changes: tuple[str, ...] = ()
    """Paths under the case folder that the command may change or create (documented)."""
    check: Callable[[Path, subprocess.CompletedProcess], None] | None = None
    edits: dict[str, Callable[[bytes], bytes]] = field(default_factory=dict)
    """World files (relative) changed for this case only, restored after it."""


def copy(kind: str, finished: bool = True) -> Callable[[Path, Path], None]:
    """Prepare: the world's run ``kind`` as ``{c}/run`` (unfinished: without adapter/)."""
    def prepare(c: Path, w: Path) -> None:
        shutil.copytree(w / kind, c / "run", symlinks=True)
        if not finished:
            shutil.rmtree(c / "run" / "adapter")
            (c / "run" / "curves.png").unlink()
    return prepare


def then(*steps: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def prepare(c: Path, w: Path) -> None:
        for step in steps:
            step(c, w)
    return prepare


def write(rel: str, text: str | bytes) -> Callable[[Path, Path], None]:
    def prepare(c: Path, w: Path) -> None:
        path = c / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return prepare


def resign(ckpt: Path) -> None:
    """Rewrite a checkpoint's manifest over its files as they are now (a forged checkpoint)."""
    files = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (ckpt / MANIFEST).write_text(json.dumps({"format": 2, "files": files}))


def edit_state(step: str, **changes) -> Callable[[Path, Path], None]:
    def prepare(c: Path, w: Path) -> None:
        ckpt = c / "run" / "checkpoints" / step
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({**state, **changes}))
        resign(ckpt)
    return prepare


# --------------------------------------------------------------------- 1. received runs
def received(model_type: str = "llama") -> Callable[[Path, Path], None]:
    """A finished run someone sent: its recipe says trust_remote_code, its base model's
    config.json maps the auto classes to a marker.py that writes {c}/MARKER when imported."""
    def prepare(c: Path, w: Path) -> None:
        copy("r0")(c, w)
        shutil.copytree(w / "base", c / "mbase")
        config = json.loads((c / "mbase" / "config.json").read_text())
        config.update(model_type=model_type, auto_map={
            "AutoConfig": "marker.MarkerConfig", "AutoModelForCausalLM": "marker.MarkerLM"})
        (c / "mbase" / "config.json").write_text(json.dumps(config))
        (c / "mbase" / "marker.py").write_text(
            f"from pathlib import Path\nPath({str(c / 'MARKER')!r}).touch()\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
            "class MarkerConfig(LlamaConfig):\n    pass\n\n\n"
            "class MarkerLM(LlamaForCausalLM):\n    config_class = MarkerConfig\n")
        recipe = (c / "run" / "recipe.yaml").read_text()
        recipe = recipe.replace("trust_remote_code: false", "trust_remote_code: true")
        recipe = recipe.replace(str(w / "base"), str(c / "mbase"))
        (c / "run" / "recipe.yaml").write_text(recipe)
        adapter = c / "run" / "adapter" / "adapter_config.json"
        config = json.loads(adapter.read_text())
        adapter.write_text(json.dumps({**config, "base_model_name_or_path": str(c / "mbase")}))
    return prepare


def modules_cache(c: Path) -> Callable[[], None]:
    """The child imports a model's own code from {c}/hf_modules (not the user's ~/.cache)."""
    def before() -> None:
        import transformers.dynamic_module_utils as dynamic

        dynamic.HF_MODULES_CACHE = str(c / "hf_modules")
    return before


def no_marker(c: Path, res: subprocess.CompletedProcess) -> None:
    assert not (c / "MARKER").exists(), "the received run's code ran"


def marker(c: Path, res: subprocess.CompletedProcess) -> None:
    assert (c / "MARKER").exists(), "the flag did not enable the model's own code"


TRUST = [
    Case("received-export-merge", ["export", "--run", "{c}/run", "--merge", "--out", "{c}/m"],
         "ships its own Python code", 0, received(), changes=("m",), check=no_marker),
    Case("received-check-vllm", ["export", "--run", "{c}/run", "--check", "vllm"],
         "vLLM contract: OK", 0, received(), check=no_marker),
    Case("received-data-check", ["data-check", "--recipe", "{c}/run/recipe.yaml"],
         "model.trust_remote_code: true comes from the recipe file {c}/run/recipe.yaml", 2,
         received(), check=no_marker),
    Case("received-hub-kernel", ["data-check", "--recipe", "{c}/kernel.yaml"],
         "model.attn_implementation: kernels-community/flash-attn comes from the recipe file",
         prepare=write("kernel.yaml", "model: {name_or_path: x, attn_implementation: "
                                      "kernels-community/flash-attn}\n")),
    Case("received-resume", ["train", "--recipe", "{c}/run/recipe.yaml", "--train.resume",
                             "auto", "--train.output_dir", "{c}/run"],
         "add --model.trust_remote_code true", 2, received(), check=no_marker),
    Case("received-needs-its-code", ["export", "--run", "{c}/run", "--merge", "--out", "{c}/m"],
         "can only be loaded by running its own Python code (config.json auto_map: AutoConfig: "
         "marker.MarkerConfig", 2, received(model_type="marker_llm"), check=no_marker),
    Case("export-flag-runs-the-code", ["export", "--run", "{c}/run", "--merge", "--out", "{c}/m",
                                       "--trust-remote-code"], "merged model written", 0,
         received(), modules_cache, changes=("m", "hf_modules", "MARKER"), check=marker),
    Case("train-flag-runs-the-code", ["data-check", "--recipe", "{c}/run/recipe.yaml",
                                      "--model.trust_remote_code", "true"], "training example 0",
         0, received(), modules_cache, changes=("hf_modules", "MARKER"), check=marker),
]


# --------------------------------------------------------------------- 2. deleting
def outside_data(c: Path, w: Path) -> None:
    shutil.copy(w / "data" / "train.jsonl", c / "run" / "mine.jsonl")


def older_manifests(c: Path, w: Path) -> None:
    for ckpt in (c / "run" / "checkpoints").glob("step-*"):
        manifest = json.loads((ckpt / MANIFEST).read_text())
        (ckpt / MANIFEST).write_text(json.dumps({**manifest, "format": 1}))


def new_run_through(c: Path, res: subprocess.CompletedProcess) -> None:
    assert (c / "link").is_symlink() and (c / "target" / "adapter").is_dir(), res.stderr
    assert not list(c.glob(".link.*")) and not list(c.glob(".target.*")), list(c.iterdir())


DELETE = [
    Case("resume-auto-on-notes", train("r0", "{c}/notes", "--train.resume", "auto"),
         "train.resume: {c}/notes is not a pace_llm run (no recipe.yaml; it holds todo.txt)",
         prepare=write("notes/todo.txt", "my notes\n")),
    Case("resume-auto-no-checkpoint-verifies", train("r0", "{c}/run", "--train.resume", "auto"),
         "has no checkpoint that verifies", prepare=then(copy("r0", False), older_manifests)),
    Case("overwrite-the-base-model", train("r0", "{c}/base", "--model.name_or_path", "{c}/base",
                                           "--train.overwrite", "true"),
         "train.overwrite: model.name_or_path {c}/base lies inside {c}/base",
         prepare=lambda c, w: shutil.copytree(w / "base", c / "base")),
    Case("overwrite-the-data", train("r0", "{c}/run", "--data.path", "{c}/run/mine.jsonl",
                                     "--train.overwrite", "true"),
         "train.overwrite: data.path {c}/run/mine.jsonl lies inside {c}/run",
         prepare=then(copy("r0"), outside_data)),
    Case("overwrite-notes", train("r0", "{c}/notes", "--train.overwrite", "true"),
         "train.overwrite: {c}/notes is not a pace_llm run", prepare=write("notes/a.txt", "x")),
    Case("overwrite-a-run-with-notes", train("r0", "{c}/run", "--train.overwrite", "true"),
         "train.overwrite: {c}/run holds todo.txt, which no run writes",
         prepare=then(copy("r0"), write("run/todo.txt", "keep me"))),
    Case("export-out-is-the-run", ["export", "--run", "{c}/run", "--out", "{c}/run",
                                   "--overwrite"],
         "--out {c}/run is, or holds, the run this export reads", prepare=copy("r0")),
    Case("export-out-holds-the-run", ["export", "--run", "{c}/run", "--out", "{c}", "--merge",
                                      "--overwrite"],
         "--out {c} is, or holds, the run this export reads", prepare=copy("r0")),
    Case("export-out-in-the-run", ["export", "--run", "{c}/run", "--out", "{c}/run/checkpoints",
                                   "--overwrite"],
         "is part of the run {c}/run (its checkpoints)", prepare=copy("r0")),
    Case("output-dir-dot", ["train", *RUN, *KINDS["r0"], "--train.output_dir", "."],
         "train.output_dir: {c}/here is the current directory, or holds it",
         prepare=lambda c, w: (c / "here").mkdir()),
    Case("output-dir-symlink", train("r0", "{c}/link", "--train.save_every", "0"),
         "done:", 0, prepare=lambda c, w: (c / "link").symlink_to(c / "target"),
         changes=("target", ".target.lock"), check=new_run_through),
]


# --------------------------------------------------------------------- 3. changed data
def reversed_lines(data: bytes) -> bytes:
    return b"".join(reversed(data.splitlines(keepends=True)))


def cut(data: bytes) -> bytes:
    return b"".join(data.splitlines(keepends=True)[:60])


def accepted(c: Path, res: subprocess.CompletedProcess) -> None:
    """Said in the log, and not recorded: a resume from recipe.yaml would ask again."""
    assert "train.accept_data_change: training goes on" in res.stdout, res.stdout[-2000:]
    assert (c / "run" / "adapter" / "adapter_config.json").is_file()
    assert "accept_data_change: false" in (c / "run" / "recipe.yaml").read_text()


RUN_CHANGES = ("run/adapter", "run/curves.png", "run/metrics.jsonl", "run/recipe.yaml",
               "run/engine.json", "run/checkpoints", ".run.lock")
DATA_CHANGE = [
    Case("cached-file-reordered", train("r0", "{c}/run", "--train.resume", "auto"),
         "data file {w}/data/train.jsonl: its content changed", prepare=copy("r0", False),
         edits={"data/train.jsonl": reversed_lines}),
    Case("cached-file-changed-accepted", train("r0", "{c}/run", "--train.resume", "auto",
                                               "--train.accept_data_change", "true"),
         "resumed from", 0, copy("r0", False), changes=RUN_CHANGES, check=accepted,
         edits={"data/train.jsonl": reversed_lines}),
    Case("streamed-file-cut", train("rs", "{c}/run", "--train.resume", "auto"),
         "data file {w}/data/train.jsonl: size", prepare=copy("rs", False),
         edits={"data/train.jsonl": cut}),
    Case("mixture-source-changed", train("rm", "{c}/run", "--train.resume", "auto"),
         "data.mix[1]: data file {w}/mix/b.jsonl: its content changed",
         prepare=copy("rm", False), edits={"mix/b.jsonl": reversed_lines}),
    Case("streamed-cursor-negative", train("rs", "{c}/run", "--train.resume", "auto"),
         "its data cursor is outside the data: rank 0: epoch 0, row -4 is negative",
         prepare=then(copy("rs", False), edit_state("step-4", cursors=[[0, -4]]))),
    Case("streamed-cursor-past-the-file", train("rs", "{c}/run", "--train.resume", "auto"),
         "rank 0: row 100000 of epoch 0, but its share of the epoch has",
         prepare=then(copy("rs", False), edit_state("step-4", cursors=[[0, 100000]]))),
    Case("cursor-past-the-epoch", train("r0", "{c}/run", "--train.resume", "auto"),
         "epoch 0, global batch 99: an epoch has global batches 0..",
         prepare=then(copy("r0", False), edit_state("step-4", cursor=[0, 99]))),
]


# --------------------------------------------------------------------- 4. files read back
def cached(c: Path, w: Path) -> None:
    """A task cache of its own: built by a data-check run before the case changes it."""
    res = cli(["data-check", *[a.format(w=w, base=w / "base") for a in RUN + KINDS["r0"]],
               "--data.cache_dir", str(c / "cache")], c, ENV)
    assert res.returncode == 0, res.stderr[-2000:]


def in_entry(pattern: str, change: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    def prepare(c: Path, w: Path) -> None:
        found = sorted((c / "cache" / "tasks").glob(f"*/{pattern}"))
        assert found, list((c / "cache").rglob("*"))
        change(found[0])
    return prepare


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))


def huge_max_id(path: Path) -> None:
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "max_id": 10**6}))


def link_outside(c: Path, w: Path) -> None:
    target = c / "run" / "checkpoints" / "step-4" / "trainable.safetensors"
    shutil.move(target, c / "elsewhere.safetensors")
    target.symlink_to(c / "elsewhere.safetensors")


def step_dir_link(c: Path, w: Path) -> None:
    step = c / "run" / "checkpoints" / "step-4"
    shutil.move(step, c / "step-4-elsewhere")
    step.symlink_to(c / "step-4-elsewhere")


def schedule_of_step_2(c: Path, w: Path) -> None:
    ckpts = c / "run" / "checkpoints"
    shutil.copy(ckpts / "step-2" / "schedule.json", ckpts / "step-4" / "schedule.json")
    resign(ckpts / "step-4")


def rebuilt(c: Path, res: subprocess.CompletedProcess) -> None:
    assert "does not verify" in res.stderr and "building it again" in res.stderr, res.stderr


def resumed_from_step_2(c: Path, res: subprocess.CompletedProcess) -> None:
    """The link is skipped (named), left in place (not the run's to delete), its target
    untouched (hashed), and the run resumed from step 2."""
    assert "skipping checkpoint" in res.stdout and "a symbolic link" in res.stdout, res.stdout
    assert "step-2 at step 2" in res.stdout, res.stdout
    assert (c / "run" / "checkpoints" / "step-4").is_symlink()
    assert (c / "run" / "adapter" / "adapter_config.json").is_file()


CHECK = ["data-check", *RUN, *KINDS["r0"], "--data.cache_dir", "{c}/cache"]
READ_BACK = [
    Case("cache-arrow-bytes-changed", CHECK, "training example 0", 0,
         then(cached, in_entry("train/*.arrow", flip_middle)), changes=("cache",), check=rebuilt),
    Case("cache-meta-ids-past-vocab", CHECK, "training example 0", 0,
         then(cached, in_entry("meta.json", huge_max_id)), changes=("cache",), check=rebuilt),
    Case("cache-extra-arrow-file", CHECK, "training example 0", 0,
         then(cached, in_entry("train/*.arrow", lambda p: shutil.copy(p, p.with_name("x.arrow")))),
         changes=("cache",), check=rebuilt),
    Case("checkpoint-file-is-a-link", train("r0", "{c}/run", "--train.resume",
                                            "{c}/run/checkpoints/step-4"),
         "trainable.safetensors is a symbolic link", prepare=then(copy("r0", False),
                                                                  link_outside)),
    Case("checkpoint-dir-is-a-link", train("r0", "{c}/run", "--train.resume", "auto"),
         "done:", 0, then(copy("r0", False), step_dir_link), changes=RUN_CHANGES,
         check=resumed_from_step_2),
    Case("checkpoint-renamed", train("r0", "{c}/run", "--train.resume",
                                     "{c}/run/checkpoints/step-6", "--train.max_steps", "8"),
         "state.json says step 4, the directory is step-6",
         prepare=then(copy("r0", False), lambda c, w: (c / "run/checkpoints/step-4").rename(
             c / "run/checkpoints/step-6"))),
    Case("checkpoint-engine-files-of-another-step",
         train("r0", "{c}/run", "--train.resume", "{c}/run/checkpoints/step-4"),
         "its state.json is of step 4, the engine's files of step 2",
         prepare=then(copy("r0", False), schedule_of_step_2)),
]


# --------------------------------------------------------------------- 5. disks and permissions
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
MS_RDONLY, MS_REC, MS_PRIVATE = 1, 1 << 14, 1 << 18


def _own_mounts() -> ctypes.CDLL:
    """This (forked) process in its own user and mount namespace: it may mount a tmpfs that
    no other process sees."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER | CLONE_NEWNS)")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    return libc


def disk(rel: str, size: str = "128k", readonly: bool = False, full: bool = False,
         leave: int = 0) -> Callable[[Path], Callable[[], None]]:
    """Before the command: a tmpfs of ``size`` at {c}/rel (read-only, or filled up but for
    ``leave`` bytes)."""
    def for_case(c: Path) -> Callable[[], None]:
        def before() -> None:
            libc = _own_mounts()
            path = bytes(c / rel)
            if libc.mount(b"tmpfs", path, b"tmpfs", MS_RDONLY if readonly else 0,
                          f"size={size}".encode()) != 0:
                raise OSError(ctypes.get_errno(), f"mount tmpfs at {c / rel}")
            if full:
                _fill(c / rel / "filler", leave)
            tempfile.tempdir = str(c / "tmp")  # where a rescued adapter goes
        return before
    return for_case


def run_on_a_disk(leave: int) -> Callable[[Path], Callable[[], None]]:
    """Before the command: {c}/run_src copied onto a tmpfs at {c}/run, then filled up but for
    ``leave`` bytes (the lock file, beside the run, stays on the real disk)."""
    def for_case(c: Path) -> Callable[[], None]:
        def before() -> None:
            libc = _own_mounts()
            if libc.mount(b"tmpfs", bytes(c / "run"), b"tmpfs", 0, b"size=4m") != 0:
                raise OSError(ctypes.get_errno(), f"mount tmpfs at {c / 'run'}")
            shutil.copytree(c / "run_src", c / "run", dirs_exist_ok=True, symlinks=True)
            _fill(c / "run" / "filler", leave)
        return before
    return for_case


def _fill(path: Path, leave: int) -> None:
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        f.truncate(max(0, f.tell() - leave))


def file_size_limit(limit: int) -> Callable[[Path], Callable[[], None]]:
    def for_case(c: Path) -> Callable[[], None]:
        def before() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            tempfile.tempdir = str(c / "tmp")
        return before
    return for_case


def rescued(c: Path, res: subprocess.CompletedProcess) -> None:
    from safetensors.torch import load_file

    found = list((c / "tmp").glob("pace_llm-run-*/adapter/adapter_model.safetensors"))
    assert len(found) == 1, res.stderr
    assert str(found[0].parent) in res.stderr and load_file(found[0])


def one_warning(backend: str) -> Callable[[Path, subprocess.CompletedProcess], None]:
    def check(c: Path, res: subprocess.CompletedProcess) -> None:
        named = [line for line in res.stderr.splitlines() if f"report_to: {backend}" in line]
        assert len(named) == 1 and f"warning: train.report_to: {backend}" in named[0], res.stderr
        assert (c / "run" / "adapter" / "adapter_config.json").is_file()
    return check


def metrics_warning(c: Path, res: subprocess.CompletedProcess) -> None:
    """The full disk refused a metrics record: one warning, training went on to its end."""
    warned = [line for line in res.stdout.splitlines() if "metrics" in line and "warning" in line]
    assert len(warned) == 1 and "no space left on the device while writing metrics" in warned[0]
    assert "training goes on, and metrics.jsonl misses the records from step" in warned[0]
    assert "earlier checkpoints are intact" in res.stderr


BIG = ["--lora.r", "64", "--lora.alpha", "64", "--train.save_every", "0"]  # a 0.5 MB adapter
FAULTS = [
    Case("final-adapter-on-a-full-disk", train("r0", "{c}/disk/run", *BIG),
         "no space left on the device while writing adapter {c}/disk/run/adapter", 2,
         then(write("tmp/.keep", ""), write("disk/.keep", "")), disk("disk"), changes=("tmp",),
         check=rescued),
    Case("final-adapter-past-the-file-size-limit", train("r0", "{c}/run", *BIG),
         "reached this process's file-size limit (ulimit -f: 200000 bytes", 2,
         write("tmp/.keep", ""), file_size_limit(200_000), changes=("run", ".run.lock", "tmp"),
         check=lambda c, res: "could not be kept" in res.stderr and "no space" not in res.stderr),
    Case("export-to-a-full-disk", ["export", "--run", "{c}/run", "--out", "{c}/disk/x"],
         "no space left on the device while writing adapter {c}/disk/x",
         prepare=then(copy("r0"), write("disk/.keep", "")), before=disk("disk", full=True)),
    Case("export-to-a-read-only-disk", ["export", "--run", "{c}/run", "--out", "{c}/ro/x"],
         "cannot write adapter {c}/ro/x: the filesystem is read-only",
         prepare=then(copy("r0"), write("ro/.keep", "")), before=disk("ro", readonly=True)),
    Case("merge-to-a-read-only-disk", ["export", "--run", "{c}/run", "--merge", "--out",
                                       "{c}/ro/x"],
         "cannot write merged model {c}/ro/x: the filesystem is read-only",
         prepare=then(copy("r0"), write("ro/.keep", "")), before=disk("ro", readonly=True)),
    Case("tensorboard-on-a-full-disk", train("r0", "{c}/run", "--train.resume", "auto",
                                             "--train.max_steps", "8", "--train.log_every", "1",
                                             "--train.report_to", "[tensorboard]"),
         "done:", 0, then(copy("r0"), write("run/tensorboard/.keep", "")),
         disk("run/tensorboard", size="1m", full=True, leave=4096),
         changes=(*RUN_CHANGES, "run/tracking.json"), check=one_warning("tensorboard")),
    Case("metrics-then-checkpoint-on-a-full-disk",
         train("r0", "{c}/run", "--train.resume", "auto", "--train.max_steps", "40",
               "--train.log_every", "1", "--train.save_every", "0"),
         "no space left on the device while writing checkpoint {c}/run/checkpoints/.tmp-step-40",
         2, lambda c, w: (shutil.copytree(w / "r0", c / "run_src"), (c / "run").mkdir()),
         run_on_a_disk(leave=4096), check=metrics_warning),
    Case("mlflow-on-a-read-only-folder", train("r0", "{c}/run", "--train.resume", "auto",
                                               "--train.max_steps", "5", "--train.report_to",
                                               "[mlflow]"),
         "done:", 0, then(copy("r0"), write("run/mlruns/.keep", "")),
         disk("run/mlruns", readonly=True), changes=RUN_CHANGES, check=one_warning("mlflow")),
]


# --------------------------------------------------------------------- 6. surprising input
def csv_files(c: Path, w: Path) -> None:
    import csv

    rows = [json.loads(line) for line in (w / "data" / "train.jsonl").read_text().splitlines()]
    for name, header in (("dup/train.csv", ["question", "answer", "answer"]),
                         ("csv/train.csv", ["question", "answer"])):
        (c / name).parent.mkdir(exist_ok=True)
        shutil.copy(w / "data" / "test.jsonl", (c / name).parent / "test.jsonl")
        with open(c / name, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(header)
            out.writerows([r["question"], r["answer"], "x"][:len(header)] for r in rows[:20])


SURPRISE = [
    Case("csv-header-repeats-a-column", ["data-check", *RUN, "--data.path", "{c}/dup/train.csv"],
         "{c}/dup/train.csv line 1: the header names column 'answer' twice (columns 2 and 3)",
         prepare=csv_files),
    Case("csv-beside-a-test-jsonl", ["data-check", *RUN, "--data.path", "{c}/csv/train.csv"],
         "first evaluation input", 0, csv_files,
         check=lambda c, res: "eval_rows: 8" in res.stdout),
    Case("mixture-weights-overflow", ["train", *RUN, "--data.mix", ('[{{"path": '
                                      '"{w}/data/train.jsonl", "weight": 1e308}}, {{"path": '
                                      '"{w}/mix/b.jsonl", "weight": 1e308}}]'),
                                      "--train.output_dir", "{c}/run"],
         "data.mix: the weights (1e+308, 1e+308) sum to more than the largest float"),
    Case("resume-and-overwrite", train("r0", "{c}/run", "--train.resume", "auto",
                                       "--train.overwrite", "true"),
         "train.resume 'auto' and train.overwrite true are both set", prepare=copy("r0")),
    Case("report-to-unknown", train("r0", "{c}/run", "--train.report_to", "[tensorbord]"),
         "train.report_to: 'tensorbord' is not allowed; expected a list of 'tensorboard', "
         "'wandb', 'mlflow' (e.g. [tensorboard])"),
]

CASES = TRUST + DELETE + DATA_CHANGE + READ_BACK + FAULTS + SURPRISE


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_edge(world, tmp_path, case):
    c, w = tmp_path, world["w"]
    fill = {"c": c, "w": w, "base": world["base"]}
    if case.prepare is not None:
        case.prepare(c, w)
    saved = {rel: ((w / rel).read_bytes(), (w / rel).stat()) for rel in case.edits}
    try:
        for rel, change in case.edits.items():
            (w / rel).write_bytes(change(saved[rel][0]))
        watched = (c, w / "base", w / "data", w / "mix")
        before = hashes(*watched)
        cwd = c / "here" if (c / "here").is_dir() else c
        res = cli([a.format(**fill) for a in case.args], cwd, ENV, 240,
                  before=case.before(c) if case.before else None)
        after = hashes(*watched)
    finally:
        for rel, (data, stat) in saved.items():  # as it was, modification time included
            (w / rel).write_bytes(data)
            os.utime(w / rel, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _check_result(case, res, fill)
    allowed = tuple(str(c / rel) for rel in case.changes)
    lost = {p for p in before if not p.startswith(allowed) and after.get(p) != before[p]}
    new = {p for p in set(after) - set(before) if not p.startswith(allowed)}
    assert not lost and not new, (sorted(lost), sorted(new), res.stderr[-2000:])
    if case.check is not None:
        assert case.check(c, res) is not False, res.stderr[-3000:]


def _check_result(case: Case, res: subprocess.CompletedProcess, fill: dict) -> None:
    text = res.stdout + res.stderr
    assert "Traceback" not in text, text[-4000:]
    assert res.returncode == case.code, text[-4000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == (1 if case.code == 2 else 0), res.stderr
    needle = case.needle.format(**fill)
    if errors:  # the error line and its bullets
        lines = res.stderr.splitlines()
        start = lines.index(errors[0])
        text = "\n".join([lines[start], *(x for x in lines[start + 1:] if x.startswith("  - "))])
    assert needle in text, text[-4000:]


def test_a_deleted_lock_file_does_not_let_a_second_run_in(world, tmp_path):
    """The lock file deleted while a run trains: a second run still finds the run in use (its
    directory lock) and exits 2; the first finishes undisturbed."""
    fill = {"w": world["w"], "base": world["base"]}
    out = tmp_path / "run"
    argv = [a.format(**fill) for a in train("r0", str(out), "--train.max_steps", "100000",
                                            "--train.save_every", "0")][1:]
    first = Ranks(argv, 1, tmp_path / "first")
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    (tmp_path / ".run.lock").unlink()
    res = cli([a.format(**fill) for a in train("r0", str(out), "--train.resume", "auto")],
              tmp_path, ENV)
    first.signal(signal.SIGTERM)
    assert first.wait(120) == [0], first.output()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [(f"error: train.output_dir: {out} is in use by another run (it holds a "
                       f"lock on {out}; its lock file {tmp_path / '.run.lock'} was removed); "
                       "wait for that run to end or choose another directory")], res.stderr
    assert "stop requested" in first.output() and (out / "checkpoints").is_dir()


def test_the_world_is_untouched(world):
    """Last: the cases copied the runs, read the base and the data (restored after an edit)."""
    w = world["w"]
    assert hashes(*(w / k for k in (*KINDS, "base", "data", "mix"))) == world["hashes"]
