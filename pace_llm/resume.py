"""Saving the loop's place and continuing from it: what a checkpoint holds beyond the engine's
state (pace_llm/checkpoint.py writes and verifies the files), and the checks a resume runs.

A checkpoint's ``state.json`` holds the step, every rank's data cursor, the bad-step counts,
early stopping's state, the engine that wrote it and the recipe. A resume refuses a recipe that
changes shapes, data or what a step is, and another engine than the one that wrote it; it
applies optimizer and schedule changes for real; it checks the engine restored exactly the
trainable tensors of ``trainable.safetensors``; and it drops the metrics records past its step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

from pace_llm import checkpoint as ckpt
from pace_llm import distributed as D
from pace_llm.atomic import atomic_write
from pace_llm.data.batches import Cursor
from pace_llm.data.files import data_changes
from pace_llm.errors import UserError, bulleted
from pace_llm.objective import FastHistory
from pace_llm.results import EarlyStopping, write_adapter
from pace_llm.run import Run
from pace_llm.schedule import apply_schedule
from pace_llm.schema import recipe_to_dict


class Loop(Protocol):
    """What a checkpoint saves of the training loop and a resume sets back: the loop's state
    (pace_llm/trainer.py's ``Trainer`` is one; this module does not import it)."""

    run: Run
    step: int
    cursor: Cursor
    bad_in_a_row: int
    bad_total: int
    stopping: EarlyStopping
    history: FastHistory | None
    """``fast`` mode's output buffer."""
    metrics_file: Path

    def settle(self) -> None:
        """Read the skip outcome of every step taken so far into the bad-step counts."""

    def log(self, message: str) -> None:
        """A line on rank 0's console."""


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor, whole (gathered under ZeRO-3), on CPU (every rank calls)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with D.gathered([p for _, p in named]):
        return {n: p.detach().float().cpu().clone() for n, p in named}


def save_checkpoint(trainer: Loop) -> Path:
    """checkpoints/step-N of the trainer's current step (collective: every rank calls)."""
    run = trainer.run
    trainer.settle()  # the bad-step counts of the steps so far
    cursors = D.all_gather_objects([trainer.cursor.epoch, trainer.cursor.batch])
    state = {"step": trainer.step, "cursor": cursors[0], "cursors": cursors,
             "bad_in_a_row": trainer.bad_in_a_row, "bad_total": trainer.bad_total,
             **trainer.stopping.state(), "engine": run.engine["engine"],
             "recipe": recipe_to_dict(run.recipe), "data": run.task.identity}
    history = trainer.history.values if trainer.history is not None else None
    return ckpt.save(run.stepper, run.out / "checkpoints", trainer.step, state,
                     trainable_state(run.model), history, run.recipe.train.keep_last,
                     extra_writer=lambda d: write_adapter(run, d / "adapter", quiet=True))


def resume(trainer: Loop, path: Path) -> None:
    """Continue from a verified checkpoint (module docstring)."""
    run = trainer.run
    saved = ckpt.read_state(path)
    if saved.get("recipe") is None:
        raise UserError(f"checkpoint {path} records no recipe (written by an older "
                        "pace_llm); it cannot be checked against this one: start a new run")
    refused, applied = ckpt.recipe_changes(saved["recipe"], recipe_to_dict(run.recipe))
    if refused:
        raise UserError(bulleted(
            f"train.resume: checkpoint {path} was trained with other settings that change "
            "shapes, data or what a step is; nothing was changed. Resume with the checkpoint's "
            "values or start a new run (another train.output_dir or --train.overwrite true)",
            refused))
    _check_engine(path, saved, run.engine["engine"])
    _check_data(path, saved, run.task.identity, run.recipe.train.accept_data_change,
                trainer.log)
    state, history, trainable = ckpt.load(run.stepper, path)
    _check_trainable(path, trainable, trainable_state(run.model))
    if run.stepper.steps_taken() != state["step"]:
        raise UserError(f"checkpoint {path}: its state.json is of step {state['step']}, the "
                        f"engine's files of step {run.stepper.steps_taken()}; the checkpoint was "
                        "assembled from two saves: resume from another one")
    trainer.step = state["step"]
    trainer.cursor = _cursor(path, state, run)
    trainer.bad_in_a_row, trainer.bad_total = state["bad_in_a_row"], state["bad_total"]
    trainer.stopping.restore(state)
    if history is not None:
        trainer.history.values = history
    if applied:
        apply_schedule(run.stepper.optimizer, run.stepper.scheduler, run.recipe.train,
                       run.max_steps)
        trainer.log(f"resume: applied {'; '.join(applied)} (optimizer param groups and "
                    "schedule updated)")
    drop_metrics_after(trainer.metrics_file, trainer.step)
    trainer.log(f"resumed from {path} at step {trainer.step}")


def _check_engine(path: Path, saved: dict[str, Any], engine: str) -> None:
    """The checkpoint's engine state is this run's engine's. A checkpoint without the record
    predates the flat engine: DeepSpeed's format, readable only by DeepSpeed's engine and only
    if it was written on DeepSpeed's optimizer path."""
    written = saved.get("engine")
    if written is None:
        path_then = saved["recipe"].get("train", {}).get("optimizer_path", "deepspeed")
        if path_then == "deepspeed" and engine == "deepspeed":
            return
        raise UserError(f"checkpoint {path} was written by a pace_llm older than its flat "
                        "engine, in a format this version does not read; finish that run with "
                        "the version that started it, or start a new run (another "
                        "train.output_dir or --train.overwrite true)")
    if written != engine:
        raise UserError(f"checkpoint {path} holds the {written} engine's state, this run would "
                        f"run the {engine} engine; resume with the checkpoint's "
                        "train.optimizer_path, DeepSpeed config and train.precision")


def _check_trainable(path: Path, saved: dict[str, torch.Tensor],
                     current: dict[str, torch.Tensor]) -> None:
    """The engine restored exactly the trainable tensors recorded beside its state."""
    missing = sorted(set(saved) ^ set(current))
    if missing:
        raise UserError(f"checkpoint {path} does not match this model's trainable params: "
                        f"{missing[:5]}")
    for name, value in saved.items():
        if not torch.equal(current[name], value):
            raise UserError(f"checkpoint {path}: the engine restored {name} differently from "
                            "trainable.safetensors; the checkpoint is inconsistent")


def _check_data(path: Path, saved: dict[str, Any], now: dict[str, Any] | None, accept: bool,
                log) -> None:
    """The training data are those the checkpoint was trained on (pace_llm/data/files.py
    ``data_changes``), or ``train.accept_data_change`` says to go on with them as they are."""
    then = saved.get("data")
    if D.broadcast_object(then is None or now is None):
        log(f"resume: checkpoint {path} records no identity of its data (an older pace_llm); "
            "the data cannot be compared with what it was trained on")
        return
    changes = D.broadcast_object(data_changes(then, now))  # rank 0's view: every rank agrees
    if not changes:
        return
    if accept:
        log(f"resume: the data changed since {path} ({'; '.join(changes)}); "
            "train.accept_data_change: training goes on with the data as they are now")
        return
    raise UserError(bulleted(
        f"train.resume: the training data changed since checkpoint {path} was written, so the "
        "run would not see the examples an uninterrupted run sees; nothing was changed. Restore "
        "the data, or pass --train.accept_data_change true to go on with the data as they are "
        "now", changes))


def _cursor(path: Path, state: dict[str, Any], run: Any) -> Cursor:
    """The data cursor to go on from: the run's, or (streaming) this rank's own place in the
    stream (a checkpoint resumes with its own number of ranks: checked at load), placed in the
    batch order; a cursor outside its epoch (every rank checks its own) is refused."""
    raw = state.get("cursors" if run.task.streaming else "cursor")
    if run.task.streaming:
        raw = raw[D.rank()] if isinstance(raw, list) and len(raw) > D.rank() else None
    ok = (isinstance(raw, list) and len(raw) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in raw))
    problem = run.batches.seek(Cursor(*raw)) if ok else f"{raw!r} is not [epoch, position]"
    problems = [p for p in D.all_gather_objects(problem) if p]
    if problems:
        raise UserError(f"checkpoint {path}: its data cursor is outside the data: {problems[0]}; "
                        "the checkpoint does not belong to this data: resume from another one")
    return Cursor(*raw)


def drop_metrics_after(metrics_file: Path, step: int) -> None:
    """metrics.jsonl keeps each step once: records past the resumed step are redone (rank 0)."""
    if not D.is_main() or not metrics_file.is_file():
        return
    kept = [line for line in metrics_file.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write(metrics_file, "".join(line + "\n" for line in kept))
