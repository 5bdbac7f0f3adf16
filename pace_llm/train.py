"""Entry point: recipe → validate → tokenizer and data → base model → inject noisy LoRA →
DeepSpeed engine → train → export.

    deepspeed pace_llm/train.py --recipe recipes/gsm8k.yaml [--section.key value ...]
    torchrun --nproc_per_node N pace_llm/train.py --recipe ...
    python pace_llm/train.py --recipe ...            (one process, no launcher)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pace_llm.config import Recipe, dump_recipe, load_recipe  # noqa: E402
from pace_llm.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run a recipe; bad input prints one message and returns 2 (no traceback)."""
    from pace_llm import distributed as D

    try:
        recipe = load_recipe(argv)
        run(recipe)
    except UserError as exc:
        print(f"pace_llm: error: {exc}", file=sys.stderr)
        D.shutdown(clean=False)
        return 2
    D.shutdown(clean=True)
    return 0


def check_output_dir(recipe: Recipe) -> Path:
    """Refuse a non-empty output_dir unless the run resumes or may overwrite it."""
    out = Path(recipe.train.output_dir)
    if out.is_file():
        raise UserError(f"train.output_dir: {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not recipe.train.resume and not recipe.train.overwrite:
            raise UserError(f"train.output_dir: {out} is not empty; nothing was changed. Pass "
                            "--train.resume auto to continue that run, --train.overwrite true to "
                            "replace it, or choose another directory")
    return out


def run(recipe: Recipe) -> Path:
    """The training story. Returns the output directory."""
    import shutil

    import torch

    from pace_llm import distributed as D
    from pace_llm.checkpoint import find_resumable
    from pace_llm.dsconfig import fill_ds_config, resolve_precision, save_json, size_buckets
    from pace_llm.engine import Trainer
    from pace_llm.inject import adapter_parameters, inject_noisy_lora
    from pace_llm.model import classifier_head, load_model, load_tokenizer, weight_dtype
    from pace_llm.plot import plot_metrics
    from pace_llm.tasks import build_task

    out = check_output_dir(recipe)
    D.init_distributed()
    precision = resolve_precision(recipe)
    ds_config = fill_ds_config(recipe, D.world_size(), precision)
    _check_quant(recipe, ds_config)
    D.barrier()  # every rank has checked output_dir before rank 0 writes into it
    if D.is_main():
        if recipe.train.overwrite and out.is_dir() and not recipe.train.resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
        save_json(ds_config, out / "ds_config.json")
    D.barrier()

    base_dir = _ensure_base_model(recipe, out)
    tokenizer = load_tokenizer(base_dir, recipe)
    task = build_task(recipe.data, tokenizer)
    torch.manual_seed(recipe.train.seed)  # a new task head (GLUE) is initialised while loading
    model = load_model(base_dir, recipe, causal=task.kind == "causal_lm",
                       num_labels=task.num_labels, pad_token_id=tokenizer.pad_token_id,
                       dtype=weight_dtype(recipe, precision), ds_config=ds_config)
    torch.manual_seed(recipe.train.seed)  # the same adapter init on every rank and world size
    replaced = inject_noisy_lora(model, recipe.lora, recipe.pace, classifier_head(model))
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in adapter_parameters(model))
    if size_buckets(ds_config, trainable) and D.is_main():  # the record of what DeepSpeed got
        save_json(ds_config, out / "ds_config.json")
    trainer = Trainer(recipe, model, task, tokenizer, ds_config, out, precision, _served_name(base_dir))
    trainer.log(f"{len(replaced)} layers adapted; {task.stats}; {trainer.max_steps} steps of "
                f"{trainer.global_batch} examples; precision {precision}, ZeRO-{trainer.zero_stage}, "
                f"{D.world_size()} rank(s)")
    if recipe.train.resume:
        _resume(trainer, recipe, out, find_resumable)
    if trainer.step == 0:  # the noise stream: per rank, restored from checkpoints on resume
        torch.manual_seed(recipe.train.seed + 1 + D.rank())
    trainer.train()
    if trainer.step >= trainer.max_steps:
        trainer.export_adapter(out / "adapter", overwrite=True)
        if recipe.export.merge:
            from pace_llm.export import merge_and_save

            merge_and_save(trainer.hf_model, out / "merged", tokenizer=tokenizer, overwrite=True)
            trainer.log(f"merged model written: {out / 'merged'}")
        if D.is_main():
            plot_metrics(out / "metrics.jsonl", out / "curves.png")
            trainer.log(f"done: recipe {out / 'recipe.yaml'}, metrics {out / 'metrics.jsonl'}, "
                        f"curves {out / 'curves.png'}, adapter {out / 'adapter'}")
    return out


def _ensure_base_model(recipe: Recipe, out: Path) -> str:
    """The base model directory; the offline demo's is built once by rank 0."""
    from pace_llm import distributed as D
    from pace_llm.model import base_model_dir

    path = Path(base_model_dir(recipe, out))
    if recipe.model.build is not None and not (path / "config.json").is_file():
        if D.is_main():
            from pace_llm.tasks import task_texts
            from pace_llm.tinymodel import build_base

            build_base(recipe.model.build, task_texts(recipe.data), path)
        D.barrier()
    return str(path)


def _served_name(base_dir: str) -> str:
    """What the adapter records as its base: a hub id as given, a local directory absolute."""
    path = Path(base_dir)
    return str(path.resolve()) if path.is_dir() else base_dir


def _resume(trainer, recipe: Recipe, out: Path, find_resumable) -> None:
    from pace_llm import distributed as D

    if recipe.train.resume == "auto":
        found = find_resumable(out / "checkpoints", trainer.log) if D.is_main() else None
        found = D.broadcast_object(str(found) if found else None)
        if found is None:
            trainer.log("train.resume auto: no complete checkpoint yet; starting from step 0")
            return
        path = Path(found)
    else:
        from pace_llm.checkpoint import verify

        path = Path(recipe.train.resume)
        problem = verify(path)
        if problem:
            raise UserError(f"train.resume: {path} is not a complete checkpoint: {problem}")
    trainer.resume(path)


def _check_quant(recipe: Recipe, ds_config: dict) -> None:
    if recipe.quant.bits not in (4, 8):
        return
    from pace_llm.dsconfig import zero_stage
    from pace_llm.quant import quant_problems

    problems = quant_problems(recipe, zero_stage(ds_config))
    if problems:
        raise UserError("quantization problems:\n" + "\n".join(f"  - {p}" for p in problems))


if __name__ == "__main__":
    sys.exit(main())
