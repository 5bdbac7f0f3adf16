"""Building a run, in dependency order: ``started(recipe)`` locks the run directory and yields
the trainer over ``build_run``'s :class:`~pace_llm.run.Run`.

    precision and DeepSpeed config → engine choice → base model files → tokenizer → data
    → base model → checks of model against data → noisy LoRA → batch order → objective
    → engine (optimizer, schedule) → records → commit → trainer (resumed) → tracker

Every ``torch.manual_seed`` of a run is here (:data:`SEEDS`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pace_llm import distributed as D
from pace_llm.atomic import atomic_dir, atomic_write
from pace_llm.data.batches import batch_order
from pace_llm.data.build import build_task, task_texts, trained_template
from pace_llm.data.collate import collator
from pace_llm.data.examples import TaskData
from pace_llm.dsconfig import (
    engine_for,
    fill_ds_config,
    offloads_optimizer,
    resolve_precision,
    save_json,
    size_buckets,
    zero_stage,
)
from pace_llm.evaluate import EvalContext, Evaluator
from pace_llm.inject import inject_noisy_lora, trainable_parameters
from pace_llm.model import base_model_dir, classifier_head, load_model, load_tokenizer, weight_dtype
from pace_llm.objective import FastHistory, PaceObjective
from pace_llm.model import check_model
from pace_llm.resume import resume
from pace_llm.run import Run
from pace_llm.rundir import RunDir, recipe_inputs
from pace_llm.schema import Recipe, dump_recipe, recipe_to_dict
from pace_llm.stepper import build_stepper, describe, require_deepspeed, summary
from pace_llm.tinymodel import build_base
from pace_llm.tracking import Tracker, check_installed
from pace_llm.trainer import Trainer

SEEDS = {
    # a new task head (GLUE) is initialised while the base model loads
    "model": lambda seed, rank: seed,
    # the adapters' A init: the same on every rank and at every world size
    "adapters": lambda seed, rank: seed,
    # the dropout stream (LoRA and base-model dropout): one per rank; restored from checkpoints
    # on resume. PACE's z does not use it: it is keyed by (train.seed, step, position in the
    # global batch, view), the same at any world size (pace_llm/noise.py)
    "noise": lambda seed, rank: seed + 1 + rank,
}


def seed(recipe: Recipe, stage: str) -> None:
    """Seed torch for one stage of the run."""
    torch.manual_seed(SEEDS[stage](recipe.train.seed, D.rank()))


@contextmanager
def started(recipe: Recipe) -> Iterator[Trainer]:
    """The process group, the locked run directory, the built run and its trainer (resumed if
    the recipe asks, with its trackers); the lock is released when the block ends, and a start
    that failed before its trackers opened leaves the directory as it was."""
    D.init_distributed()
    check_installed(recipe.train.report_to)  # every rank: all exit 2 together
    rundir = RunDir(Path(recipe.train.output_dir))
    try:
        rundir.open(recipe.train.resume, recipe.train.overwrite, recipe.train.max_steps, _log,
                    recipe_inputs(recipe))
        run = build_run(recipe, rundir)
        checkpoint = rundir.start.checkpoint
        tracker = _open_tracker(run, resumed=checkpoint is not None)
        rundir.settle()  # a failure from here on leaves the run in place
        ok = False
        try:
            yield _trainer(run, tracker, checkpoint)
            ok = True
        finally:
            if tracker is not None:
                tracker.close(ok=ok)
    except BaseException:
        rundir.abandon()
        raise
    finally:
        rundir.release()


def _log(message: str) -> None:
    if D.is_main():
        print(f"[pace_llm] {message}", flush=True)


def build_run(recipe: Recipe, rundir: RunDir) -> Run:
    """Every component of the run, in dependency order. A new run is built in its staging
    directory and takes the output directory's place (``rundir.commit``) once everything
    loaded."""
    precision = resolve_precision(recipe)  # bf16/fp16/fp32, decided once for every component
    ds_config = fill_ds_config(recipe, D.world_size(), precision)
    engine = _engine(recipe, ds_config, precision, uniform=True)  # before anything heavy
    base_dir = _ensure_base_model(recipe, rundir.path)
    tokenizer = load_tokenizer(base_dir, recipe)
    task = build_task(recipe.data, tokenizer)
    seed(recipe, "model")  # a new classification head is initialised while the model loads
    model = load_model(base_dir, recipe, causal=task.kind == "causal_lm",
                       num_labels=task.num_labels, pad_token_id=tokenizer.pad_token_id,
                       dtype=weight_dtype(recipe, precision), ds_config=ds_config)
    check_model(recipe, model, tokenizer, task)  # ids vs embedding rows, lengths vs positions
    seed(recipe, "adapters")
    adapted = inject_noisy_lora(model, recipe.lora, recipe.pace, classifier_head(model))
    params = trainable_parameters(model)
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    rundir.check_space(numel, recipe.train.save_every)
    # the flat engine needs one dtype and device for every trainable param: known only now
    engine = _engine(recipe, ds_config, precision, len({(p.dtype, p.device) for p in params}) == 1)
    if engine == "deepspeed":
        size_buckets(ds_config, numel)  # "auto" gradient buckets hold the adapter
    batches, max_steps = batch_order(task, recipe, D.world_size(), D.rank())
    objective = PaceObjective(model, task.kind == "causal_lm", recipe.pace.consistency_on,
                              recipe.pace.task_loss_on, regression=task.num_labels == 1)
    stepper = build_stepper(engine, objective, params, recipe, ds_config, max_steps, D.device(),
                            D.world_size())
    record = describe(engine, recipe, ds_config, precision, D.world_size(), params)
    if rundir.start.mode != "resume":  # a resumed run records its recipe once resume accepts it
        record_run(recipe, record, rundir.path)
    rundir.commit()
    given = recipe.data.pad_to_multiple_of  # else 8 on a GPU (tensor cores), 1 on a CPU
    multiple = given if given is not None else 8 if stepper.device.type == "cuda" else 1
    collate = collator(task.kind == "causal_lm", tokenizer.pad_token_id,
                       regression=task.num_labels == 1, multiple=multiple)
    return Run(recipe=recipe, out=rundir.out, precision=precision, engine=record,
               tokenizer=tokenizer, task=task, model=model, adapted=adapted,
               stepper=stepper, collate=collate, pad_multiple=multiple,
               batches=batches, max_steps=max_steps, history=_fast_history(recipe, task),
               served_name=_served_name(base_model_dir(recipe, rundir.out)),
               chat_template=trained_template(recipe.data, tokenizer))


def _engine(recipe: Recipe, ds_config: dict[str, Any], precision: str, uniform: bool) -> str:
    """flat or deepspeed (pace_llm/stepper.py); DeepSpeed's engine checks its version."""
    engine = engine_for(recipe.train.optimizer_path, zero_stage(ds_config), precision,
                        offloads_optimizer(ds_config), uniform)
    require_deepspeed(engine, ds_config, precision)
    return engine


def _ensure_base_model(recipe: Recipe, where: Path) -> str:
    """The base model directory; the offline demo's is built once by rank 0, in a temporary
    directory renamed into place when complete (a kill never leaves half a model)."""
    path = Path(base_model_dir(recipe, where))
    if recipe.model.build is not None and not (path / "config.json").is_file():

        def build() -> None:
            with atomic_dir(path, overwrite=True) as tmp:
                build_base(recipe.model.build, task_texts(recipe.data), tmp)

        D.on_rank0(build)
        D.barrier()
    return str(path)


def _fast_history(recipe: Recipe, task: TaskData) -> FastHistory | None:
    if recipe.pace.mode != "fast":
        return None
    return FastHistory(len(task.train), task.num_labels or 1)


def _served_name(base_dir: str) -> str:
    path = Path(base_dir)
    return str(path.resolve()) if path.is_dir() else base_dir


def record_run(recipe: Recipe, engine: dict[str, Any], where: Path) -> None:
    """Rank 0 writes the resolved recipe, engine.json (what runs) and, when DeepSpeed's engine
    runs, ds_config.json: the config it received. ``train.accept_data_change`` is a permission
    for this start only: recorded as false, so a later resume from recipe.yaml asks again."""
    if not D.is_main():
        return
    where.mkdir(parents=True, exist_ok=True)
    recorded = replace(recipe, train=replace(recipe.train, accept_data_change=False))
    atomic_write(where / "recipe.yaml", dump_recipe(recorded))
    atomic_write(where / "engine.json", json.dumps(engine, indent=2) + "\n")
    if engine["deepspeed_config"] is not None:
        save_json(engine["deepspeed_config"], where / "ds_config.json")
    else:  # a ds_config.json of an earlier run in this directory is not what this one ran
        (where / "ds_config.json").unlink(missing_ok=True)


def _open_tracker(run: Run, resumed: bool) -> Tracker | None:
    """The experiment trackers of train.report_to, on rank 0 (a failure there fails every
    rank); a resumed run continues the same tracked runs."""
    if not run.recipe.train.report_to:
        return None
    return D.on_rank0(lambda: Tracker.open(run.recipe.train.report_to, run.out,
                                           recipe_to_dict(run.recipe), resumed=resumed))


def _evaluator(run: Run) -> Evaluator:
    return Evaluator(EvalContext(
        model=run.model, objective=run.stepper.module, device=run.stepper.device,
        collate=run.collate, task=run.task, args=run.recipe.eval, tokenizer=run.tokenizer,
        grad_batch_size=run.recipe.train.micro_batch_size,
        whole_weights=run.stepper.whole_weights))


def _epochs(run: Run) -> str:
    """The length of the run in passes over the training set, for the start line."""
    if run.task.streaming:
        return " (a stream: its length in epochs is not known)"
    epochs = run.max_steps * run.batches.global_batch / max(len(run.task.train), 1)
    return f" = {epochs:.3g} epoch(s) of {len(run.task.train)} examples"


def _trainer(run: Run, tracker: Tracker | None, checkpoint: str | None) -> Trainer:
    """The loop over a built run, resumed from ``checkpoint`` if given, with the dropout
    stream seeded."""
    trainer = Trainer(run, _evaluator(run), tracker)
    trainer.log(f"{len(run.adapted)} layers adapted; {run.task.stats}; {run.max_steps} steps of "
                f"{run.batches.global_batch} examples{_epochs(run)}; {D.world_size()} rank(s); "
                f"{summary(run.engine)}")
    if checkpoint is not None:
        resume(trainer, Path(checkpoint))
        record_run(run.recipe, run.engine, run.out)
    if trainer.step == 0:
        seed(run.recipe, "noise")
    return trainer

