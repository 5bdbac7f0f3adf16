"""The run directory's guarantees (``train.output_dir``).

- One process at a time: rank 0 holds an exclusive lock, ``<parent>/.<name>.lock`` (``flock``;
  the holder's pid, host and command inside), for the whole run, and a lock on the directory it
  writes into (the staging directory, then the run): a second run into the same directory exits
  2 naming the first, even when the lock file was deleted meanwhile.
- Nothing of an existing run is changed before the new run is known to be good: a new run is
  staged in ``<parent>/.<name>.new/`` while its recipe, data, tokenizer, model and DeepSpeed
  config are checked and built; only then (``commit``) does it take the directory's place,
  replacing an old run (``train.overwrite``), which is kept aside (``<parent>/.<name>.old/``)
  until the start is complete (``settle``: its trackers are open). A start that fails before
  that leaves the directory as it found it (``abandon`` puts the old run back).
- Nothing is deleted that a run did not create: ``train.overwrite`` replaces only a directory
  that is recognisably a pace_llm run (its ``recipe.yaml``), holding only what a run writes and
  none of this run's inputs (model, data, DeepSpeed config, chat template); ``train.resume
  auto`` never replaces anything (no verified checkpoint: exit 2, nothing changed); a
  directory that is, or holds, the current directory is never replaced.
- A finished run (it has ``adapter/``) is final: ``train.resume`` on it says so and exits 0,
  unless the recipe raises ``train.max_steps`` above one of its verified checkpoints (the
  run is then extended from that checkpoint).
- A resumed run writes into its directory in place, from its newest verified checkpoint.
- ``train.output_dir`` that is a symbolic link is followed: the run is written where it points.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import yaml

from pace_llm import distributed as D
from pace_llm.atomic import inside
from pace_llm.checkpoint import find_resumable, step_of, verify
from pace_llm.errors import UserError, listing

if TYPE_CHECKING:
    from pace_llm.schema import Recipe

CHECKPOINT_BYTES_PER_ELEMENT = 24
RUN_ENTRIES = ("recipe.yaml", "engine.json", "ds_config.json", "metrics.jsonl", "curves.png",
               "adapter", "adapter-best", ".adapter-best", "merged", "checkpoints", "base_model",
               "tracking.json",
               "tensorboard", "wandb", "mlruns")
"""What a run writes at the top of its directory (pace_llm/setup.py, results.py, trainer.py,
tracking.py); with their temporaries (``NAME.tmp``, ``.NAME.tmp-*``, ``.NAME.old-*``)."""
_TEMPORARY = re.compile(r"^\.(?P<name>[^/]+?)\.(tmp|old)-.*$|^(?P<file>.+)\.tmp$")


class RunFinished(Exception):
    """The run asked to resume has already finished: nothing to do (exit 0)."""


@dataclass
class Start:
    """What this start does with the directory (rank 0 decides; every rank gets the same)."""

    mode: str
    """new (empty or absent directory), replace (overwrite), resume; committed once a new run
    has taken the directory's place, settled once its start is complete."""
    checkpoint: str | None = None
    """The checkpoint to resume from (resume only)."""


def run_written(name: str) -> bool:
    """Whether a top-level entry of a run directory is one a run writes."""
    if name in RUN_ENTRIES:
        return True
    found = _TEMPORARY.match(name)
    return bool(found) and (found["name"] or found["file"]) in RUN_ENTRIES


def _foreign(directory: Path) -> list[str]:
    """The entries at the top of ``directory`` that no run writes, sorted."""
    return sorted(p.name for p in directory.iterdir() if not run_written(p.name))


def is_run(path: Path) -> bool:
    """Whether ``path`` is recognisably a pace_llm run: its recipe.yaml is a recorded recipe."""
    try:
        recipe = yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(recipe, dict) and isinstance(recipe.get("train"), dict)


def recipe_inputs(recipe: Recipe) -> list[tuple[str, str]]:
    """(recipe key, path) of every local file or directory the run reads: the model (and its
    tokenizer), the data, the evaluation data, each mixture source's, the chat template file,
    the DeepSpeed config. Hub ids and missing paths are left out."""
    d = recipe.data
    given = [("model.name_or_path", recipe.model.name_or_path), ("data.path", d.path),
             ("data.eval_path", d.eval_path), ("data.chat_template", d.chat_template),
             ("deepspeed", recipe.deepspeed)]
    for i, item in enumerate(d.mix or []):
        if isinstance(item, dict):
            given += [(f"data.mix[{i}].{k}", item.get(k)) for k in ("path", "eval_path",
                                                                   "chat_template")]
    return [(key, str(value)) for key, value in given
            if isinstance(value, str) and value and Path(value).expanduser().exists()]


def _probe(path: Path) -> bool:
    """Whether a directory is locked by a running start (it is then left alone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class RunDir:
    """The directory of one run, locked for the process's lifetime (rank 0)."""

    def __init__(self, out: Path):
        self._place(Path(out).expanduser().absolute())  # "." is the current directory's path
        self.start = Start("new")
        self._lock: IO[str] | None = None
        self._dir_lock: int | None = None
        self._staged = False  # this start made the staging directory (abandon removes it)

    def _place(self, out: Path) -> None:
        self.out = out
        self.staging = out.parent / f".{out.name}.new"
        self.lock_file = out.parent / f".{out.name}.lock"
        self.old = out.parent / f".{out.name}.old"

    @property
    def path(self) -> Path:
        """Where the run writes now: a new run's staging directory until ``commit``."""
        return self.staging if self.start.mode in ("new", "replace") else self.out

    # ------------------------------------------------------------------ opening
    def open(self, resume: str | None, overwrite: bool, max_steps: int, log,
             inputs: list[tuple[str, str]] = ()) -> Start:
        """Lock and decide (every rank calls; rank 0 decides). ``inputs``: the (key, path) of
        what the run reads (:func:`recipe_inputs`), never replaced. Raises UserError (exit 2) or
        RunFinished."""
        def decide() -> tuple[Start | None, Path, str | None]:  # (start, out, RunFinished's)
            self._follow_link(log)
            self._acquire()
            try:
                start = self._decide(resume, overwrite, max_steps, log, list(inputs))
            except RunFinished as done:
                return None, self.out, str(done)
            self._lock_dir(start)
            return start, self.out, None

        start, out, finished = D.broadcast_object(D.on_rank0(decide))
        self._place(out)
        if finished is not None:
            raise RunFinished(finished)
        self.start = start
        return start

    def _follow_link(self, log) -> None:
        if not self.out.is_symlink():
            return
        try:
            target = self.out.resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # a loop of links
            raise UserError(f"train.output_dir: {self.out} is a symbolic link that cannot be "
                            f"followed ({exc}); give a directory") from None
        log(f"train.output_dir: {self.out} is a symbolic link; the run is written where it "
            f"points, {target}")
        self._place(target)

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
        for busy in (self.out, self.staging):  # locked by a run whose lock file was deleted
            if _probe(busy):
                raise UserError(f"train.output_dir: {self.out} is in use by another run (it "
                                f"holds a lock on {busy}; its lock file {self.lock_file} was "
                                "removed); wait for that run to end or choose another directory")

    def _decide(self, resume: str | None, overwrite: bool, max_steps: int, log,
                inputs: list[tuple[str, str]]) -> Start:
        if self._left(self.staging, "its staging directory"):  # killed before its commit
            shutil.rmtree(self.staging)
        if resume and resume != "auto":  # a named checkpoint must verify, wherever it is
            problem = verify(Path(resume))
            if problem:
                raise UserError(f"train.resume: {resume} is not a complete checkpoint: {problem}")
        has_files = self.out.is_dir() and any(self.out.iterdir())
        if not has_files:
            start = Start("resume", resume) if resume and resume != "auto" else Start("new")
        elif resume:
            start = self._resume(resume, max_steps, log)
        elif overwrite:
            self._check_replaceable(inputs)
            start = Start("replace")
        else:
            raise UserError(f"train.output_dir: {self.out} is not empty; nothing was changed. "
                            "Pass --train.resume auto to continue that run, --train.overwrite "
                            "true to replace it, or choose another directory")
        if start.mode != "resume":  # a start that commits: it takes the directory's place
            if inside(Path.cwd().resolve(), self.out.resolve()):
                raise UserError(f"train.output_dir: {self.out} is the current directory, or "
                                "holds it; a new run takes its directory's place as a whole: "
                                "give a directory below this one (e.g. runs/NAME) or run from "
                                "elsewhere")
            self._left(self.old, "the run it replaces")  # commit removes what a killed one left
        return start

    def _left(self, path: Path, kept: str) -> bool:
        """Whether ``path`` (beside the run: ``.NAME.new`` or ``.NAME.old``, where a start keeps
        ``kept``) is there, left by a killed start: a directory holding only what a run writes.
        Anything else by that name is the user's: exit 2, nothing changed."""
        if not (path.exists() or path.is_symlink()):
            return False
        if path.is_symlink() or not path.is_dir():
            found = "a symbolic link" if path.is_symlink() else "a file"
        else:
            foreign = _foreign(path)
            found = f"a directory holding {listing(foreign)}, which no run writes" if foreign \
                else ""
        if found:
            raise UserError(f"train.output_dir: {path} is where a start of {self.out} keeps "
                            f"{kept}, but it is {found}; nothing was changed: move it away, or "
                            "choose another train.output_dir")
        return True

    def _resume(self, resume: str, max_steps: int, log) -> Start:
        """Resume the run in the directory: its newest verified checkpoint (auto) or the named
        one; a finished run is final; no checkpoint: exit 2, nothing changed."""
        if not is_run(self.out):
            raise UserError(f"train.resume: {self.out} is not a pace_llm run (no recipe.yaml; "
                            f"it holds {listing(sorted(p.name for p in self.out.iterdir()))}); "
                            "nothing was changed: give the run's directory as train.output_dir")
        finished = (self.out / "adapter" / "adapter_config.json").is_file()
        found = (find_resumable(self.out / "checkpoints", log) if resume == "auto"
                 else Path(resume))
        if finished and (found is None or step_of(found) >= max_steps):
            raise RunFinished(f"{self.out} is a finished run (it has its final adapter); "
                              "nothing to resume, nothing changed. To train it longer, raise "
                              "--train.max_steps above one of its checkpoints; to train "
                              "again, use another train.output_dir or --train.overwrite true")
        if found is None:
            raise UserError(f"train.resume auto: {self.out} has no checkpoint that verifies "
                            "(each one is named above); nothing was changed. To start it again "
                            "from step 0, replacing it: --train.overwrite true without "
                            "--train.resume; or choose another train.output_dir")
        return Start("resume", str(found))

    def _check_replaceable(self, inputs: list[tuple[str, str]]) -> None:
        """``train.overwrite`` deletes only what a run wrote, and none of this run's inputs."""
        out = self.out.resolve()
        for key, path in inputs:
            if inside(Path(path).expanduser().resolve(), out):
                raise UserError(f"train.overwrite: {key} {path} lies inside {self.out}, the "
                                "directory a new run would replace; nothing was changed: choose "
                                "another train.output_dir (or move the input out)")
        if not is_run(self.out):
            inside_ = listing(sorted(p.name for p in self.out.iterdir()))
            raise UserError(f"train.overwrite: {self.out} is not a pace_llm run (no recipe.yaml; "
                            f"it holds {inside_}); overwrite replaces only a run: nothing was "
                            "changed, choose another train.output_dir")
        foreign = _foreign(self.out)
        if foreign:
            raise UserError(f"train.overwrite: {self.out} holds {listing(foreign)}, which no "
                            "run writes; overwrite would delete it: nothing was changed, move "
                            "it out or choose another train.output_dir")

    def _lock_dir(self, start: Start) -> None:
        """Lock the directory this start writes into (the staging one becomes the run)."""
        where = self.out if start.mode == "resume" else self.staging
        where.mkdir(parents=True, exist_ok=True)
        self._staged = where == self.staging
        fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._dir_lock = fd

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
            if self.old.exists():  # left by a start killed before it settled (_decide: a run's)
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
        if self.start.mode in ("new", "replace") and self._staged:
            shutil.rmtree(self.staging, ignore_errors=True)
        elif self.start.mode == "committed":
            shutil.rmtree(self.out, ignore_errors=True)
            if self.old.exists():
                os.replace(self.old, self.out)

    def release(self) -> None:
        """Drop the locks (rank 0); the lock file goes with them, if it is still this run's."""
        if self._dir_lock is not None:
            os.close(self._dir_lock)
            self._dir_lock = None
        if self._lock is None:
            return
        try:
            if _same_file(self._lock, self.lock_file):
                self.lock_file.unlink()
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def _same_file(handle: IO[Any], path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False
