"""Every cheap check of a recipe, run once when it is parsed: pure per-component
``problems(...) -> list[str]`` functions, composed by :func:`recipe_problems` and reported
together as one :class:`~pace_llm.errors.RecipeError`.

    model_problems, lora_problems,        each section's values and how they meet
    pace_problems, train_problems,
    eval_problems
    data_problems                         data.* and data.mix (pace_llm/data/checks.py)
    resource_problems                     what the recipe names outside itself: model.build's
                                          model_type, model.attn_implementation
    DeepSpeedJSON.problems                the DeepSpeed JSON's structure (pace_llm/dsconfig.py)
    optimizer_path_problems               train.optimizer_path: flat against the ZeRO stage,
                                          the precision and CPU offload
  a command about to run (train, data-check) also:
    model_path_problems                   a local model.name_or_path is a directory
  a command that loads (train and data-check, not --print_config) also:
    hub_problems                          the hub ids it names: the hub reachable (one
                                          probe), or offline, each in the cache (pace_llm/hub.py)
  and one that trains:
    length_problems                       data.max_length against the model's config
    tracking.readiness_problems           train.report_to: each backend installed, W&B
                                          logged in (or offline)
    qlora_problems                        QLoRA's rules under the JSON's ZeRO stage
                                          (bitsandbytes installed; pace_llm/quant.py)

Then each key set to no effect in the chosen mode is logged as a warning (:func:`inert_keys`).

What needs something loaded is checked where it is loaded: the DeepSpeed JSON's explicit
batch values against the world size (dsconfig.fill_ds_config), the model against its tokenizer
and the data (model.check_model), one dtype for every trainable param of the flat engine
(dsconfig.engine_for, after injection), a chat template against the tokenizer.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pace_llm import console, hub
from pace_llm.data.checks import data_problems
from pace_llm.data.sources import LOCAL_EXTS, looks_like_path
from pace_llm.dsconfig import flat_misfit, offloads_optimizer, read_ds_json, zero_stage
from pace_llm.errors import RecipeError
from pace_llm.families import PRESET_NAMES
from pace_llm.hub import HubId
from pace_llm.model import config_dict, max_length_problem, model_dir_problem, position_limit
from pace_llm.quant import quant_bits, quant_problems
from pace_llm.schema import SECTIONS, DataArgs, EvalArgs, LoraArgs, ModelArgs, Recipe, TrainArgs
from pace_llm.tinymodel import build_problem
from pace_llm.tracking import readiness_problems

log = logging.getLogger(__name__)


def check(recipe: Recipe, about_to_run: bool = False, found: Iterable[str] = (),
          loads: bool = False, trains: bool = False) -> None:
    """Raise one RecipeError listing ``found`` (what the parser found first) and every problem
    of ``recipe`` (``loads``, ``trains``: see :func:`recipe_problems`); else, for a command
    ``about_to_run``, log each key set to no effect as a warning (once: rank 0)."""
    problems = [*found, *recipe_problems(recipe, about_to_run, loads, trains)]
    if problems:
        raise RecipeError(problems)
    if about_to_run and console.rank() == 0:
        for line in inert_keys(recipe):
            log.warning("warning: %s", line)


def recipe_problems(recipe: Recipe, about_to_run: bool = False, loads: bool = False,
                    trains: bool = False) -> list[str]:
    """Every problem of a parsed recipe (empty = valid). ``about_to_run``: also what this
    machine must hold for the run (a local base model, bitsandbytes for QLoRA); ``loads`` (the
    command loads the model or data): the hub ids it names can be had; ``trains``: what
    training needs (data.max_length within the model's positions, its trackers installed and
    W&B logged in)."""
    ds = DeepSpeedJSON.read(recipe.deepspeed)
    problems = [*model_problems(recipe.model), *lora_problems(recipe.lora),
                *pace_problems(recipe), *train_problems(recipe.train),
                *eval_problems(recipe.eval), *data_problems(recipe),  # data_problems: + data.mix
                *resource_problems(recipe.model), *ds.problems,
                *optimizer_path_problems(recipe.train, ds)]
    if about_to_run:
        problems += [*model_path_problems(recipe.model), *qlora_problems(recipe, ds)]
    if loads:
        problems += hub_problems(recipe)
    if trains:
        problems += [*length_problems(recipe), *readiness_problems(recipe.train.report_to)]
    return problems


def _failed(rules: Iterable[tuple[bool, str]]) -> list[str]:
    """The message of every rule whose condition does not hold."""
    return [message for holds, message in rules if not holds]


# ------------------------------------------------------------------------------ the sections
def model_problems(m: ModelArgs) -> list[str]:
    return _failed([
        (bool(m.name_or_path) or m.build is not None,
         "model.name_or_path is empty: give a hub id or a local model directory (or model.build)"),
        (not (m.name_or_path and m.build is not None),
         (f"model.name_or_path {m.name_or_path!r} and model.build are both set (build makes a "
          "random-init base, ignoring name_or_path): to train that model add --model.build "
          "null; to build, leave name_or_path empty")),
    ])


def lora_problems(lo: LoraArgs) -> list[str]:
    if isinstance(lo.targets, str):
        targets = (lo.targets in PRESET_NAMES,
                   (f"lora.targets: unknown preset {lo.targets!r}; allowed presets: "
                    f"{', '.join(PRESET_NAMES)}, or a list of module-name suffixes like "
                    "[q_proj, v_proj]"))
    else:
        targets = (len(lo.targets) > 0 and all(isinstance(s, str) and s for s in lo.targets),
                   f"lora.targets: {lo.targets!r} must be a non-empty list of module-name suffixes")
    return _failed([
        (lo.r > 0, f"lora.r: {lo.r} must be a positive integer (e.g. 8, 16)"),
        (lo.alpha > 0, f"lora.alpha: {lo.alpha} must be > 0 (e.g. 2*r)"),
        (0.0 <= lo.dropout < 1.0, f"lora.dropout: {lo.dropout} must be in [0, 1)"),
        targets,
    ])


def pace_problems(recipe: Recipe) -> list[str]:
    pc = recipe.pace
    problems = _failed([
        (math.isfinite(pc.sigma) and pc.sigma >= 0,
         f"pace.sigma: {pc.sigma} must be >= 0 (paper grid 0.1-2)"),
        (math.isfinite(pc.consistency_weight) and pc.consistency_weight >= 0,
         f"pace.consistency_weight: {pc.consistency_weight} must be >= 0 (paper grid 0.02-1)"),
        (pc.skip_first_blocks >= 0, f"pace.skip_first_blocks: {pc.skip_first_blocks} must be >= 0"),
        (pc.lazy_interval >= 1, f"pace.lazy_interval: {pc.lazy_interval} must be >= 1"),
    ])
    if pc.mode == "fast" and recipe.is_causal_lm:
        problems.append(f"pace.mode: 'fast' needs a classification/regression task but data.task "
                        f"is '{recipe.data.task}' (a causal LM); {fast_mode_estimate(recipe.data)}"
                        ". Use pace.mode: full or lazy")
    return problems


def fast_mode_estimate(d: DataArgs, vocab: int = 32064, bytes_per: int = 4) -> str:
    """The memory a per-token vocab-logit history would take, for the fast-mode refusal."""
    rows = d.limit or 7473
    tokens = rows * min(d.max_length, 150)
    gb = tokens * vocab * bytes_per / 1e9
    return (f"its history buffer would hold every supervised token's {vocab}-way logits: "
            f"~{rows} rows x ~{tokens // rows} tokens x {vocab} x {bytes_per} B = ~{gb:.0f} GB")


def train_problems(t: TrainArgs) -> list[str]:
    return _failed([
        (t.max_steps >= 0, f"train.max_steps: {t.max_steps} must be >= 0"),
        (t.max_steps > 0 or t.epochs > 0, "train: set max_steps > 0 or epochs > 0"),
        (t.micro_batch_size >= 1, f"train.micro_batch_size: {t.micro_batch_size} must be >= 1"),
        (t.grad_accum >= 1, f"train.grad_accum: {t.grad_accum} must be >= 1"),
        (t.lr > 0 and math.isfinite(t.lr), f"train.lr: {t.lr} must be > 0"),
        (t.warmup_steps >= 0, f"train.warmup_steps: {t.warmup_steps} must be >= 0"),
        (t.weight_decay >= 0, f"train.weight_decay: {t.weight_decay} must be >= 0"),
        (t.max_grad_norm >= 0, f"train.max_grad_norm: {t.max_grad_norm} must be >= 0 (0 = off)"),
        (t.log_every >= 1, f"train.log_every: {t.log_every} must be >= 1"),
        (t.clean_grad_norm_every >= 0,
         f"train.clean_grad_norm_every: {t.clean_grad_norm_every} must be >= 0 (0 = never)"),
        (t.save_every >= 0, f"train.save_every: {t.save_every} must be >= 0"),
        (t.keep_last >= 1, f"train.keep_last: {t.keep_last} must be >= 1"),
        (t.max_bad_steps >= 1, f"train.max_bad_steps: {t.max_bad_steps} must be >= 1"),
        (bool(t.output_dir), "train.output_dir is empty: give a directory for the run"),
        (t.resume in (None, "auto") or Path(t.resume).is_dir(),
         (f"train.resume: checkpoint path {t.resume!r} does not exist; use 'auto' or an "
          "existing <output_dir>/checkpoints/step-N directory")),
        (not (t.resume and t.overwrite),
         (f"train.resume {t.resume!r} and train.overwrite true are both set: resume continues "
          "the run in its directory, overwrite replaces it with a new one; give one of them")),
    ])


def eval_problems(e: EvalArgs) -> list[str]:
    return _failed([
        (e.every >= 0, f"eval.every: {e.every} must be >= 0"),
        (e.limit is None or e.limit > 0, f"eval.limit: {e.limit} must be > 0 or null"),
        (e.batch_size >= 1, f"eval.batch_size: {e.batch_size} must be >= 1"),
        (e.max_new_tokens >= 1, f"eval.max_new_tokens: {e.max_new_tokens} must be >= 1"),
    ])


# ----------------------------------------------------------- what the recipe points at
ATTN = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4",
        "flex_attention", "paged|eager")
"""transformers 5's attention backends (model.attn_implementation)."""


def resource_problems(m: ModelArgs) -> list[str]:
    """What the model section names outside the recipe, before anything loads: a
    model.build's model_type, and model.attn_implementation."""
    problems = []
    if m.build is not None and (problem := build_problem(m.build)):
        problems.append(problem)
    attn = m.attn_implementation
    if attn is not None and attn not in ATTN and "/" not in attn:
        near = difflib.get_close_matches(attn, ATTN, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}? " if near else ""
        problems.append(f"model.attn_implementation: {attn!r} is not allowed; {hint}expected one "
                        f"of {', '.join(ATTN)} (or a hub kernel like kernels-community/"
                        "flash-attn), or null for the model's default")
    return problems


@dataclass
class DeepSpeedJSON:
    """The recipe's DeepSpeed JSON as parse time sees it: its structural problems (DeepSpeed's
    own config classes check it again in training) and, when the file gives them, the ZeRO
    stage and whether the optimizer is offloaded (``stage`` None: not known)."""

    problems: list[str] = field(default_factory=list)
    stage: int | None = None
    offload: bool = False
    path: str | None = None

    @classmethod
    def read(cls, path: str | None) -> DeepSpeedJSON:
        if path is None:  # the default config: ZeRO-0
            return cls(stage=0)
        if not Path(path).is_file():
            what = "is a directory; give a JSON file" if Path(path).is_dir() else "does not exist"
            return cls([f"deepspeed: config file {path!r} {what}; use one of ds_configs/*.json"])
        raw, problems = read_ds_json(path, deep=False)
        zero = raw.get("zero_optimization", {}) if isinstance(raw, dict) else None
        if (not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3)
                or not isinstance(zero.get("offload_optimizer", {}), dict)):
            return cls(problems)  # reported above, or by fill_ds_config
        return cls(problems, zero_stage(raw), offloads_optimizer(raw), path)


def optimizer_path_problems(t: TrainArgs, ds: DeepSpeedJSON) -> list[str]:
    """``train.optimizer_path: flat`` where the flat engine cannot run (``dsconfig.flat_misfit``:
    ZeRO-3, fp16 or CPU offload; ``auto`` precision resolves to bf16 or fp32)."""
    if t.optimizer_path != "flat" or ds.stage is None:
        return []
    if not flat_misfit(ds.stage, "fp16" if t.precision == "fp16" else "fp32", ds.offload):
        return []
    zero = f"ZeRO-{ds.stage}" + (f" (deepspeed: {ds.path})" if ds.path else "")
    offload = ", CPU offload" if ds.offload else ""
    return ["train.optimizer_path: flat needs ZeRO-0/1/2, bf16 or fp32 and no CPU offload "
            + f"(this run: {zero}, train.precision {t.precision}{offload}); use auto or deepspeed"]


def model_path_problems(m: ModelArgs) -> list[str]:
    """A local model.name_or_path exists and is a directory (its config.json and weights are
    checked when the model loads: data-check needs only the tokenizer)."""
    problem = model_dir_problem(m.name_or_path, need_model=False) if m.build is None else None
    return [problem] if problem else []


def length_problems(recipe: Recipe) -> list[str]:
    """data.max_length against the model's positions, from its config (a local directory's,
    the hub cache's, model.build), before anything loads."""
    if model_path_problems(recipe.model):
        return []  # the path's own problem says it
    config = config_dict(recipe)
    problem = max_length_problem(recipe, position_limit(config)) if config else None
    return [problem] if problem else []


def hub_ids(recipe: Recipe) -> list[HubId]:
    """The hub ids a recipe names: model.name_or_path and each data path that is no local
    file (the synthetic task reads none)."""
    ids: list[HubId] = []
    name = recipe.model.name_or_path
    if recipe.model.build is None and name and not looks_like_path(name):
        ids.append(("model.name_or_path", name, "model"))
    d = recipe.data
    sources = ([(f"data.mix[{i}].path", item.get("path"), item.get("task", d.task))
                for i, item in enumerate(d.mix) if isinstance(item, dict)]
               if d.mix else [("data.path", d.path, d.task)])
    for key, path, task in sources:
        if task != "synthetic" and isinstance(path, str) and path and not looks_like_path(
                path, LOCAL_EXTS):
            ids.append((key, path, "dataset"))
    return ids


def hub_problems(recipe: Recipe) -> list[str]:
    """The hub ids of the recipe that this start cannot get (pace_llm/hub.py): all at once."""
    return hub.problems(hub_ids(recipe))


def qlora_problems(recipe: Recipe, ds: DeepSpeedJSON) -> list[str]:
    """QLoRA's rules (bitsandbytes installed, ZeRO-3's limits, the storage dtype, a
    pre-quantized base) under the DeepSpeed JSON's ZeRO stage."""
    if quant_bits(recipe.quant) is None:
        return []
    return quant_problems(recipe, ds.stage if ds.stage is not None else 0)


# ------------------------------------------------------------------ keys that have no effect
# (keys, ignored when, the reason as the user reads it, the fix)
Rule = tuple[tuple[str, ...], Callable[[Recipe], bool], Callable[[Recipe], str], str]

_OFF = ("sigma", "consistency_weight", "sigma_schedule", "skip_first_blocks", "task_loss_on",
        "consistency_on")
RULES: list[Rule] = [
    (("pace.lazy_interval",), lambda r: r.pace.mode != "lazy",
     lambda r: f"pace.mode is '{r.pace.mode}' (only lazy uses it)", "set --pace.mode lazy"),
    (tuple(f"pace.{k}" for k in _OFF), lambda r: r.pace.mode == "off",
     lambda r: "pace.mode is 'off' (plain LoRA: no noise, no consistency loss)",
     "set --pace.mode full (or lazy)"),
    (("pace.consistency_on",), lambda r: r.pace.mode != "off" and not r.is_causal_lm,
     lambda r: f"data.task '{r.data.task}' is a classifier (it applies to causal LMs)", ""),
    (("data.glue_task",), lambda r: r.data.task != "glue",
     lambda r: f"data.task is '{r.data.task}', not glue", "set --data.task glue"),
    (("data.holdout",), lambda r: r.data.task != "instruct" and not r.data.mix,
     lambda r: (f"data.task is '{r.data.task}' (only instruct data without an evaluation split "
                "is held out)"), "give --data.eval_path for an evaluation file"),
    (("data.num_examples", "data.seed"), lambda r: r.data.task != "synthetic",
     lambda r: f"data.task is '{r.data.task}' (only the synthetic task generates examples)", ""),
    (("data.path", "data.eval_path", "data.hub_config"), lambda r: r.data.task == "synthetic",
     lambda r: "data.task is 'synthetic' (its problems are generated, nothing is read)",
     "set --data.task gsm8k, glue or instruct to read data"),
    (("data.chat_template",), lambda r: not r.is_causal_lm,  # causal + plain: an error
     lambda r: f"data.task '{r.data.task}' is a classifier (only chat prompts use it)", ""),
    (("quant.type", "quant.double_quant", "quant.compute_dtype", "quant.storage_dtype"),
     lambda r: r.quant.bits == "none", lambda r: "quant.bits is 'none' (no quantization)",
     "set --quant.bits 4"),
    (("quant.type", "quant.double_quant"), lambda r: r.quant.bits == 8,
     lambda r: "quant.bits is 8 (these are 4-bit settings)", "set --quant.bits 4"),
    (("data.shuffle_buffer",), lambda r: not r.data.streaming,
     lambda r: "data.streaming is false (the cached data is shuffled whole)",
     "set --data.streaming true"),
    (("data.eval_path", "data.hub_config", "data.columns", "data.limit"),
     lambda r: bool(r.data.mix),
     lambda r: "data.mix is set (each source takes its own)", "set it in a data.mix source"),
    (("train.epochs",), lambda r: r.train.max_steps > 0,
     lambda r: f"train.max_steps = {r.train.max_steps} decides the length",
     "set --train.max_steps 0 to train by epochs"),
]


def inert_keys(recipe: Recipe) -> list[str]:
    """One line per key set to a non-default value that the recipe's mode ignores."""
    defaults = {name: cls() for name, cls in SECTIONS.items()}
    out, seen = [], set()
    for keys, ignored, reason, fix in RULES:
        if not ignored(recipe):
            continue
        for key in keys:
            section, _, name = key.partition(".")
            value = getattr(getattr(recipe, section), name)
            if key in seen or value == getattr(defaults[section], name):
                continue
            seen.add(key)
            tail = f"; remove it, or {fix}" if fix else "; remove it"
            out.append(f"{key} = {value!r} has no effect: {reason(recipe)}{tail}")
    return out
