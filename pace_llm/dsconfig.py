"""The DeepSpeed JSON: "auto" values are filled from the recipe, contradictions are errors; and
which engine runs a run (:func:`engine_for`: pace_llm/stepper.py's flat engine or DeepSpeed's).

The recipe and the JSON are the only two sources; batch arithmetic lives here alone:
``train_batch_size = micro_batch_size × grad_accum × world_size``.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

from pace_llm.errors import UserError, first_line, listing, problems_error
from pace_llm.schema import Recipe


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


# DeepSpeed 0.19's top-level keys (deepspeed/runtime/config.py and the sections it reads);
# DeepSpeed itself ignores any other key, so a typo would silently change nothing.
OBJECT_KEYS = ("zero_optimization", "activation_checkpointing", "comms_logger", "tensorboard",
               "wandb", "csv_monitor", "comet", "fp16", "bf16", "bfloat16", "torch_autocast",
               "optimizer", "scheduler", "flops_profiler", "autotuning", "hybrid_engine",
               "pipeline", "data_efficiency", "checkpoint", "data_types", "aio", "datastates_ckpt",
               "weight_quantization", "compile", "timers", "tensor_parallel", "expert_parallel")
SCALAR_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "managed_gradient_accumulation", "steps_per_print", "dump_state",
               "disable_python_gc", "disable_allgather", "communication_data_type",
               "seq_parallel_communication_data_type", "prescale_gradients",
               "gradient_predivide_factor", "gradient_allreduce_op", "gradient_clipping",
               "wall_clock_breakdown", "memory_breakdown", "zero_allow_untested_optimizer",
               "zero_force_ds_cpu_optimizer", "use_data_before_expert_parallelism",
               "dataloader_drop_last", "log_level", "vocabulary_size", "sequence_parallel_size")
KNOWN_KEYS = frozenset(OBJECT_KEYS + SCALAR_KEYS)
REMOVED_KEYS = ("nebula", "compression_training", "amp", "quantize_training", "sparse_gradients",
                "eigenvalue", "sparse_attention", "elasticity", "graph_harvesting",
                "curriculum_learning", "progressive_layer_drop")
"""Top-level keys DeepSpeed 0.19 removed (deepspeed.runtime.config refuses them)."""
COUNT_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
EXAMPLES = {"zero_optimization": '{"stage": 2}', "bf16": '{"enabled": "auto"}',
            "fp16": '{"enabled": "auto"}'}


def load_ds_json(path: str | None) -> dict[str, Any]:
    """The DeepSpeed JSON, checked (see :func:`ds_json_problems`); every problem in one error."""
    if path is None:
        return {"zero_optimization": {"stage": 0}}
    raw, problems = read_ds_json(path)
    _refuse(problems)
    return raw


def read_ds_json(path: str, deep: bool = True) -> tuple[Any, list[str]]:
    """(the parsed file, its problems): unreadable, not JSON, or what ds_json_problems finds."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = (f" (line {exc.lineno}, column {exc.colno})"
                 if isinstance(exc, json.JSONDecodeError) else "")
        detail = getattr(exc, "msg", None) or first_line(exc)
        return None, [f"deepspeed: cannot read {path!r} as JSON{where}: {detail}"]
    return raw, ds_json_problems(raw, path, deep)


def ds_json_problems(raw: Any, src: str, deep: bool = True) -> list[str]:
    """Structural problems of a DeepSpeed config, each naming the file and the key: not an
    object, an unknown or removed top-level key, a section of the wrong type, an optimizer or
    scheduler section; ``deep`` (imports DeepSpeed, ~1 s): also what DeepSpeed's own config
    classes refuse in zero_optimization / fp16 / bf16."""
    if not isinstance(raw, dict):
        got = type(raw).__name__
        return [f"{src}: the top level must be a JSON object ({{\"zero_optimization\": ...}}), "
                + f"got a {got}"]
    problems = []
    for key, value in raw.items():
        if key in REMOVED_KEYS:
            problems.append(f"{src}: {key}: removed from DeepSpeed (0.19 refuses it); remove it")
        elif key not in KNOWN_KEYS:
            near = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1, cutoff=0.6)
            hint = f"did you mean '{near[0]}'?" if near else "DeepSpeed would ignore it; remove it"
            problems.append(f"{src}: unknown top-level key '{key}': {hint}")
        elif key in OBJECT_KEYS and not isinstance(value, dict):
            example = EXAMPLES.get(key, "{...}")
            problems.append(f"{src}: {key} = {json.dumps(value)} must be an object, e.g. "
                            f"\"{key}\": {example}")
        elif key in COUNT_KEYS and value != "auto" and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f"{src}: {key} = {json.dumps(value)} must be a positive integer or "
                            "\"auto\" (filled from the recipe)")
    if "optimizer" in raw or "scheduler" in raw:
        problems.append(f"{src}: remove 'optimizer'/'scheduler'; pace_llm builds AdamW and the "
                        "schedule from the recipe's train section (one source of truth)")
    for key, model in _section_models().items() if deep else ():
        if isinstance(raw.get(key), dict):
            problems += _pydantic_problems(model, raw[key], f"{src}: {key}")
    return problems


def _section_models() -> dict[str, type]:
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {"zero_optimization": DeepSpeedZeroConfig, "fp16": DeepSpeedFP16Config,
            "bf16": DeepSpeedBF16Config, "bfloat16": DeepSpeedBF16Config}


def _pydantic_problems(model: type, section: dict[str, Any], where: str) -> list[str]:
    """What DeepSpeed's pydantic config class refuses in ``section``, one line per key."""
    from pydantic import ValidationError

    try:
        model(**section)
    except ValidationError as exc:
        names = sorted({*model.model_fields, *(f.alias for f in model.model_fields.values()
                                                if f.alias)})
        out = []
        for err in exc.errors():
            key = ".".join(map(str, err["loc"])) or "(section)"
            if err["type"] == "extra_forbidden":
                near = difflib.get_close_matches(str(err["loc"][-1]), names, n=1, cutoff=0.6)
                out.append(f"{where}.{key}: unknown key; " + (
                    f"did you mean '{near[0]}'?" if near else f"valid keys: {listing(names, 8)}"))
            else:
                out.append(f"{where}.{key} = {json.dumps(err.get('input'), default=str)}: "
                           f"{err['msg']}")
        return out
    except (ValueError, TypeError, AssertionError) as exc:  # DeepSpeed's own validators
        return [f"{where}: {first_line(exc)}"]
    return []


def _refuse(problems: list[str]) -> None:
    if problems:
        raise problems_error("DeepSpeed config problems", problems)


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
    _refuse(problems)
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


# ------------------------------------------------------------------ which engine runs it
def flat_misfit(stage: int, precision: str, offload: bool, uniform: bool = True) -> str | None:
    """Why the flat engine cannot run this configuration (None: it can)."""
    reasons = ([f"ZeRO-{stage}"] if stage not in (0, 1, 2) else []) + \
        ([precision] if precision not in ("bf16", "fp32") else []) + \
        (["CPU offload of the optimizer"] if offload else []) + \
        ([] if uniform else ["trainable params of several dtypes"])
    return ", ".join(reasons) or None


def engine_for(optimizer_path: str, stage: int, precision: str, offload: bool,
               uniform: bool = True) -> str:
    """"flat" or "deepspeed" for ``train.optimizer_path`` (auto, flat, deepspeed) at this ZeRO
    stage, precision and offload; ``flat`` where it does not fit is a UserError."""
    misfit = flat_misfit(stage, precision, offload, uniform)
    if optimizer_path == "flat" and misfit:
        raise UserError(f"train.optimizer_path: flat needs ZeRO-0/1/2, bf16 or fp32, no CPU "
                        f"offload and one dtype for every trainable param (this run: {misfit}); "
                        "use auto or deepspeed")
    return "flat" if optimizer_path in ("auto", "flat") and not misfit else "deepspeed"
