"""Run pace_llm's entry point as N real ranks forked from the test process (gloo on CPU).

Forking keeps the imports already paid for; each child sets the rendezvous variables a launcher
would set, calls ``pace_llm.train.main`` and exits with its return code.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pace_llm.distributed import free_port


def _child(argv: list[str], rank: int, world: int, port: int, log: str,
           file_size_limit: int | None = None) -> None:
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
    ctx = mp.get_context("fork")
    receive, pipe = ctx.Pipe(duplex=False)  # sent before the child exits, unlike a Queue
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), HF_DEACTIVATE_ASYNC_LOAD="1")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        child = ctx.Process(target=target, args=(*args, pipe))
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
