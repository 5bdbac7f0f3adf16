"""The run directory's guarantees (``train.output_dir``).

- One process at a time: rank 0 holds an exclusive lock, ``<parent>/.<name>.lock`` (``flock``;
  the holder's pid, host and command inside), for the whole run; a second run into the same
  directory exits 2 naming the first.
- Nothing of an existing run is changed before the new run is known to be good: a new run is
  staged in ``<parent>/.<name>.new/`` while its recipe, data, tokenizer, model and DeepSpeed
  config are checked and built; only then (``commit``) does it take the directory's place,
  replacing an old run (``train.overwrite``), which is kept aside (``<parent>/.<name>.old/``)
  until the start is complete (``settle``: its trackers are open). A start that fails before
  that leaves the directory as it found it (``abandon`` puts the old run back).
- A finished run (it has ``adapter/``) is final: ``train.resume`` on it says so and exits 0,
  unless the recipe raises ``train.max_steps`` above one of its verified checkpoints (the
  run is then extended from that checkpoint).
- A resumed run writes into its directory in place, from its newest verified checkpoint.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pace_llm import distributed as D
from pace_llm.checkpoint import find_resumable, step_of, verify
from pace_llm.errors import UserError


CHECKPOINT_BYTES_PER_ELEMENT = 24


class RunFinished(Exception):
    """The run asked to resume has already finished: nothing to do (exit 0)."""


@dataclass
class Start:
    """What this start does with the directory (rank 0 decides; every rank gets the same)."""

    mode: str
    """new (empty or absent directory), replace (overwrite / restart), resume; committed once
    a new run has taken the directory's place, settled once its start is complete."""
    checkpoint: str | None = None
    """The checkpoint to resume from (resume only)."""


class RunDir:
    """The directory of one run, locked for the process's lifetime (rank 0)."""

    def __init__(self, out: Path):
        self.out = out
        self.staging = out.parent / f".{out.name}.new"
        self.lock_file = out.parent / f".{out.name}.lock"
        self.old = out.parent / f".{out.name}.old"
        self.start = Start("new")
        self._lock: IO[str] | None = None

    @property
    def path(self) -> Path:
        """Where the run writes now: a new run's staging directory until ``commit``."""
        return self.staging if self.start.mode in ("new", "replace") else self.out

    # ------------------------------------------------------------------ opening
    def open(self, resume: str | None, overwrite: bool, max_steps: int, log) -> Start:
        """Lock and decide (every rank calls; rank 0 decides). Raises UserError (exit 2) or
        RunFinished."""
        def decide() -> tuple[Start | None, str | None]:  # (start, message of a RunFinished)
            self._acquire()
            try:
                return self._decide(resume, overwrite, max_steps, log), None
            except RunFinished as done:
                return None, str(done)

        start, finished = D.broadcast_object(D.on_rank0(decide))
        if finished is not None:
            raise RunFinished(finished)
        self.start = start
        return start

    def _acquire(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"train.output_dir: {self.out} is a file; give a directory")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.lock_file, "a+")  # noqa: SIM115 (held until release)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"train.output_dir: a parent of {self.out} is a file; give a path "
                            "inside a directory") from None
        except OSError as exc:
            raise UserError(f"train.output_dir: cannot write in {self.out.parent} "
                            f"({exc.strerror}); choose a writable directory") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"train.output_dir: {self.out} is in use by {holder}; wait for that "
                            "run to end or choose another directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:300]}\n")
        handle.flush()
        self._lock = handle

    def _decide(self, resume: str | None, overwrite: bool, max_steps: int, log) -> Start:
        if self.staging.exists():  # left by a start that was killed before its commit
            shutil.rmtree(self.staging)
        if resume and resume != "auto":  # a named checkpoint must verify, wherever it is
            problem = verify(Path(resume))
            if problem:
                raise UserError(f"train.resume: {resume} is not a complete checkpoint: {problem}")
        has_files = self.out.is_dir() and any(self.out.iterdir())
        if not has_files:
            return Start("resume", resume) if resume and resume != "auto" else Start("new")
        if resume:
            finished = (self.out / "adapter" / "adapter_config.json").is_file()
            found = (find_resumable(self.out / "checkpoints", log) if resume == "auto"
                     else Path(resume))
            if finished and (found is None or step_of(found) >= max_steps):
                raise RunFinished(f"{self.out} is a finished run (it has its final adapter); "
                                  "nothing to resume, nothing changed. To train it longer, raise "
                                  "--train.max_steps above one of its checkpoints; to train "
                                  "again, use another train.output_dir or --train.overwrite true")
            if resume == "auto":
                if found is not None:
                    return Start("resume", str(found))
                log(f"train.resume auto: {self.out} has no complete checkpoint; the run starts "
                    "again from step 0 and replaces it once its data and model have loaded")
                return Start("replace")
            return Start("resume", resume)
        if overwrite:
            return Start("replace")
        raise UserError(f"train.output_dir: {self.out} is not empty; nothing was changed. Pass "
                        "--train.resume auto to continue that run, --train.overwrite true to "
                        "replace it, or choose another directory")

    def check_space(self, trainable: int, save_every: int) -> None:
        """Refuse to start when a checkpoint cannot fit (rank 0; save_every > 0 only): about 24
        bytes per trainable element (fp32 weights, Adam's two moments, the gathered copy, the
        adapter export)."""
        if save_every <= 0:
            return

        def check() -> None:
            need = CHECKPOINT_BYTES_PER_ELEMENT * trainable
            free = shutil.disk_usage(self.out.parent).free
            if free < need:
                raise UserError(f"train.save_every: a checkpoint of this run needs about {need} "
                                f"bytes, but {self.out.parent} has {free} bytes free; free "
                                "space or write the run elsewhere (--train.output_dir)")

        D.on_rank0(check)

    # ------------------------------------------------------------------ closing
    def commit(self) -> None:
        """Put the staged run in the directory's place (every rank calls; rank 0 moves); what
        was there is kept aside until :meth:`settle`."""
        if self.start.mode == "resume":
            return
        D.barrier()  # every rank has loaded what it needs from the staging directory

        def move() -> None:
            if self.old.exists():  # left by a start killed between its commit and settle
                shutil.rmtree(self.old)
            if self.out.exists():
                os.replace(self.out, self.old)
            os.replace(self.staging, self.out)

        D.on_rank0(move)
        self.start = Start("committed")
        D.barrier()

    def settle(self) -> None:
        """The start is complete (its trackers opened): drop what the commit kept aside (rank 0).
        From here on a failure leaves the run in place (its checkpoints)."""
        if self.start.mode == "committed":
            if D.is_main() and self.old.exists():
                shutil.rmtree(self.old)
            self.start = Start("settled")

    def abandon(self) -> None:
        """After a failed start: remove what this start staged, or undo its commit: the new run
        removed, the directory that was there put back (rank 0)."""
        if not D.is_main():
            return
        if self.start.mode in ("new", "replace") and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        elif self.start.mode == "committed":
            shutil.rmtree(self.out, ignore_errors=True)
            if self.old.exists():
                os.replace(self.old, self.out)

    def release(self) -> None:
        """Drop the lock (rank 0); the lock file goes with it."""
        if self._lock is None:
            return
        try:
            self.lock_file.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
