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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from typing import TYPE_CHECKING, Any  # noqa: E402

from pace_llm.config import Recipe, dump_recipe, parse_command  # noqa: E402
from pace_llm.errors import UserError, run_command  # noqa: E402

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pace_llm.data import BatchPlan
    from pace_llm.evaluate import Evaluator
    from pace_llm.objective import FastHistory
    from pace_llm.rundir import RunDir
    from pace_llm.tasks import TaskData
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

    D.init_distributed()
    rundir = RunDir(Path(recipe.train.output_dir))
    try:
        rundir.open(recipe.train.resume, recipe.train.overwrite, recipe.train.max_steps, _log)
        yield make_trainer(setup(recipe, rundir), rundir.plan.checkpoint)
    except BaseException:
        rundir.abandon()  # a start that failed before its commit leaves no trace
        raise
    finally:
        rundir.release()


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
    """Ours (it can skip a step); DeepSpeed steps it."""
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

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """A training batch (padding, labels) of these examples."""
        from pace_llm.data import collator

        return collator(self.causal, self.tokenizer.pad_token_id,
                        regression=self.task.num_labels == 1)(examples)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, whole (gathered under ZeRO-3), on CPU (every rank calls)."""
        from pace_llm.distributed import gathered

        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        with gathered([p for _, p in named]):
            return {n: p.detach().float().cpu().clone() for n, p in named}

    def export_adapter(self, out_dir: Path, overwrite: bool = False, quiet: bool = False) -> None:
        """The PEFT-format adapter of the current weights (every rank calls; rank 0 writes)."""
        from pace_llm import distributed as D
        from pace_llm.config import recipe_to_dict
        from pace_llm.dtypes import resolve
        from pace_llm.export import export_adapter
        from pace_llm.model import classifier_head

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
    from pace_llm.dsconfig import fill_ds_config, resolve_precision
    from pace_llm.inject import adapter_parameters
    from pace_llm.model import base_model_dir, load_tokenizer
    from pace_llm.objective import PaceObjective
    from pace_llm.optim import build_optimizer, build_scheduler
    from pace_llm.tasks import build_task

    precision = resolve_precision(recipe)  # bf16/fp16/fp32, decided once for every component
    ds_config = fill_ds_config(recipe, D.world_size(), precision)
    check_quant(recipe, ds_config)
    base_dir = ensure_base_model(recipe, rundir.path)
    tokenizer = load_tokenizer(base_dir, recipe)
    task = build_task(recipe.data, tokenizer)
    model = load_base(recipe, base_dir, task, tokenizer, precision, ds_config)
    adapted = inject_adapters(recipe, model)
    rundir.check_space(sum(getattr(p, "ds_numel", p.numel()) for p in adapter_parameters(model)),
                       recipe.train.save_every)
    size_ds_buckets(ds_config, model)
    batches, max_steps = plan_batches(recipe, task)
    objective = PaceObjective(model, task.kind == "causal_lm", recipe.pace.consistency_on,
                              recipe.pace.task_loss_on, regression=task.num_labels == 1)
    optimizer = build_optimizer(adapter_parameters(model), recipe.train, ds_config)
    scheduler = build_scheduler(optimizer, recipe.train, max_steps)
    engine, _, _, scheduler = deepspeed.initialize(model=objective, optimizer=optimizer,
                                                   lr_scheduler=scheduler, config=ds_config)
    if rundir.plan.mode != "resume":  # a resumed run records its recipe once resume accepts it
        record_recipe(recipe, ds_config, rundir.path)
    rundir.commit()
    out = rundir.out
    base_dir = base_model_dir(recipe, out)
    return Run(recipe=recipe, out=out, precision=precision, ds_config=ds_config,
               tokenizer=tokenizer, task=task, model=model, adapted=adapted, engine=engine,
               optimizer=optimizer, scheduler=scheduler, batches=batches, max_steps=max_steps,
               history=_fast_history(recipe, task), served_name=_served_name(base_dir))


def make_trainer(run: Run, checkpoint: str | None = None) -> Trainer:
    """The loop over a built run, resumed from ``checkpoint`` if given, with the noise stream
    seeded."""
    from pace_llm import distributed as D
    from pace_llm.trainer import Trainer

    trainer = Trainer(run, _evaluator(run))
    trainer.log(f"{len(run.adapted)} layers adapted; {run.task.stats}; {run.max_steps} steps of "
                f"{run.batches.global_batch} examples; precision {run.precision}, "
                f"ZeRO-{run.zero_stage}, {D.world_size()} rank(s)")
    if checkpoint is not None:
        trainer.resume(Path(checkpoint))
        record_recipe(run.recipe, run.ds_config, run.out)
    if trainer.step == 0:
        seed(run.recipe, "noise")
    return trainer


def finish(run: Run, trainer: Trainer) -> None:
    """After the last step: the adapter, the merged model if asked, the curves."""
    from pace_llm import distributed as D
    from pace_llm.plot import plot_metrics

    if trainer.early_stopped:  # the best evaluation's adapter is the run's result
        _copy_dir(run.out / "adapter-best", run.out / "adapter")
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


def _copy_dir(src: Path, dst: Path) -> None:
    """A copy of an exported directory, written atomically (rank 0)."""
    import shutil

    from pace_llm import distributed as D
    from pace_llm.export import atomic_dir

    def copy() -> None:
        with atomic_dir(dst, overwrite=True) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)

    D.on_rank0(copy)


# --------------------------------------------------------------------------------- the seeds
SEEDS = {
    # a new task head (GLUE) is initialised while the base model loads
    "model": lambda seed, rank: seed,
    # the adapters' A init: the same on every rank and at every world size
    "adapters": lambda seed, rank: seed,
    # the PACE noise and dropout stream: one per rank; restored from checkpoints on resume
    "noise": lambda seed, rank: seed + 1 + rank,
}


def seed(recipe: Recipe, stage: str) -> None:
    """Seed torch for one stage of the run (every seed of a run is set here)."""
    import torch

    from pace_llm import distributed as D

    torch.manual_seed(SEEDS[stage](recipe.train.seed, D.rank()))


# ------------------------------------------------------------------------- setup's helpers
def check_quant(recipe: Recipe, ds_config: dict) -> None:
    """QLoRA's rules (bitsandbytes present, ZeRO-3 limits, storage dtype) before any load."""
    from pace_llm.dsconfig import zero_stage
    from pace_llm.quant import quant_bits, quant_problems

    if quant_bits(recipe.quant) is None:
        return
    problems = quant_problems(recipe, zero_stage(ds_config))
    if problems:
        raise UserError("quantization problems:\n" + "\n".join(f"  - {p}" for p in problems))


def record_recipe(recipe: Recipe, ds_config: dict, where: Path) -> None:
    """Rank 0 writes the resolved recipe and the DeepSpeed config DeepSpeed got."""
    from pace_llm import distributed as D
    from pace_llm.dsconfig import save_json

    if D.is_main():
        where.mkdir(parents=True, exist_ok=True)
        _atomic_write(where / "recipe.yaml", dump_recipe(recipe))
        save_json(ds_config, where / "ds_config.json")


def _atomic_write(path: Path, text: str) -> None:
    import os

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def ensure_base_model(recipe: Recipe, where: Path) -> str:
    """The base model directory; the offline demo's is built once by rank 0, in a temporary
    directory renamed into place when complete (a kill never leaves half a model)."""
    import os
    import shutil

    from pace_llm import distributed as D
    from pace_llm.model import base_model_dir

    path = Path(base_model_dir(recipe, where))
    if recipe.model.build is not None and not (path / "config.json").is_file():

        def build() -> None:
            from pace_llm.tasks import task_texts
            from pace_llm.tinymodel import build_base

            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            build_base(recipe.model.build, task_texts(recipe.data), tmp)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)

        D.on_rank0(build)
        D.barrier()
    return str(path)


def load_base(recipe: Recipe, base_dir: str, task: TaskData, tokenizer: Any, precision: str,
              ds_config: dict) -> nn.Module:
    """The frozen base model for the task's kind (partitioned while loading under ZeRO-3)."""
    from pace_llm.model import load_model, weight_dtype

    seed(recipe, "model")
    return load_model(base_dir, recipe, causal=task.kind == "causal_lm",
                      num_labels=task.num_labels, pad_token_id=tokenizer.pad_token_id,
                      dtype=weight_dtype(recipe, precision), ds_config=ds_config)


def inject_adapters(recipe: Recipe, model: nn.Module) -> list[str]:
    """Noisy LoRA into the targeted layers; a classifier head trains beside them."""
    from pace_llm.inject import inject_noisy_lora
    from pace_llm.model import classifier_head

    seed(recipe, "adapters")
    return inject_noisy_lora(model, recipe.lora, recipe.pace, classifier_head(model))


def size_ds_buckets(ds_config: dict, model: nn.Module) -> None:
    """Resolve "auto" gradient buckets from the adapter's size."""
    from pace_llm.dsconfig import size_buckets
    from pace_llm.inject import adapter_parameters

    size_buckets(ds_config, sum(getattr(p, "ds_numel", p.numel())
                                for p in adapter_parameters(model)))


def plan_batches(recipe: Recipe, task: TaskData) -> tuple[BatchPlan, int]:
    """The global-batch order and the number of optimizer steps."""
    from pace_llm import distributed as D
    from pace_llm.data import BatchPlan

    t = recipe.train
    global_batch = t.micro_batch_size * t.grad_accum * D.world_size()
    plan = BatchPlan([len(e["input_ids"]) for e in task.train], global_batch, t.seed)
    return plan, t.max_steps or max(1, int(t.epochs * plan.steps_per_epoch))


def _fast_history(recipe: Recipe, task: TaskData) -> FastHistory | None:
    from pace_llm.objective import FastHistory

    if recipe.pace.mode != "fast":
        return None
    return FastHistory(len(task.train), task.num_labels or 1)


def _evaluator(run: Run) -> Evaluator:
    from pace_llm.distributed import full_weights
    from pace_llm.evaluate import EvalContext, Evaluator

    return Evaluator(EvalContext(
        model=run.model, objective=run.engine.module, device=run.engine.device,
        collate=run.collate, task=run.task, args=run.recipe.eval, tokenizer=run.tokenizer,
        grad_batch_size=run.recipe.train.micro_batch_size,
        whole_weights=lambda: full_weights(run.engine)))


def _served_name(base_dir: str) -> str:
    path = Path(base_dir)
    return str(path.resolve()) if path.is_dir() else base_dir


if __name__ == "__main__":
    sys.exit(main())
