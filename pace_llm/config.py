"""The recipe schema: typed dataclasses, parsed by jsonargparse, validated as a whole.

A recipe YAML has one section per dataclass below (``model``, ``lora``, ``pace``, ``quant``,
``data``, ``train``, ``eval``, ``export``) plus a top-level ``deepspeed`` path. Each field's
docstring is its ``--help`` text. ``load_recipe(argv)`` returns a validated :class:`Recipe`
or raises :class:`RecipeError` listing *every* problem found, each naming the key, the value,
what is allowed and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pace_llm.errors import UserError
from pace_llm.families import PRESET_NAMES
from pace_llm.tasks import TASKS


class RecipeError(UserError):
    """One or more problems in a recipe; ``str()`` is the one problem, or lists them all."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(problems[0])
            return
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


@dataclass
class ModelArgs:
    name_or_path: str = ""
    """Hub id (e.g. microsoft/Phi-3-mini-4k-instruct) or local directory of the base model."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the frozen base weights are loaded in; auto = the training precision."""
    trust_remote_code: bool = False
    """Allow the model repository's own Python code to run (only if you trust it)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the base model."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant); the PACE noise is reproduced."""
    attn_implementation: str | None = None
    """transformers attention backend (eager, sdpa, flash_attention_2); None = its default."""
    build: dict[str, Any] | None = None
    """Offline base: a transformers config dict (model_type plus sizes). A random-init model is
    built from it, with a sentencepiece tokenizer trained on the task's text, and saved under
    <output_dir>/base_model; name_or_path is then that directory."""


@dataclass
class LoraArgs:
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha; the adapter is scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter input; one mask per sample, shared by both PACE views."""
    targets: str | list[str] = "attn+mlp"
    """Preset (attn, mlp, attn+mlp, all-linear) or a list of module-name suffixes."""
    rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r)."""


@dataclass
class PaceArgs:
    mode: Literal["off", "full", "lazy", "fast"] = "full"
    """off = plain LoRA; full = doubled batch every step; lazy = every lazy_interval steps;
    fast = consistency against last epoch's stored outputs (classification only)."""
    sigma: float = 1.0
    """Std of the multiplicative noise z ~ N(1, sigma^2) on the adapter output (block 0's)."""
    consistency_weight: float = 0.05
    """lambda: weight of the consistency loss between the two noisy views."""
    sigma_schedule: Literal["linear_decay", "constant"] = "linear_decay"
    """Per-block sigma: linear_decay gives block l sigma*(L-l)/L; constant gives sigma."""
    skip_first_blocks: int = 0
    """sigma = 0 for the first k blocks."""
    lazy_interval: int = 2
    """In lazy mode, run the consistency step every N-th optimizer step."""
    task_loss_on: Literal["first", "both"] = "first"
    """Task loss on view 1 only (paper) or the mean over both views."""
    consistency_on: Literal["logits", "hidden"] = "logits"
    """Causal LM: consistency over supervised next-token logits or final hidden states."""


@dataclass
class QuantArgs:
    bits: Literal["none", 4, 8] = "none"
    """Quantize the frozen base: none, 4 (QLoRA, bitsandbytes) or 8."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the 4-bit quantization constants too."""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the 4-bit matmuls; auto = the training precision."""
    storage_dtype: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = "auto"
    """Storage dtype of packed 4-bit weights; auto = uint8, or the compute dtype under ZeRO-3."""


@dataclass
class DataArgs:
    task: Literal[tuple(TASKS)] = "synthetic"  # type: ignore[valid-type]
    """Task family; decides the model head, the losses and the metric."""
    path: str = ""
    """Hub dataset id or local file/directory (jsonl, json, parquet, GLUE tsv)."""
    eval_path: str | None = None
    """Evaluation split (hub split name or local file); None = the task's default."""
    max_length: int = 1024
    """Maximum tokens per example (prompt + target)."""
    on_too_long: Literal["truncate", "drop", "error"] = "drop"
    """What to do with an example longer than max_length."""
    prompt_style: Literal["plain", "chat"] = "plain"
    """plain = the task's prompt text; chat = rendered with the tokenizer's chat template."""
    glue_task: str | None = None
    """GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte) when task = glue."""
    num_examples: int = 2000
    """Synthetic task: number of generated training problems."""
    limit: int | None = None
    """Use only the first N training rows (None = all)."""
    hub_config: str | None = None
    """Hub dataset config name; None = the task's default (gsm8k: main; glue: data.glue_task)."""
    seed: int = 0
    """Synthetic task: seed of the problem generator (training and eval problems)."""


@dataclass
class TrainArgs:
    output_dir: str = "runs/default"
    """Directory for the resolved recipe, metrics, checkpoints and the adapter."""
    max_steps: int = 0
    """Optimizer steps to run; 0 = derive from epochs."""
    epochs: float = 1.0
    """Passes over the training data (used when max_steps = 0)."""
    micro_batch_size: int = 4
    """Examples per rank per forward (before PACE doubling)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate of the adapter params."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Global gradient clipping norm (0 = off)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto = bf16 on a GPU that supports it, else fp32. fp16 needs a GPU."""
    seed: int = 42
    """Seed for data order, init and the PACE noise."""
    log_every: int = 10
    """Log to metrics.jsonl every N optimizer steps."""
    clean_grad_norm_every: int = 0
    """Every N steps also log clean_grad_norm: the task-loss gradient norm at the un-noised
    weights (PACE's theory says PACE lowers it). One extra forward/backward; 0 = never."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints to keep."""
    resume: str | None = None
    """auto = newest complete checkpoint in output_dir; or a checkpoint path."""
    overwrite: bool = False
    """Allow writing into a non-empty output_dir (deletes what is there)."""
    max_bad_steps: int = 5
    """Stop after this many consecutive non-finite losses (each such step is skipped)."""


@dataclass
class EvalArgs:
    every: int = 0
    """Evaluate every N optimizer steps (0 = only before and after training)."""
    limit: int | None = 200
    """Evaluate on the first N examples (None = all)."""
    batch_size: int = 8
    """Examples per rank per generation batch."""
    max_new_tokens: int = 256
    """Generation budget per example."""
    save_best: bool = False
    """Keep the adapter with the best eval metric in <output_dir>/adapter-best."""
    at_start: bool = True
    """Evaluate once before the first step (the base model's figures)."""


@dataclass
class ExportArgs:
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the exported adapter tensors; auto = the training precision."""
    merge: bool = False
    """Also write a merged HF model (adapters folded into the base)."""


@dataclass
class Recipe:
    model: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    pace: PaceArgs = field(default_factory=PaceArgs)
    quant: QuantArgs = field(default_factory=QuantArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    export: ExportArgs = field(default_factory=ExportArgs)
    deepspeed: str | None = None
    """Path to a DeepSpeed JSON (ds_configs/zeroN.json); "auto" values are filled from the recipe."""

    @property
    def is_causal_lm(self) -> bool:
        return TASKS[self.data.task] == "causal_lm"


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Recipe) if f.name != "deepspeed"}
SECTIONS = {name: globals()[t] if isinstance(t, str) else t for name, t in SECTIONS.items()}


# --------------------------------------------------------------------------------------------
# Raw-file checks: every unknown key and every value jsonargparse refuses, collected at once.
# --------------------------------------------------------------------------------------------

def _allowed(tp: Any) -> str:
    """A field type as a user reads it: "one of 'a', 'b'", "int", "str | None"."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# names that PEFT / TRL / HF Trainer users type, mapped to ours
ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
           "target_modules": "targets", "use_rslora": "rslora", "learning_rate": "lr",
           "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size":
           "micro_batch_size", "num_train_epochs": "epochs", "lr_scheduler_type": "schedule",
           "max_seq_length": "max_length", "model_name_or_path": "name_or_path"}


def _nearest(key: str, options: list[str]) -> str:
    if ALIASES.get(key) in options:
        return f"did you mean '{ALIASES[key]}'?"
    near = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f"did you mean '{near[0]}'?" if near else "valid keys: " + ", ".join(sorted(options))


def check_raw(raw: dict[str, Any], source: str, parser: Any) -> tuple[list[str], dict[str, Any]]:
    """Unknown sections/keys (with the nearest valid name) and values jsonargparse refuses, each
    key checked on its own so every problem is found at once. Returns (problems, the
    well-typed keys as a recipe dict)."""
    problems: list[str] = []
    good: dict[str, Any] = {}
    top = list(SECTIONS) + ["deepspeed"]
    for section, body in raw.items():
        if section not in top:
            problems.append(f"unknown section '{section}' in {source}: {_nearest(section, top)}")
            continue
        if section == "deepspeed":
            if body is not None and not isinstance(body, str):
                problems.append(f"deepspeed: {body!r} is not a path string; give e.g. "
                                "ds_configs/zero2.json")
            else:
                good[section] = body
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append(f"{section}: expected a mapping of keys, got {body!r}")
            continue
        types = _field_types(SECTIONS[section])
        for key, value in body.items():
            if key not in types:
                problems.append(f"unknown key '{section}.{key}' in {source}: "
                                f"{_nearest(key, list(types))}")
            elif not _parses(parser, section, key, value):
                problems.append(f"{section}.{key}: {value!r} is not allowed; expected "
                                f"{_allowed(types[key])}")
            else:
                good.setdefault(section, {})[key] = value
    return problems, good


def _parses(parser: Any, section: str, key: str, value: Any) -> bool:
    """jsonargparse accepts ``value`` for ``section.key`` (its own type check)."""
    from jsonargparse import ArgumentError

    try:
        parser.parse_object({section: {key: value}})
    except (ArgumentError, ValueError, TypeError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# Semantic validation of the parsed recipe: every problem at once.
# --------------------------------------------------------------------------------------------

def validate(recipe: Recipe) -> list[str]:
    """Cross-field checks on a parsed recipe. Returns the list of problems (empty = valid)."""
    p: list[str] = []
    m, lo, pc, d, t, e = (recipe.model, recipe.lora, recipe.pace, recipe.data, recipe.train,
                          recipe.eval)

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.append(msg)

    need(bool(m.name_or_path) or m.build is not None,
         "model.name_or_path is empty: give a hub id or a local model directory (or model.build)")
    need(lo.r > 0, f"lora.r: {lo.r} must be a positive integer (e.g. 8, 16)")
    need(lo.alpha > 0, f"lora.alpha: {lo.alpha} must be > 0 (e.g. 2*r)")
    need(0.0 <= lo.dropout < 1.0, f"lora.dropout: {lo.dropout} must be in [0, 1)")
    if isinstance(lo.targets, str):
        need(lo.targets in PRESET_NAMES,
             f"lora.targets: unknown preset {lo.targets!r}; allowed presets: "
             f"{', '.join(PRESET_NAMES)}, or a list of module-name suffixes like [q_proj, v_proj]")
    else:
        need(len(lo.targets) > 0 and all(isinstance(s, str) and s for s in lo.targets),
             f"lora.targets: {lo.targets!r} must be a non-empty list of module-name suffixes")
    need(math.isfinite(pc.sigma) and pc.sigma >= 0, f"pace.sigma: {pc.sigma} must be >= 0 (paper grid 0.1-2)")
    need(math.isfinite(pc.consistency_weight) and pc.consistency_weight >= 0,
         f"pace.consistency_weight: {pc.consistency_weight} must be >= 0 (paper grid 0.02-1)")
    need(pc.skip_first_blocks >= 0, f"pace.skip_first_blocks: {pc.skip_first_blocks} must be >= 0")
    need(pc.lazy_interval >= 1, f"pace.lazy_interval: {pc.lazy_interval} must be >= 1")
    if pc.mode == "fast" and recipe.is_causal_lm:
        p.append(f"pace.mode: 'fast' needs a classification/regression task but data.task is "
                 f"'{d.task}' (a causal LM); {fast_mode_estimate(d)}. Use pace.mode: full or lazy")
    need(d.max_length >= 8, f"data.max_length: {d.max_length} must be >= 8")
    if d.task == "glue":
        from pace_llm.tasks.glue import GLUE_TASKS

        need(d.glue_task in GLUE_TASKS,
             f"data.glue_task: {d.glue_task!r} is not allowed; expected one of {', '.join(GLUE_TASKS)}")
    need(d.num_examples > 0, f"data.num_examples: {d.num_examples} must be > 0")
    need(d.limit is None or d.limit > 0, f"data.limit: {d.limit} must be > 0 or null")
    need(t.max_steps >= 0, f"train.max_steps: {t.max_steps} must be >= 0")
    need(t.max_steps > 0 or t.epochs > 0, "train: set max_steps > 0 or epochs > 0")
    need(t.micro_batch_size >= 1, f"train.micro_batch_size: {t.micro_batch_size} must be >= 1")
    need(t.grad_accum >= 1, f"train.grad_accum: {t.grad_accum} must be >= 1")
    need(t.lr > 0 and math.isfinite(t.lr), f"train.lr: {t.lr} must be > 0")
    need(t.warmup_steps >= 0, f"train.warmup_steps: {t.warmup_steps} must be >= 0")
    need(t.weight_decay >= 0, f"train.weight_decay: {t.weight_decay} must be >= 0")
    need(t.max_grad_norm >= 0, f"train.max_grad_norm: {t.max_grad_norm} must be >= 0 (0 = off)")
    need(t.log_every >= 1, f"train.log_every: {t.log_every} must be >= 1")
    need(t.clean_grad_norm_every >= 0,
         f"train.clean_grad_norm_every: {t.clean_grad_norm_every} must be >= 0 (0 = never)")
    need(t.save_every >= 0, f"train.save_every: {t.save_every} must be >= 0")
    need(t.keep_last >= 1, f"train.keep_last: {t.keep_last} must be >= 1")
    need(t.max_bad_steps >= 1, f"train.max_bad_steps: {t.max_bad_steps} must be >= 1")
    need(bool(t.output_dir), "train.output_dir is empty: give a directory for the run")
    if t.resume not in (None, "auto"):
        need(Path(t.resume).is_dir(),
             f"train.resume: checkpoint path {t.resume!r} does not exist; use 'auto' or an existing "
             f"<output_dir>/checkpoints/step-N directory")
    need(e.every >= 0, f"eval.every: {e.every} must be >= 0")
    need(e.limit is None or e.limit > 0, f"eval.limit: {e.limit} must be > 0 or null")
    need(e.batch_size >= 1, f"eval.batch_size: {e.batch_size} must be >= 1")
    need(e.max_new_tokens >= 1, f"eval.max_new_tokens: {e.max_new_tokens} must be >= 1")
    if recipe.deepspeed is not None:
        need(Path(recipe.deepspeed).is_file(),
             f"deepspeed: config file {recipe.deepspeed!r} does not exist; use one of ds_configs/*.json")
    return p


def fast_mode_estimate(d: DataArgs, vocab: int = 32064, bytes_per: int = 4) -> str:
    """The memory a per-token vocab-logit history would take, for the fast-mode refusal."""
    rows = d.limit or 7473
    tokens = rows * min(d.max_length, 150)
    gb = tokens * vocab * bytes_per / 1e9
    return (f"its history buffer would hold every supervised token's {vocab}-way logits: "
            f"~{rows} rows x ~{tokens // rows} tokens x {vocab} x {bytes_per} B = ~{gb:.0f} GB")


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

TRAIN_EXAMPLES = """examples:
  pace-llm train --recipe recipes/demo.yaml                    # offline demo, one process
  deepspeed pace_llm/train.py --recipe recipes/gsm8k.yaml       # every GPU of the node
  torchrun --nproc_per_node 8 pace_llm/train.py --recipe recipes/gsm8k.yaml
  pace-llm train --recipe recipes/demo.yaml --pace.mode off     # override any key: --section.key
  pace-llm train --recipe recipes/gsm8k.yaml --print_config     # the resolved recipe (a recipe)

paths: a relative path in a recipe file is relative to that file's folder (deepspeed always;
model.name_or_path, data.path and data.eval_path when it exists there, else it is a hub id);
on the command line, relative to the current directory. train.output_dir is relative to the
current directory. The resolved recipe holds absolute paths, so it runs from anywhere."""


def build_parser(prog: str = "pace-llm train", description: str = TRAIN_EXAMPLES):
    """The jsonargparse parser: one group per recipe section, --recipe for the YAML file."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=prog, exit_on_error=False, default_env=False,
                            usage=f"{prog} --recipe FILE [--section.key VALUE ...]",
                            description=description)
    parser.add_argument("--recipe", action=ActionConfigFile, help="Recipe YAML file.")
    for name, cls in SECTIONS.items():
        parser.add_class_arguments(cls, name, help=f"{name} section")
    parser.add_argument("--deepspeed", type=str | None, default=None,
                        help="DeepSpeed JSON config; 'auto' values are filled from the recipe.")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                        help="Set by the deepspeed launcher; ignored (LOCAL_RANK is read from env).")
    return parser


def _recipe_files(argv: list[str]) -> list[str]:
    files = []
    for i, a in enumerate(argv):
        if a == "--recipe" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif a.startswith("--recipe="):
            files.append(a.split("=", 1)[1])
    return files


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise RecipeError([f"recipe file {path!r} does not exist"], source=path)
    if not os.path.isfile(path):
        raise RecipeError([f"recipe file {path!r} is a directory; give a YAML file"], source=path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise RecipeError([f"{path} is not valid YAML: {exc}"], source=path) from None
    except UnicodeDecodeError:
        raise RecipeError([f"{path} is not a text (UTF-8) file"], source=path) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError([f"{path} must hold a mapping of sections, got {type(raw).__name__}"],
                          source=path)
    return raw


@dataclass
class Command:
    """A parsed command line: the validated recipe, --print_config, and command-specific flags."""

    recipe: Recipe
    print_config: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def parse_command(argv: list[str] | None = None, prog: str = "pace-llm train",
                  extra: dict[str, dict[str, Any]] | None = None,
                  description: str = TRAIN_EXAMPLES) -> Command:
    """Parse ``--recipe FILE`` plus ``--section.key value`` overrides (and ``extra`` flags:
    name -> add_argument kwargs) into a validated recipe.

    Raises RecipeError listing every problem (unknown keys, bad types, bad values, cross-field).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    print_config = "--print_config" in argv
    argv = [a for a in argv if a != "--print_config"]
    parser = build_parser(prog, description)
    for flag, kwargs in (extra or {}).items():
        parser.add_argument(flag, **kwargs)
    problems: list[str] = []
    merged: dict[str, Any] = {}
    for path in _recipe_files(argv):
        raw = _read_yaml(path)
        found, good = check_raw(raw, path, parser)
        problems += found
        for section, body in _resolve_paths(raw, Path(path).resolve().parent).items():
            if isinstance(body, dict):
                merged.setdefault(section, {}).update(body)
            elif section in good:
                merged[section] = body
        for section, body in good.items():  # only well-typed keys reach the lenient recipe
            if isinstance(body, dict):
                merged.setdefault(f"_good_{section}", {}).update(body)
    if problems:  # also report the value problems among the keys that did parse
        raise RecipeError(problems + validate(_lenient_recipe(merged)))
    try:
        ns = parser.parse_args(argv)
    except Exception as exc:  # jsonargparse raises ArgumentError/NSKeyError/ValueError subclasses
        raise RecipeError([_clean_jsonargparse_error(exc)], source="command line") from None
    recipe = namespace_to_recipe(parser, ns)
    _apply_file_paths(recipe, merged, argv)
    problems = validate(recipe)
    if problems:
        raise RecipeError(problems)
    return Command(recipe, print_config, {k.lstrip("-").replace("-", "_"): ns.get(
        k.lstrip("-").replace("-", "_")) for k in (extra or {})})


def load_recipe(argv: list[str] | None = None) -> Recipe:
    """The validated Recipe of a train command line (see :func:`parse_command`)."""
    return parse_command(argv).recipe


# recipe keys that hold input paths; "always" ones are never hub ids
PATH_KEYS = {("deepspeed", None): "always", ("model", "name_or_path"): "if it exists",
             ("data", "path"): "if it exists", ("data", "eval_path"): "if it exists"}


def _resolve(value: Any, base: Path, always: bool) -> Any:
    if not isinstance(value, str) or not value or os.path.isabs(value):
        return value
    candidate = base / value
    return str(candidate.resolve()) if always or candidate.exists() else value


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """The recipe dict with its relative input paths resolved against ``base``."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for (section, key), rule in PATH_KEYS.items():
        always = rule == "always"
        if key is None and section in out:
            out[section] = _resolve(out[section], base, always)
        elif key is not None and isinstance(out.get(section), dict) and key in out[section]:
            out[section][key] = _resolve(out[section][key], base, always)
    return out


def _apply_file_paths(recipe: Recipe, merged: dict[str, Any], argv: list[str]) -> None:
    """Path keys: the recipe file's resolved value, unless the command line overrides it (then
    relative to the current directory)."""
    for (section, key), rule in PATH_KEYS.items():
        flag = f"--{section}" if key is None else f"--{section}.{key}"
        overridden = any(a == flag or a.startswith(flag + "=") for a in argv)
        holder, attr = (recipe, section) if key is None else (getattr(recipe, section), key)
        if overridden:
            setattr(holder, attr, _resolve(getattr(holder, attr), Path.cwd(), rule == "always"))
            continue
        body = merged.get(section) if key is not None else None
        if key is None and section in merged:
            setattr(holder, attr, merged[section])
        elif isinstance(body, dict) and key in body:
            setattr(holder, attr, body[key])


def _lenient_recipe(merged: dict[str, Any]) -> Recipe:
    """A Recipe from the well-typed keys of the recipe files (ill-typed and unknown skipped)."""
    sections = {name: cls(**merged.get(f"_good_{name}", {})) for name, cls in SECTIONS.items()}
    ds = merged.get("deepspeed")
    return Recipe(**sections, deepspeed=ds if isinstance(ds, str) else None)


def namespace_to_recipe(parser: Any, ns: Any) -> Recipe:
    init = parser.instantiate_classes(ns)
    kwargs = {name: getattr(init, name) for name in SECTIONS}
    return Recipe(**kwargs, deepspeed=init.deepspeed)


def _clean_jsonargparse_error(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()
    text = " ".join(line.strip() for line in msg if line.strip())
    bad = re.match(r'Parser key "(?P<key>[\w.]+)":.*Got value: (?P<value>.*)$', text)
    if bad:
        section, _, key = bad["key"].partition(".")
        types = _field_types(SECTIONS[section]) if section in SECTIONS else {}
        if key in types:
            return (f"{bad['key']}: {bad['value']!r} is not allowed; expected "
                    f"{_allowed(types[key])}")
    if "Unrecognized arguments" in text or "unrecognized arguments" in text:
        names = [f.name for s in SECTIONS.values() for f in dataclasses.fields(s)]
        bad = [a for a in text.split() if a.startswith("--")]
        hints = []
        for b in bad:
            sec, _, key = b.lstrip("-").partition(".")
            keys = ([f.name for f in dataclasses.fields(SECTIONS[sec])] if sec in SECTIONS else names)
            hints.append(f"{b}: {_nearest(key or sec, keys)}")
        return text + ("; " + "; ".join(hints) if hints else "")
    return text


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (what --print_config prints and runs save); itself a
    valid recipe."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
