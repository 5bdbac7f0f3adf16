"""The DeepSpeed JSON: "auto" values are filled from the recipe, contradictions are errors.

The recipe and the JSON are the only two sources; batch arithmetic lives here alone:
``train_batch_size = micro_batch_size × grad_accum × world_size``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pace_llm.config import Recipe
from pace_llm.errors import UserError


def resolve_precision(recipe: Recipe) -> str:
    """bf16 / fp16 / fp32; auto = bf16 on a GPU that supports it, fp32 otherwise."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    on_cpu = acc.device_name() == "cpu"
    p = recipe.train.precision
    if p == "fp16" and on_cpu:
        raise UserError("train.precision: fp16 needs a GPU (DeepSpeed refuses fp16 on the CPU "
                        "accelerator); use fp32 on CPU, or bf16/fp16 on a GPU")
    if p == "auto":
        return "bf16" if (not on_cpu and acc.is_bf16_supported()) else "fp32"
    return p


def load_ds_json(path: str | None) -> dict[str, Any]:
    if path is None:
        return {"zero_optimization": {"stage": 0}}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"deepspeed: cannot read {path!r} as JSON: {exc}") from None


def fill_ds_config(recipe: Recipe, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed config with every "auto" resolved and every explicit value checked."""
    raw = load_ds_json(recipe.deepspeed)
    cfg = copy.deepcopy(raw)
    t = recipe.train
    src = recipe.deepspeed or "(default ZeRO-0 config)"
    want = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
    }
    problems = []
    for key, value in want.items():
        have = cfg.get(key, "auto")
        if have == "auto":
            cfg[key] = value
        elif have != value:
            problems.append(f"{src}: {key} = {have} contradicts the recipe, which gives {value} "
                            f"(micro_batch_size {t.micro_batch_size} x grad_accum {t.grad_accum} x "
                            f"{world_size} ranks); set it to \"auto\" or change the recipe")
    for name in ("bf16", "fp16"):
        section = cfg.setdefault(name, {})
        enabled = precision == name
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = enabled
        elif section["enabled"] != enabled:
            problems.append(f"{src}: {name}.enabled = {section['enabled']} contradicts "
                            f"train.precision = {precision}; set it to \"auto\"")
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    stage = zero.get("stage", 0)  # the raw value: checked here, read by zero_stage() after
    if stage not in (0, 1, 2, 3):
        problems.append(f"{src}: zero_optimization.stage = {stage!r}; allowed 0, 1, 2, 3")
    for key in ("stage3_param_persistence_threshold", "stage3_prefetch_bucket_size",
                "stage3_max_live_parameters", "stage3_max_reuse_distance"):
        if zero.get(key) == "auto":
            zero[key] = _zero3_auto(key)
    # reduce/allgather_bucket_size "auto" stays until the adapter exists: size_buckets()
    if "optimizer" in cfg or "scheduler" in cfg:
        problems.append(f"{src}: remove 'optimizer'/'scheduler'; pace_llm builds AdamW and the "
                        "schedule from the recipe's train section (one source of truth)")
    if problems:
        raise UserError("DeepSpeed config problems:\n" + "\n".join(f"  - {p}" for p in problems))
    cfg.setdefault("steps_per_print", 10 ** 9)
    cfg["zero_allow_untested_optimizer"] = True  # ours: torch AdamW that can skip a bad step
    return cfg


def _zero3_auto(key: str) -> int:
    """Persistence threshold 0: every frozen base weight is really partitioned (tiny ones too)."""
    return {"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 50_000_000,
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000}[key]


BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size")


def size_buckets(cfg: dict[str, Any], trainable: int) -> dict[str, int]:
    """Resolve "auto" gradient-bucket sizes from the number of trainable elements.

    DeepSpeed allocates its gradient reduce bucket up front at the configured size, on the
    accelerator, whatever the model trains: its default of 5e8 elements is 0.95 GiB in bf16
    (1.9 GiB in fp32) for a LoRA adapter of a few million elements (measured on an H200: ~950 MB
    of a ZeRO-2/3 run's peak on a tiny model). Only trainable gradients go through the buckets,
    so "auto" = min(DeepSpeed's default, the trainable element count): the same single bucket
    per step for an adapter, never more memory than the adapter's gradients. Explicit values are
    kept. Returns what was filled.
    """
    zero = cfg.get("zero_optimization", {})
    cap = 50_000_000 if zero_stage(cfg) == 3 else 500_000_000
    filled = {}
    for key in BUCKET_KEYS:
        if zero.get(key) == "auto":
            zero[key] = filled[key] = max(1, min(cap, int(trainable)))
    return filled


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(cfg: dict[str, Any]) -> bool:
    off = cfg.get("zero_optimization", {}).get("offload_optimizer", {})
    return off.get("device", "none") not in ("none", None)


def save_json(cfg: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(cfg, indent=2))

