"""Entry point: the training story.

    recipe → run directory → distributed → DeepSpeed config → tokenizer and data → base model
    → noisy LoRA → optimizer + deepspeed.initialize → train → export

    deepspeed pace_llm/train.py --recipe recipes/gsm8k.yaml [--section.key value ...]
    torchrun --nproc_per_node N pace_llm/train.py --recipe ...
    python pace_llm/train.py --recipe ...            (one process, no launcher)

``started(recipe)`` locks the run directory (pace_llm/rundir.py) and yields the trainer:
``setup`` builds every component of a run, each through a small named helper, in dependency
order; ``Trainer`` (pace_llm/trainer.py) runs the loop over what it built.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from typing import TYPE_CHECKING, Any  # noqa: E402

from pace_llm import components as C  # noqa: E402
from pace_llm.config import parse_command  # noqa: E402
from pace_llm.errors import run_command  # noqa: E402
from pace_llm.schema import Recipe, dump_recipe  # noqa: E402

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pace_llm.data import BatchPlan
    from pace_llm.objective import FastHistory
    from pace_llm.rundir import RunDir
    from pace_llm.tasks import TaskData
    from pace_llm.tracking import Tracker
    from pace_llm.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    """Run a recipe; bad input prints one message and returns 2 (no traceback)."""
    from pace_llm import distributed as D

    def body() -> None:
        from pace_llm.rundir import RunFinished

        command = parse_command(argv)
        if command.print_config:
            print(dump_recipe(command.recipe), end="")
            return
        try:
            run(command.recipe)
        except RunFinished as done:
            if D.is_main():
                print(f"[pace_llm] {done}", flush=True)

    return run_command(body, finish=lambda ok: D.shutdown(clean=ok))


def run(recipe: Recipe) -> Path:
    """The training story. Returns the run directory."""
    with started(recipe) as trainer:
        trainer.train()
        if trainer.step >= trainer.max_steps or trainer.early_stopped:
            finish(trainer.run, trainer)
    return trainer.run.out


@contextmanager
def started(recipe: Recipe) -> Iterator[Trainer]:
    """The process group, the locked run directory, the built run and its trainer (resumed
    if the recipe asks); the lock is released when the block ends."""
    from pace_llm import distributed as D
    from pace_llm.rundir import RunDir
    from pace_llm.tracking import check_installed

    D.init_distributed()
    check_installed(recipe.train.report_to)  # every rank: all exit 2 together
    rundir = RunDir(Path(recipe.train.output_dir))
    try:
        rundir.open(recipe.train.resume, recipe.train.overwrite, recipe.train.max_steps, _log)
        trainer = make_trainer(setup(recipe, rundir), rundir.plan.checkpoint)
        trainer.tracker = open_tracker(trainer.run, resumed=rundir.plan.checkpoint is not None)
        ok = False
        try:
            yield trainer
            ok = True
        finally:
            if trainer.tracker is not None:
                trainer.tracker.close(ok=ok)
    except BaseException:
        rundir.abandon()  # a start that failed before its commit leaves no trace
        raise
    finally:
        rundir.release()


def open_tracker(run: Run, resumed: bool) -> Tracker | None:
    """The experiment trackers of train.report_to, on rank 0 (a failure there fails every
    rank); a resumed run continues the same tracked runs."""
    from pace_llm import distributed as D
    from pace_llm.schema import recipe_to_dict
    from pace_llm.tracking import Tracker

    if not run.recipe.train.report_to:
        return None
    box: list[Tracker | None] = [None]

    def start() -> None:
        box[0] = Tracker.open(run.recipe.train.report_to, run.out, recipe_to_dict(run.recipe),
                              resumed=resumed)

    D.on_rank0(start)
    return box[0]


def _log(message: str) -> None:
    from pace_llm import distributed as D

    if D.is_main():
        print(f"[pace_llm] {message}", flush=True)


# ------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """Everything a training run is made of, built by :func:`setup`."""

    recipe: Recipe
    out: Path
    precision: str
    ds_config: dict[str, Any]
    tokenizer: Any
    task: TaskData
    model: nn.Module
    """The transformers model with NoisyLoRALinear layers (inside the objective)."""
    adapted: list[str]
    engine: Any
    """DeepSpeed's engine around the PaceObjective."""
    optimizer: torch.optim.Optimizer
    """Ours (it can skip a step); DeepSpeed steps it. FlatAdamW on the flat path."""
    scheduler: Any
    batches: BatchPlan
    max_steps: int
    history: FastHistory | None
    served_name: str
    """What the adapter records as its base: a hub id as given, a local directory absolute."""

    @property
    def causal(self) -> bool:
        return self.task.kind == "causal_lm"

    @property
    def zero_stage(self) -> int:
        from pace_llm.dsconfig import zero_stage

        return zero_stage(self.ds_config)

    @cached_property
    def collate(self) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """The training batch (padding, labels) of a list of examples: the task's collator."""
        from pace_llm.data import collator

        return collator(self.causal, self.tokenizer.pad_token_id,
                        regression=self.task.num_labels == 1,
                        multiple=self.pad_multiple)

    @property
    def pad_multiple(self) -> int:
        """data.pad_to_multiple_of, or 8 on a GPU and 1 on a CPU."""
        given = self.recipe.data.pad_to_multiple_of
        return given if given is not None else 8 if self.engine.device.type == "cuda" else 1

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, whole (gathered under ZeRO-3), on CPU (every rank calls)."""
        from pace_llm.distributed import gathered

        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        with gathered([p for _, p in named]):
            return {n: p.detach().float().cpu().clone() for n, p in named}

    def export_adapter(self, out_dir: Path, overwrite: bool = False, quiet: bool = False) -> None:
        """The PEFT-format adapter of the current weights (every rank calls; rank 0 writes)."""
        from pace_llm import distributed as D
        from pace_llm.dtypes import resolve
        from pace_llm.export import export_adapter
        from pace_llm.model import classifier_head
        from pace_llm.schema import recipe_to_dict

        export_adapter(self.model, out_dir, base_model_name_or_path=self.served_name,
                       task_type="CAUSAL_LM" if self.causal else "SEQ_CLS",
                       dtype=resolve(self.recipe.export.dtype, self.precision),
                       head_modules=[] if self.causal else classifier_head(self.model),
                       pace_info=recipe_to_dict(self.recipe), overwrite=overwrite)
        if not quiet and D.is_main():
            print(f"[pace_llm] adapter written: {out_dir}", flush=True)


def setup(recipe: Recipe, rundir: RunDir) -> Run:
    """Build every component of the run, in dependency order. A new run is built in its
    staging directory and takes the output directory's place (``rundir.commit``) only once
    everything loaded."""
    import deepspeed

    from pace_llm import distributed as D
    from pace_llm.dsconfig import (fill_ds_config, offloads_optimizer, resolve_precision,
                                   zero_stage)
    from pace_llm.flat_optim import engine_config, prepare_engine, uses_flat
    from pace_llm.inject import adapter_parameters
    from pace_llm.model import base_model_dir, check_model, load_tokenizer
    from pace_llm.objective import PaceObjective
    from pace_llm.optim import build_optimizer, build_scheduler
    from pace_llm.tasks import build_task

    precision = resolve_precision(recipe)  # bf16/fp16/fp32, decided once for every component
    ds_config = fill_ds_config(recipe, D.world_size(), precision)
    base_dir = C.ensure_base_model(recipe, rundir.path)
    tokenizer = load_tokenizer(base_dir, recipe)
    task = build_task(recipe.data, tokenizer)
    model = C.load_base(recipe, base_dir, task, tokenizer, precision, ds_config)
    check_model(recipe, model, tokenizer, task)  # ids vs embedding rows, lengths vs positions
    adapted = C.inject_adapters(recipe, model)
    rundir.check_space(sum(getattr(p, "ds_numel", p.numel()) for p in adapter_parameters(model)),
                       recipe.train.save_every)
    C.size_ds_buckets(ds_config, model)
    batches, max_steps = C.plan_batches(recipe, task)
    objective = PaceObjective(model, task.kind == "causal_lm", recipe.pace.consistency_on,
                              recipe.pace.task_loss_on, regression=task.num_labels == 1)
    params = adapter_parameters(model)
    flat = uses_flat(recipe.train.optimizer_path, zero_stage(ds_config), precision,
                     offloads_optimizer(ds_config), len({(p.dtype, p.device) for p in params}) == 1)
    optimizer = build_optimizer(params, recipe.train, ds_config, flat, D.world_size())
    scheduler = build_scheduler(optimizer, recipe.train, max_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=objective, optimizer=optimizer, lr_scheduler=scheduler,
        config=engine_config(ds_config) if flat else ds_config)
    if flat:
        prepare_engine(engine)
    if rundir.plan.mode != "resume":  # a resumed run records its recipe once resume accepts it
        C.record_recipe(recipe, ds_config, rundir.path)
    rundir.commit()
    out = rundir.out
    base_dir = base_model_dir(recipe, out)
    return Run(recipe=recipe, out=out, precision=precision, ds_config=ds_config,
               tokenizer=tokenizer, task=task, model=model, adapted=adapted, engine=engine,
               optimizer=optimizer, scheduler=scheduler, batches=batches, max_steps=max_steps,
               history=C.fast_history(recipe, task), served_name=C.served_name(base_dir))


def make_trainer(run: Run, checkpoint: str | None = None) -> Trainer:
    """The loop over a built run, resumed from ``checkpoint`` if given, with the noise stream
    seeded."""
    from pace_llm import distributed as D
    from pace_llm.trainer import Trainer

    trainer = Trainer(run, C.evaluator(run))
    trainer.log(f"{len(run.adapted)} layers adapted; {run.task.stats}; {run.max_steps} steps of "
                f"{run.batches.global_batch} examples; precision {run.precision}, "
                f"ZeRO-{run.zero_stage}, {D.world_size()} rank(s); optimizer "
                f"{type(run.optimizer).__name__}")
    if checkpoint is not None:
        trainer.resume(Path(checkpoint))
        C.record_recipe(run.recipe, run.ds_config, run.out)
    if trainer.step == 0:
        C.seed(run.recipe, "noise")
    return trainer


def finish(run: Run, trainer: Trainer) -> None:
    """After the last step: the adapter, the merged model if asked, the curves."""
    from pace_llm import distributed as D
    from pace_llm.plot import plot_metrics

    if trainer.early_stopped:  # the best evaluation's adapter is the run's result
        C.copy_dir(run.out / "adapter-best", run.out / "adapter")
    else:
        run.export_adapter(run.out / "adapter", overwrite=True)
    if run.recipe.export.merge and trainer.early_stopped:  # the best adapter onto the base
        from pace_llm.merge import merge_adapter_dir

        D.on_rank0(lambda: merge_adapter_dir(run.out / "adapter", run.out / "merged",
                                             base=run.served_name, recipe=run.recipe, dtype=None,
                                             overwrite=True))
        trainer.log(f"merged model written: {run.out / 'merged'}")
    elif run.recipe.export.merge:
        from pace_llm.merge import merge_and_save

        merge_and_save(run.model, run.out / "merged", tokenizer=run.tokenizer, overwrite=True)
        trainer.log(f"merged model written: {run.out / 'merged'}")
    if D.is_main():
        plot_metrics(run.out / "metrics.jsonl", run.out / "curves.png")
        trainer.log(f"done: recipe {run.out / 'recipe.yaml'}, metrics {run.out / 'metrics.jsonl'}, "
                    f"curves {run.out / 'curves.png'}, adapter {run.out / 'adapter'}")


if __name__ == "__main__":
    sys.exit(main())
