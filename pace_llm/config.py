"""The recipe, parsed by jsonargparse and validated as a whole.

The schema is pace_llm/schema.py (its names are importable from here too).
``load_recipe(argv)`` returns a validated :class:`Recipe` or raises :class:`RecipeError`
listing *every* problem found, each naming the key, the value, what is allowed and how to fix
it.
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
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentError

from pace_llm.data.checks import data_problems
from pace_llm.data.mix import PATH_KEYS as MIX_PATH_KEYS
from pace_llm.errors import UserError, read_text
from pace_llm.families import PRESET_NAMES
from pace_llm.preflight import before_run, fast_mode_estimate, resource_problems
from pace_llm.schema import (SECTIONS, DataArgs, EvalArgs, ExportArgs, LoraArgs, ModelArgs,
                             PaceArgs, QuantArgs, Recipe, TrainArgs, dump_recipe, recipe_to_dict)

__all__ = ["SECTIONS", "Command", "DataArgs", "EvalArgs", "ExportArgs", "LoraArgs", "ModelArgs",
           "PaceArgs", "QuantArgs", "Recipe", "RecipeError", "TrainArgs", "dump_recipe",
           "load_recipe", "parse_command", "recipe_to_dict", "validate"]


class RecipeError(UserError):
    """One or more problems in a recipe; ``str()`` is the one problem, or lists them all."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(problems[0])
            return
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


# --- Raw-file checks: every unknown key and every value jsonargparse refuses, all at once.

def _allowed(tp: Any) -> str:
    """A field type as a user reads it: "one of 'a', 'b'", "int", "str | None"."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


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
        types = typing.get_type_hints(SECTIONS[section])
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
    try:
        parser.parse_object({section: {key: value}})
    except (ArgumentError, ValueError, TypeError):
        return False
    return True


# --- Semantic validation of the parsed recipe: every problem at once.

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
    need(not (m.name_or_path and m.build is not None), f"model.name_or_path {m.name_or_path!r} "
         "and model.build are both set (build makes a random-init base, ignoring name_or_path): "
         "to train that model add --model.build null; to build, leave name_or_path empty")
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
    return p + data_problems(recipe) + resource_problems(recipe)  # data; DS JSON, model.build


# --- Parsing

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
    from argparse import RawDescriptionHelpFormatter

    from jsonargparse import (ActionConfigFile, ArgumentParser, DefaultHelpFormatter,
                              set_parsing_settings)

    class Formatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
        """jsonargparse's help, with the examples kept as written."""

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=prog, exit_on_error=False, default_env=False,
                            usage=f"{prog} --recipe FILE [--section.key VALUE ...]",
                            description=description, formatter_class=Formatter)
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
        raw = yaml.safe_load(read_text(Path(path)))  # not UTF-8 / binary: names the line
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"{path} is not valid YAML{where}: {what}"], source=path) from None
    if raw is None:
        empty = f"recipe file {path!r} is empty (no sections); give at least model: {{...}}"
        raise RecipeError([empty], source=path)
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
                  description: str = TRAIN_EXAMPLES, preflight: bool = True) -> Command:
    """Parse ``--recipe FILE`` plus ``--section.key value`` overrides (and ``extra`` flags:
    name -> add_argument kwargs) into a validated recipe.

    Raises RecipeError listing every problem (unknown keys, bad types, bad values, cross-field).
    ``preflight`` (a command about to run): a local model path must exist, and keys set to no
    effect in the chosen mode are logged as warnings (preflight.inert_keys).
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
        raise RecipeError(problems + validate(_lenient_recipe(merged, parser, argv)))
    try:
        ns = parser.parse_args(argv)
    except ArgumentError as exc:  # what jsonargparse raises with exit_on_error=False
        raise RecipeError([_clean_jsonargparse_error(exc)], source="command line") from None
    recipe = namespace_to_recipe(parser, ns)
    _apply_file_paths(recipe, merged, argv)
    problems = validate(recipe)
    if problems:
        raise RecipeError(problems)
    if preflight:
        before_run(recipe)  # the local model path exists; warnings for keys with no effect
    return Command(recipe, print_config, {k.lstrip("-").replace("-", "_"): ns.get(
        k.lstrip("-").replace("-", "_")) for k in (extra or {})})


def load_recipe(argv: list[str] | None = None) -> Recipe:
    """The validated Recipe of a train command line (see :func:`parse_command`)."""
    return parse_command(argv, preflight=False).recipe


# recipe keys that hold input paths; "always" ones are never hub ids
PATH_KEYS = {("deepspeed", None): "always", ("model", "name_or_path"): "if it exists",
             ("data", "path"): "if it exists", ("data", "eval_path"): "if it exists",
             ("data", "chat_template"): "if it exists", ("data", "mix"): "if it exists"}


def _resolve(value: Any, base: Path, always: bool) -> Any:
    if isinstance(value, list):  # data.mix: each source's paths
        return [{k: _resolve(v, base, False) if k in MIX_PATH_KEYS else v for k, v in item.items()}
                if isinstance(item, dict) else item for item in value]
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


def _lenient_recipe(merged: dict[str, Any], parser: Any, argv: list[str]) -> Recipe:
    """A Recipe from the well-typed keys of the recipe files and then of the ``--section.key
    value`` flags (ill-typed and unknown ones skipped)."""
    for flag, text in pairwise(argv):  # typed as jsonargparse types them
        section, _, key = flag[2:].partition(".")
        if flag.startswith("--") and section in SECTIONS and _parses(parser, section, key, text):
            value = parser.parse_object({section: {key: text}})[section][key]
            merged.setdefault(f"_good_{section}", {})[key] = value
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
        types = typing.get_type_hints(SECTIONS[section]) if section in SECTIONS else {}
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
