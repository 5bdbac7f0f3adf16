"""Run pace_llm's entry point as N real ranks forked from the test process (gloo on CPU).

Forking keeps the imports already paid for; each child sets the rendezvous variables a launcher
would set, calls ``pace_llm.train.main`` and exits with its return code.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file
from tqdm import tqdm

from pace_llm.distributed import free_port


def warm_imports() -> None:
    """Import here, once, what every run imports on its way (DeepSpeed when the process group
    starts, matplotlib when the curves are drawn): each forked rank then finds them loaded
    instead of paying ~3 s and ~2 s of its own."""
    import deepspeed  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def own_locks() -> None:
    """A forked process gets its own tqdm write lock. tqdm's default is a multiprocessing lock
    that a fork shares with the test process: a rank killed (SIGKILL, as the crash tests do)
    while holding it would leave every later progress bar of the test process, and of every
    rank forked after it, waiting forever. (Launchers start fresh processes: no shared lock.)"""
    tqdm.set_lock(threading.RLock())


def _own_locks_then(target: Callable[..., None], *args) -> None:
    own_locks()
    target(*args)


def _child(argv: list[str], rank: int, world: int, port: int, log: str,
           file_size_limit: int | None = None) -> None:
    own_locks()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)  # not pytest's capture objects
    sys.stderr = os.fdopen(2, "w", buffering=1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # transformers converts dtypes while loading in worker threads; in a child forked after the
    # test process used torch's OpenMP pool, a parallel op off the main thread dies with "pool
    # INTERNAL ASSERT FAILED ... Invalid thread pool!" (fork-only: launchers start fresh
    # processes). Load on the main thread instead.
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    if file_size_limit is not None:  # a full disk, as a write can meet it: EFBIG past the limit
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    from pace_llm.train import main

    code = main(argv)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # main must leave the process group
        print("launch: pace_llm.train.main returned with the process group still up")
        code = code or 3
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Ranks:
    """The forked ranks of one run, with their logs."""

    def __init__(self, argv: list[str], world: int, logdir: Path,
                 file_size_limit: int | None = None):
        warm_imports()
        logdir.mkdir(parents=True, exist_ok=True)
        ctx = mp.get_context("fork")
        port = free_port()
        self.logs = [logdir / f"rank{r}.log" for r in range(world)]
        self.procs = [ctx.Process(target=_child, args=(argv, r, world, port, str(self.logs[r]),
                                                       file_size_limit))
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.time() + timeout
        for p in self.procs:
            p.join(max(1.0, deadline - time.time()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()
                raise TimeoutError(f"rank did not finish in {timeout}s:\n{self.output()}")
        return [p.exitcode for p in self.procs]

    def kill_when(self, condition: Callable[[], bool], timeout: float = 300) -> None:
        """SIGKILL every rank as soon as ``condition()`` holds."""
        deadline = time.time() + timeout
        while not condition():
            if time.time() > deadline or not any(p.is_alive() for p in self.procs):
                raise TimeoutError(f"condition never held:\n{self.output()}")
            time.sleep(0.02)
        for p in self.procs:
            os.kill(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.join()

    def signal(self, signum: int) -> None:
        for p in self.procs:
            os.kill(p.pid, signum)

    def output(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()}" for log in self.logs if log.exists())


def run(argv: list[str], world: int, logdir: Path, timeout: float = 300) -> tuple[list[int], str]:
    ranks = Ranks(argv, world, logdir)
    codes = ranks.wait(timeout)
    return codes, ranks.output()


def one_rank(target: Callable[..., None], *args, wait: float = 240,
             exitcode: int = 0) -> object:
    """``target(*args, pipe)`` in one forked rank (rank 0 of 1, a fresh rendezvous port) that
    sends one object through ``pipe``; returns that object once the child has exited with
    ``exitcode``. The environment of this process is left as it was."""
    warm_imports()
    ctx = mp.get_context("fork")
    receive, pipe = ctx.Pipe(duplex=False)  # sent before the child exits, unlike a Queue
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), HF_DEACTIVATE_ASYNC_LOAD="1")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        child = ctx.Process(target=_own_locks_then, args=(target, *args, pipe))
        child.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    assert receive.poll(wait), "the child rank sent nothing"
    got = receive.recv()
    child.join(60)
    assert child.exitcode == exitcode, child.exitcode
    return got


# ------------------------------------------------------------------ a tiny run and its records
ROOT = Path(__file__).resolve().parents[1]
DS = ROOT / "ds_configs"


def argv(base: Path, out: Path, **overrides) -> list[str]:
    """The command line of a tiny synthetic run on ``base`` into ``out`` (fp32, ZeRO-0, 10 steps
    of 4 rows, LoRA r 4, PACE off), with ``section__key=value`` overrides."""
    opts = {"model.name_or_path": str(base), "data.task": "synthetic", "data.num_examples": 160,
            "data.max_length": 128, "train.output_dir": str(out), "train.max_steps": 10,
            "train.micro_batch_size": 4, "train.grad_accum": 1, "train.lr": 5e-3,
            "train.warmup_steps": 2, "train.log_every": 1, "train.precision": "fp32",
            "eval.limit": 4, "eval.max_new_tokens": 4, "eval.batch_size": 4, "lora.r": 4,
            "lora.alpha": 8, "pace.mode": "off", "pace.sigma": 1.0,
            "pace.consistency_weight": 0.1, "deepspeed": str(DS / "zero0.json")}
    opts.update({k.replace("__", "."): v for k, v in overrides.items()})
    out_args = []
    for k, v in opts.items():
        text = "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
        out_args += [f"--{k}", text]
    return out_args


def metrics(out: Path) -> tuple[list[dict], list[dict]]:
    """(training records, eval records) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "task_loss" in r], [r for r in rows if "eval" in r]


def train_ok(base: Path, out: Path, world: int = 1, **overrides) -> tuple[list[dict], list[dict]]:
    """A run of :func:`argv` on ``world`` forked ranks that must exit 0; its metrics."""
    codes, log = run(argv(base, out, **overrides), world, out.parent / f"{out.name}-logs")
    assert codes == [0] * world, log
    return metrics(out)


def adapter_numel(run: Path) -> int:
    return sum(t.numel() for t in load_file(run / "adapter" / "adapter_model.safetensors").values())


def rel_close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return all(abs(x - y) <= tol * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def ckpt_exists(out: Path, step: int) -> Callable[[], bool]:
    """Whether checkpoint ``step`` of the run in ``out`` is complete (its manifest written)."""
    return lambda: (out / "checkpoints" / f"step-{step}" / "MANIFEST.json").exists()


# ------------------------------------------------------------------ a command in a forked child
def _put_first(path: list[str]) -> None:
    """Modules in the folders of ``path`` win over those installed (and already imported), as a
    fresh process with ``PYTHONPATH`` would see them (a fake tracker package, say)."""
    sys.path[:0] = path
    for folder in path:
        for entry in os.listdir(folder):
            name = entry.removesuffix(".py")
            for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
                del sys.modules[module]


def _cli_child(args: list[str], cwd: str, env: dict[str, str], out: str, err: str,
               path: list[str], before: Callable[[], None] | None = None) -> None:
    own_locks()
    _put_first(path)
    for path, fd in ((out, 1), (err, 2)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"  # see _child
    logging.root.handlers.clear()  # pytest's capture handlers: log records go to stderr, as in
    logging.root.setLevel(logging.WARNING)  # a fresh process
    if before is not None:  # the case's world in this child only (a mount, a file-size limit)
        before()
    from pace_llm import cli

    try:
        code = cli.main(args)
    except SystemExit as exc:  # a --help or an argparse exit
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BaseException:  # noqa: BLE001 - shown as Python would show it, exit 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 180,
        path: list[Path] = (), before: Callable[[], None] | None = None
        ) -> subprocess.CompletedProcess:
    """``pace-llm ARGS`` run in ``cwd`` with environment ``env``, as a child forked from the test
    process (its imports are paid once, not per command): the exit code and what it printed, as
    ``subprocess.run(..., capture_output=True, text=True)`` returns them. The environment must
    not change what the parent's imports already read (tests/conftest.py sets those). The
    modules in the folders of ``path`` replace installed ones (``PYTHONPATH`` for a fork);
    ``before()`` runs in the child first (what a case changes in that process only)."""
    warm_imports()
    ctx = mp.get_context("fork")
    logs = Path(tempfile.mkdtemp(prefix="cli-"))
    out, err = logs / "stdout", logs / "stderr"
    child = ctx.Process(target=_cli_child, args=(list(args), str(cwd), dict(env), str(out),
                                                 str(err), [str(p) for p in path], before))
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        raise TimeoutError(f"pace-llm {' '.join(args)} did not finish in {timeout}s:\n"
                           f"{err.read_text()[-3000:]}")
    result = subprocess.CompletedProcess(["pace-llm", *args], child.exitcode, out.read_text(),
                                         err.read_text())
    shutil.rmtree(logs, ignore_errors=True)
    return result
