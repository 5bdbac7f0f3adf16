"""Crash-safe checkpoints: the engine's state plus ours, written aside and renamed into place.

Layout of ``<output_dir>/checkpoints/step-N/``::

    optimizer-rank<r>.safetensors, schedule.json
                              the flat engine: AdamW master and moments (per shard), schedule
    ds/                       or DeepSpeed's engine: adapter params, optimizer, scheduler (the
                              frozen base excluded; pace_llm/ds_engine.py reads it weights-only)
    trainable.safetensors     every trainable tensor, gathered (resume checks the engine against it)
    rng-rank<r>.safetensors   each rank's torch RNG streams (CPU, and the accelerator's) → same noise
    history.safetensors       the ``fast``-mode output buffer (when used)
    state.json                step, data cursor, consecutive bad steps, world size, the recipe
    MANIFEST.json             every file's size and SHA-256, written last

A checkpoint is first written to ``.tmp-step-N`` and renamed when complete; ``latest`` is
updated after the rename. Resume trusts a directory only if every file matches its manifest
entry (size and SHA-256) and no other file is there, and it never unpickles code: the flat
engine's files are safetensors and JSON, DeepSpeed's ``.pt`` files are read with
``torch.load(weights_only=True)`` allowing only DeepSpeed's own state types.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pace_llm import distributed as D
from pace_llm.atomic import atomic_write, fault_kind, fault_message
from pace_llm.errors import UserError
from pace_llm.schema import Recipe, recipe_to_dict

if TYPE_CHECKING:
    from pace_llm.stepper import Stepper

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 2  # 2: size and sha256 per file


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(path: Path) -> None:
    files = {str(p.relative_to(path)): {"size": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(path.rglob("*")) if p.is_file()}
    atomic_write(path / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "files": files},
                                             indent=1))


def save(stepper: Stepper, root: Path, step: int, state: dict[str, Any],
         trainable: dict[str, torch.Tensor], history: torch.Tensor | None,
         keep_last: int, extra_writer=None) -> Path:
    """Write checkpoint ``step`` (collective: every rank calls it) and prune old ones.

    ``trainable`` must already be gathered (full tensors) on rank 0. ``extra_writer(dir)`` runs
    on every rank before the manifest (e.g. the PEFT adapter export).
    """
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if root.is_symlink():  # every rank: all stop together
        raise UserError(f"{root} is a symbolic link (to {os.path.realpath(root)}); a run writes "
                        "its checkpoints inside its own directory: remove the link")
    if D.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    failure = None
    try:
        stepper.save(tmp)
        save_file(_rng_state(), str(tmp / f"rng-rank{D.rank()}.safetensors"))
        if extra_writer is not None:
            extra_writer(tmp)
        if D.is_main():
            save_file({k: v.contiguous() for k, v in trainable.items()},
                      str(tmp / "trainable.safetensors"))
            if history is not None:
                save_file({"history": history}, str(tmp / "history.safetensors"))
            (tmp / "state.json").write_text(json.dumps({**state, "world_size": D.world_size()}))
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save: RuntimeError
        failure = _write_failure(exc, tmp, root)
    failure = D.all_gather_objects(failure)
    if any(failure):
        if D.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(next(f for f in failure if f))
    D.barrier()
    if D.is_main():
        _write_manifest(tmp)
        if final.is_symlink():  # not the run's: the link goes, what it points to stays
            final.unlink()
        elif final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(root / "latest", final.name)
        for old in sorted(list_steps(root))[:-keep_last]:
            shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    D.barrier()
    return final


def _write_failure(exc: Exception, tmp: Path, root: Path) -> str:
    """The message for a checkpoint that could not be written: a filesystem fault (no space, a
    file-size limit, read-only, no permission: pace_llm/atomic.py tells them apart) or another
    OSError; anything else is raised as it is."""
    written = _checkpoint_bytes(tmp) if tmp.is_dir() else 0
    kind = fault_kind(exc, root)
    if kind is None:
        if isinstance(exc, OSError):
            return (f"cannot write checkpoint {tmp}: {exc.strerror or exc}; earlier checkpoints "
                    "are intact")
        raise exc
    earlier = list_steps(root)
    size = _checkpoint_bytes(root / f"step-{earlier[-1]}") if earlier else 0
    return (fault_message(kind, "checkpoint", tmp, need=size or None, written=written)
            + "; the partial checkpoint was removed and earlier checkpoints are intact (then "
            "resume with --train.resume auto)")


def _checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def step_of(path: Path) -> int:
    """The step a checkpoint directory was written at (``step-N``), -1 if not one."""
    suffix = path.name.split("-", 1)[-1]
    return int(suffix) if path.name.startswith("step-") and suffix.isdigit() else -1


def list_steps(root: Path, links: bool = False) -> list[int]:
    """The steps of the ``step-N`` directories under ``root``; symbolic links only with
    ``links`` (a link is never the run's own checkpoint: not counted, not pruned)."""
    steps = []
    for p in root.glob("step-*") if root.is_dir() and not root.is_symlink() else []:
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and (links or not p.is_symlink()):
            steps.append(int(suffix))
    return sorted(steps)


def _links(path: Path) -> list[str]:
    """Symbolic links in a checkpoint (the directory itself included), relative to it."""
    if path.is_symlink():
        return ["."]
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_symlink())


def verify(path: Path) -> str | None:
    """None if every file of the checkpoint matches its manifest (size, SHA-256), no file is
    there that the manifest does not list, nothing in it is a symbolic link (a link would make
    a resume read, or a pruning delete, outside the run) and its state.json is of its step;
    else why not. Nothing is unpickled here."""
    links = _links(path)
    if links:
        where = "the checkpoint directory" if links == ["."] else links[0]
        return (f"{where} is a symbolic link (to {os.path.realpath(path / links[0])}); a "
                "checkpoint holds only its own regular files")
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no MANIFEST.json (the save did not finish)"
    try:
        entry = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"unreadable MANIFEST.json: {exc}"
    if not isinstance(entry, dict) or entry.get("format") != MANIFEST_FORMAT \
            or not isinstance(entry.get("files"), dict):
        return ("MANIFEST.json has no SHA-256 per file (a checkpoint of an older pace_llm, or "
                "edited); it cannot be verified")
    return _files_problem(path, entry["files"]) or _state_problem(path)


def _files_problem(path: Path, files: dict[str, Any]) -> str | None:
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    extra = sorted(present - set(files))
    if extra:
        return f"{extra[0]} is not in MANIFEST.json (a file added after the save)"
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            return f"missing file {rel}"
        if not isinstance(meta, dict) or f.stat().st_size != meta.get("size"):
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {meta} (truncated)"
        if sha256(f) != meta.get("sha256"):
            return f"{rel} does not match its SHA-256 in MANIFEST.json (the file was changed)"
    return None


def _state_problem(path: Path) -> str | None:
    """state.json reads, and its step is the directory's (``step-N``: a checkpoint renamed or
    assembled from another's files is not one)."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"unreadable state.json: {exc}"
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"state.json holds no step (step: {step!r})"
    if step_of(path) >= 0 and step != step_of(path):
        return (f"state.json says step {step}, the directory is {path.name}: the checkpoint was "
                "renamed or assembled from another's files")
    return None


def find_resumable(root: Path, log) -> Path | None:
    """The newest complete checkpoint under ``root``; incomplete ones are reported and skipped."""
    if root.is_symlink():
        log(f"skipping {root}: a symbolic link (to {os.path.realpath(root)}); a run's "
            "checkpoints are inside its own directory")
        return None
    for step in reversed(list_steps(root, links=True)):
        path = root / f"step-{step}"
        problem = verify(path)
        if problem is None:
            return path
        log(f"skipping checkpoint {path}: {problem}")
    return None


def load(stepper: Stepper, path: Path) -> tuple[dict[str, Any], torch.Tensor | None,
                                                 dict[str, torch.Tensor]]:
    """Restore the engine's state and this rank's RNG; return (state, history, trainable)."""
    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != D.world_size():
        raise UserError(f"checkpoint {path} was written by {state['world_size']} ranks; resume it "
                        f"with the same number (this run has {D.world_size()})")
    stepper.load(path)  # the trainable tensors are checked against trainable.safetensors after
    _set_rng_state(load_file(str(path / f"rng-rank{D.rank()}.safetensors")))
    hist_file = path / "history.safetensors"
    history = load_file(str(hist_file))["history"] if hist_file.is_file() else None
    trainable = load_file(str(path / "trainable.safetensors"))
    return state, history, trainable


# recipe keys a checkpoint cannot continue under another value: they change shapes, data or
# what a step is (the ones listed by section cover the whole section)
FIXED_SECTIONS = ("model", "lora", "quant", "data")
FIXED_KEYS = ("pace.mode", "train.seed", "train.micro_batch_size", "train.grad_accum",
              "train.precision", "train.optimizer_path", "deepspeed")
SPEED_ONLY = ("data.num_proc", "data.cache_dir",  # how the tokens are made, not which
              "data.pad_to_multiple_of")  # and laid out (padding: shapes, not values)
# keys newer than some checkpoints whose behaviour then was not today's default: their value then
WAS = {"train.optimizer_path": "deepspeed"}  # before pace_llm/flat_optim.py
# keys that live in the optimizer and the schedule: applied to them on resume
OPTIMIZER_KEYS = ("train.lr", "train.weight_decay", "train.schedule", "train.warmup_steps",
                  "train.max_steps", "train.epochs")


def _flat(recipe: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}" if isinstance(body, dict) else section: value
            for section, body in recipe.items()
            for key, value in (body.items() if isinstance(body, dict) else [(None, body)])}


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]
                   ) -> tuple[list[str], list[str]]:
    """(refused, applied): the keys whose value differs from the checkpoint's recipe, as
    ``key old -> new``. Refused keys change shapes or data; applied keys are optimizer and
    schedule settings (the caller applies them); every other key (evaluation and logging
    cadence, σ and λ, paths) is read live from the recipe."""
    old, new = {**WAS, **_flat(saved)}, _flat(current)
    defaults = _flat(recipe_to_dict(Recipe()))
    refused, applied = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key not in old and new.get(key) == defaults.get(key):
            continue  # a key newer than the checkpoint, at its default: what it was then
        change = f"{key} {old.get(key)!r} -> {new.get(key)!r}"
        if key in SPEED_ONLY:
            continue
        if key.split(".")[0] in FIXED_SECTIONS or key in FIXED_KEYS:
            refused.append(change)
        elif key in OPTIMIZER_KEYS:
            applied.append(change)
    return refused, applied


def read_state(path: Path) -> dict[str, Any]:
    """state.json of a verified checkpoint (no tensors loaded)."""
    return json.loads((path / "state.json").read_text())
