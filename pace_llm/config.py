"""The recipe's parser: ``--recipe FILE`` (one or more) and ``--section.key value`` flags, through
jsonargparse, into a :class:`~pace_llm.schema.Recipe`; :func:`parse_command` then has
pace_llm/checks.py check it as a whole.

Each recipe file is checked key by key before jsonargparse sees it (unknown keys with the nearest
valid name, values of the wrong type), so that every problem is found at once, and its relative
paths are resolved against its folder; jsonargparse parses its well-typed keys and the flags in
command-line order. ``load_recipe(argv)`` returns a valid Recipe or raises
:class:`~pace_llm.errors.RecipeError` listing *every* problem found, each naming the key, the
value, what is allowed and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentError

from pace_llm.checks import check
from pace_llm.data.mix import PATH_KEYS as MIX_PATH_KEYS
from pace_llm.errors import RecipeError, read_text
from pace_llm.schema import SECTIONS, Recipe

__all__ = ["Command", "build_parser", "load_recipe", "parse_command"]


# --- Raw-file checks: every unknown key and every value jsonargparse refuses, all at once.

def _allowed(tp: Any) -> str:
    """A field type as a user reads it: "one of 'a', 'b'", "int", "str | None", "a list of
    'a', 'b' (e.g. [a])"."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list and typing.get_origin(item := typing.get_args(tp)[0]) is Literal:
        names = typing.get_args(item)
        return f"a list of {', '.join(map(repr, names))} (e.g. [{names[0]}])"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# names that PEFT / TRL / HF Trainer users type, mapped to ours
ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
           "target_modules": "targets", "use_rslora": "rslora", "learning_rate": "lr",
           "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size":
           "micro_batch_size", "num_train_epochs": "epochs", "lr_scheduler_type": "schedule",
           "max_seq_length": "max_length", "model_name_or_path": "name_or_path"}


LENGTH_GROUPING = ("pace_llm does not pack examples into one sequence: each global batch is "
                   "grouped by length (always on), so a micro-batch pads little; remove it")
PEERS = {
    "load_in_4bit": "4-bit loading is quant.bits here: --quant.bits 4 (QLoRA, nf4 by default)",
    "load_in_8bit": "8-bit loading is quant.bits here: --quant.bits 8",
    "bnb_4bit_quant_type": "the 4-bit type is quant.type here (nf4 or fp4)",
    "bnb_4bit_use_double_quant": "double quantization is quant.double_quant here",
    "bnb_4bit_compute_dtype": "the 4-bit compute dtype is quant.compute_dtype here",
    "val_set_size": ("the evaluation hold-out is data.holdout here: the fraction of the training "
                     "rows held out when there is no evaluation split (default 0.05; at least 1, "
                     "at most 200 rows), e.g. --data.holdout 0.1; or give data.eval_path"),
    "packing": LENGTH_GROUPING, "sample_packing": LENGTH_GROUPING,
    "group_by_length": "batches are always grouped by length here; remove it",
}
"""Keys users bring from peers (transformers, PEFT, TRL, axolotl) that are not one of our keys
under another name: where their meaning lives here (or what we do instead)."""


def _nearest(key: str, options: list[str]) -> str:
    if key in PEERS:
        return PEERS[key]
    if ALIASES.get(key) in options:
        return f"did you mean '{ALIASES[key]}'?"
    near = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f"did you mean '{near[0]}'?" if near else "valid keys: " + ", ".join(sorted(options))


def check_raw(raw: dict[str, Any], source: str, parser: Any) -> tuple[list[str], dict[str, Any]]:
    """Unknown sections/keys (with the nearest valid name) and values jsonargparse refuses, in
    the file's order, so every problem is found at once. The known keys are parsed together
    first (one jsonargparse call, ~0.1 s); only if that fails is each key parsed on its own to
    name the ones refused. Returns (problems, the well-typed keys as a recipe dict)."""
    found: list[str | tuple[str, str, Any]] = []  # a problem, or a known key to type-check
    good: dict[str, Any] = {}
    top = list(SECTIONS) + ["deepspeed"]
    for section, body in raw.items():
        if section not in top:
            found.append(f"unknown section '{section}' in {source}: {_nearest(section, top)}")
            continue
        if section == "deepspeed":
            if body is not None and not isinstance(body, str):
                found.append(f"deepspeed: {body!r} is not a path string; give e.g. "
                             "ds_configs/zero2.json")
            else:
                good[section] = body
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            found.append(f"{section}: expected a mapping of keys, got {body!r}")
            continue
        types = typing.get_type_hints(SECTIONS[section])
        for key, value in body.items():
            found.append((section, key, value) if key in types else
                         f"unknown key '{section}.{key}' in {source}: "
                         f"{_nearest(key, list(types))}")
    known = [item for item in found if isinstance(item, tuple)]
    together: dict[str, dict[str, Any]] = {}
    for section, key, value in known:
        together.setdefault(section, {})[key] = value
    all_typed = not together or _parses_object(parser, together)
    problems = []
    for item in found:
        if isinstance(item, str):
            problems.append(item)
            continue
        section, key, value = item
        if all_typed or _parses(parser, section, key, value):
            good.setdefault(section, {})[key] = value
        else:
            types = typing.get_type_hints(SECTIONS[section])
            problems.append(f"{section}.{key}: {value!r} is not allowed; expected "
                            f"{_allowed(types[key])}")
    return problems, good


def _parses(parser: Any, section: str, key: str, value: Any) -> bool:
    """jsonargparse accepts ``value`` for ``section.key`` (its own type check)."""
    return _parses_object(parser, {section: {key: value}})


def _parses_object(parser: Any, sections: dict[str, dict[str, Any]]) -> bool:
    """jsonargparse accepts these sections' values (its own type checks)."""
    try:
        parser.parse_object(sections)
    except (ArgumentError, ValueError, TypeError):
        return False
    return True


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
                  description: str = TRAIN_EXAMPLES, preflight: bool = True,
                  training: bool = True) -> Command:
    """Parse ``--recipe FILE`` plus ``--section.key value`` overrides (and ``extra`` flags:
    name -> add_argument kwargs) into a validated recipe.

    Raises RecipeError listing every problem (unknown keys, bad types, bad values, cross-field).
    ``preflight`` (a command about to run): also what the machine must hold (a local model
    path exists, QLoRA's package), and keys set to no effect in the chosen mode are logged as
    warnings (pace_llm/checks.py); unless it only prints the recipe, the hub ids it names can
    be had, and with ``training`` what a training run needs (data.max_length within the
    model's positions, train.report_to's backends installed and W&B logged in), all before
    anything is built.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    print_config = "--print_config" in argv
    argv = [a for a in argv if a != "--print_config"]
    parser = build_parser(prog, description)
    for flag, kwargs in (extra or {}).items():
        parser.add_argument(flag, **kwargs)
    argv, problems, files = _read_recipe_files(argv, parser)
    try:
        ns = parser.parse_args(argv)
    except ArgumentError as exc:  # what jsonargparse raises with exit_on_error=False
        raise RecipeError([*problems, _clean_jsonargparse_error(exc)]) from None
    recipe = namespace_to_recipe(parser, ns)
    _resolve_flag_paths(recipe, argv)
    loads = preflight and not print_config  # printing the recipe loads nothing
    if loads:
        problems += _remote_code_problems(recipe, argv, files)
    check(recipe, about_to_run=preflight, found=problems, loads=loads,
          trains=loads and training)
    return Command(recipe, print_config, {k.lstrip("-").replace("-", "_"): ns.get(
        k.lstrip("-").replace("-", "_")) for k in (extra or {})})


CODE_KEYS = {"trust_remote_code": lambda v: v is True,
             "attn_implementation": lambda v: isinstance(v, str) and "/" in v}
"""model.* keys that make a command run code from elsewhere (the model repository's own Python,
a hub attention kernel) when set so."""


def _remote_code_problems(recipe: Recipe, argv: list[str], files: list[str]) -> list[str]:
    """A key that runs code from elsewhere (:data:`CODE_KEYS`) counts only on the command line:
    a recipe file (a run's recorded recipe.yaml, one received from someone else) never makes
    this command run the model repository's Python or a hub kernel."""
    problems = []
    for key, runs_code in CODE_KEYS.items():
        value, flag = getattr(recipe.model, key), f"--model.{key}"
        if not runs_code(value) or _on_command_line(argv, flag):
            continue
        shown = "true" if value is True else value
        problems.append(f"model.{key}: {shown} comes from the recipe file {' / '.join(files)}; "
                        "code from outside pace_llm (a model's own Python, a hub kernel) runs "
                        f"only when the command line asks for it: add {flag} {shown} (only for "
                        "code you trust), or set it otherwise")
    return problems


def _on_command_line(argv: list[str], flag: str) -> bool:
    """Whether ``flag`` is given in ``argv`` (``--flag value`` or ``--flag=value``)."""
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def load_recipe(argv: list[str] | None = None) -> Recipe:
    """The validated Recipe of a train command line (see :func:`parse_command`)."""
    return parse_command(argv, preflight=False).recipe


def _read_recipe_files(argv: list[str], parser: Any
                       ) -> tuple[list[str], list[str], list[str]]:
    """``argv`` with each ``--recipe FILE`` replaced by that file's well-typed keys as YAML text
    (its relative paths resolved against its folder), the problems of its other keys, and the
    files, in order."""
    out: list[str] = []
    problems: list[str] = []
    files: list[str] = []
    args = iter(argv)
    for arg in args:
        path = arg.split("=", 1)[1] if arg.startswith("--recipe=") else (
            next(args, None) if arg == "--recipe" else None)
        if path is None:
            out.append(arg)
            continue
        found, good = check_raw(_read_yaml(path), path, parser)
        problems += found
        files.append(path)
        out += ["--recipe", yaml.safe_dump(_resolve_paths(good, Path(path).resolve().parent))]
    return out, problems, files


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


def _resolve_flag_paths(recipe: Recipe, argv: list[str]) -> None:
    """A path key given on the command line is relative to the current directory."""
    for (section, key), rule in PATH_KEYS.items():
        flag = f"--{section}" if key is None else f"--{section}.{key}"
        if _on_command_line(argv, flag):
            holder, attr = (recipe, section) if key is None else (getattr(recipe, section), key)
            setattr(holder, attr, _resolve(getattr(holder, attr), Path.cwd(), rule == "always"))


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
