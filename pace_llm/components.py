"""The named helpers ``train.setup`` builds a run with, one component each, and the run's
seeds (every ``torch.manual_seed`` of a run is here)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pace_llm.schema import Recipe, dump_recipe

if TYPE_CHECKING:
    from torch import nn

    from pace_llm.data import BatchPlan
    from pace_llm.evaluate import Evaluator
    from pace_llm.objective import FastHistory
    from pace_llm.tasks import TaskData
    from pace_llm.train import Run


# --------------------------------------------------------------------------------- the seeds
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
    """Seed torch for one stage of the run (every seed of a run is set here)."""
    import torch

    from pace_llm import distributed as D

    torch.manual_seed(SEEDS[stage](recipe.train.seed, D.rank()))


# ------------------------------------------------------------------------- setup's helpers
def record_recipe(recipe: Recipe, ds_config: dict, where: Path) -> None:
    """Rank 0 writes the resolved recipe and the DeepSpeed config DeepSpeed got."""
    from pace_llm import distributed as D
    from pace_llm.checkpoint import atomic_write
    from pace_llm.dsconfig import save_json

    if D.is_main():
        where.mkdir(parents=True, exist_ok=True)
        atomic_write(where / "recipe.yaml", dump_recipe(recipe))
        save_json(ds_config, where / "ds_config.json")


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
    """The global-batch order (a permutation per epoch; a weighted mixture; this rank's share
    of a stream) and the number of optimizer steps."""
    from pace_llm import distributed as D
    from pace_llm.data import BatchPlan, MixturePlan
    from pace_llm.tasks.stream import stream_plan

    t = recipe.train
    global_batch = t.micro_batch_size * t.grad_accum * D.world_size()
    if task.streaming:
        return stream_plan(task, recipe, D.world_size(), D.rank()), t.max_steps
    if task.mixture is not None:
        m = task.mixture
        plan = MixturePlan(m.names, task.train.part_lengths(), m.weights, global_batch, t.seed)
    else:
        plan = BatchPlan(task.lengths, global_batch, t.seed)
    return plan, t.max_steps or max(1, int(t.epochs * plan.steps_per_epoch))


def fast_history(recipe: Recipe, task: TaskData) -> FastHistory | None:
    from pace_llm.objective import FastHistory

    if recipe.pace.mode != "fast":
        return None
    return FastHistory(len(task.train), task.num_labels or 1)


def evaluator(run: Run) -> Evaluator:
    from pace_llm.distributed import full_weights
    from pace_llm.evaluate import EvalContext, Evaluator

    return Evaluator(EvalContext(
        model=run.model, objective=run.engine.module, device=run.engine.device,
        collate=run.collate, task=run.task, args=run.recipe.eval, tokenizer=run.tokenizer,
        grad_batch_size=run.recipe.train.micro_batch_size,
        whole_weights=lambda: full_weights(run.engine)))


def served_name(base_dir: str) -> str:
    path = Path(base_dir)
    return str(path.resolve()) if path.is_dir() else base_dir


def copy_dir(src: Path, dst: Path) -> None:
    """A copy of an exported directory, written atomically (rank 0)."""
    import shutil

    from pace_llm import distributed as D
    from pace_llm.export import atomic_dir

    def copy() -> None:
        with atomic_dir(dst, overwrite=True) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)

    D.on_rank0(copy)
