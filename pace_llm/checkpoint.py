"""Crash-safe checkpoints: DeepSpeed state plus ours, written aside and renamed into place.

Layout of ``<output_dir>/checkpoints/step-N/``::

    ds/                       DeepSpeed: adapter params, optimizer, scheduler (frozen base excluded)
    trainable.safetensors     every trainable tensor, gathered (resume checks DeepSpeed against it)
    rng-rank<r>.safetensors   each rank's torch RNG streams (CPU, and the accelerator's) → same noise
    history.safetensors       the ``fast``-mode output buffer (when used)
    state.json                step, data cursor, consecutive bad steps, world size
    MANIFEST.json             every file's size, written last

A checkpoint is first written to ``.tmp-step-N`` and renamed when complete; ``latest`` is
updated after the rename. Resume trusts a directory only if its manifest matches the files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pace_llm import distributed as D

MANIFEST = "MANIFEST.json"


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _write_manifest(path: Path) -> None:
    files = {str(p.relative_to(path)): p.stat().st_size
             for p in sorted(path.rglob("*")) if p.is_file()}
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(files, indent=1))
    os.replace(tmp, path / MANIFEST)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(engine: Any, root: Path, step: int, state: dict[str, Any],
         trainable: dict[str, torch.Tensor], history: torch.Tensor | None,
         keep_last: int, extra_writer=None) -> Path:
    """Write checkpoint ``step`` (collective: every rank calls it) and prune old ones.

    ``trainable`` must already be gathered (full tensors) on rank 0. ``extra_writer(dir)`` runs
    on every rank before the manifest (e.g. the PEFT adapter export).
    """
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if D.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    engine.save_checkpoint(str(tmp), tag="ds", save_latest=False, exclude_frozen_parameters=True)
    save_file(_rng_state(), str(tmp / f"rng-rank{D.rank()}.safetensors"))
    if extra_writer is not None:
        extra_writer(tmp)
    if D.is_main():
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        if history is not None:
            save_file({"history": history}, str(tmp / "history.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "world_size": D.world_size()}))
    D.barrier()
    if D.is_main():
        _write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write(root / "latest", final.name)
        for old in sorted(list_steps(root))[:-keep_last]:
            shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    D.barrier()
    return final


def list_steps(root: Path) -> list[int]:
    steps = []
    for p in root.glob("step-*") if root.is_dir() else []:
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit():
            steps.append(int(suffix))
    return sorted(steps)


def verify(path: Path) -> str | None:
    """None if the checkpoint is complete, else why not."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no MANIFEST.json (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())
        json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable manifest or state: {exc}"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"missing file {rel}"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {size} (truncated)"
    return None


def find_resumable(root: Path, log) -> Path | None:
    """The newest complete checkpoint under ``root``; incomplete ones are reported and skipped."""
    for step in reversed(list_steps(root)):
        path = root / f"step-{step}"
        problem = verify(path)
        if problem is None:
            return path
        log(f"skipping checkpoint {path}: {problem}")
    return None


def load(engine: Any, path: Path) -> tuple[dict[str, Any], torch.Tensor | None,
                                             dict[str, torch.Tensor]]:
    """Restore DeepSpeed state and this rank's RNG; return (state, history, trainable)."""
    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != D.world_size():
        from pace_llm.errors import UserError

        raise UserError(f"checkpoint {path} was written by {state['world_size']} ranks; resume it "
                        f"with the same number (this run has {D.world_size()})")
    # frozen base weights are not in the checkpoint (exclude_frozen_parameters); the trainable
    # ones are checked against trainable.safetensors by the caller
    load_path, _ = engine.load_checkpoint(str(path), tag="ds", load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        from pace_llm.errors import UserError

        raise UserError(f"DeepSpeed could not load the checkpoint in {path / 'ds'}")
    _set_rng_state(load_file(str(path / f"rng-rank{D.rank()}.safetensors")))
    hist_file = path / "history.safetensors"
    history = load_file(str(hist_file))["history"] if hist_file.is_file() else None
    trainable = load_file(str(path / "trainable.safetensors"))
    return state, history, trainable
