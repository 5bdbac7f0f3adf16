"""Pre-flight checks: recipe keys that have no effect (warnings, at parse time) and the loaded
model against the recipe, tokenizer and data (errors, before DeepSpeed starts).

``inert_keys(recipe)`` lists the keys the user set (a value other than the schema default) that
the chosen mode ignores; config.parse_command prints each as one warning line. ``check_model``
runs after the tokenizer, task and base model are loaded and before ``deepspeed.initialize``:
every problem it finds is in one UserError, instead of an IndexError at step 0.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pace_llm.errors import UserError
from pace_llm.schema import SECTIONS, Recipe

log = logging.getLogger(__name__)

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
    (("data.num_examples", "data.seed"), lambda r: r.data.task != "synthetic",
     lambda r: f"data.task is '{r.data.task}' (only the synthetic task generates examples)", ""),
    (("data.path", "data.eval_path", "data.hub_config"), lambda r: r.data.task == "synthetic",
     lambda r: "data.task is 'synthetic' (its problems are generated, nothing is read)",
     "set --data.task gsm8k, glue or instruct to read data"),
    (("data.chat_template",), lambda r: r.data.prompt_style != "chat" or not r.is_causal_lm,
     lambda r: (f"data.prompt_style is '{r.data.prompt_style}'" if r.is_causal_lm else
                f"data.task '{r.data.task}' is a classifier") + " (only chat prompts use it)",
     "set --data.prompt_style chat"),
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


def _value(recipe: Any, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(recipe, section), name)


def inert_keys(recipe: Recipe) -> list[str]:
    """One line per key set to a non-default value that the recipe's mode ignores."""
    defaults = {name: cls() for name, cls in SECTIONS.items()}
    out, seen = [], set()
    for keys, ignored, reason, fix in RULES:
        if not ignored(recipe):
            continue
        for key in keys:
            section, _, name = key.partition(".")
            value = _value(recipe, key)
            if key in seen or value == getattr(defaults[section], name):
                continue
            seen.add(key)
            tail = f"; remove it, or {fix}" if fix else "; remove it"
            out.append(f"{key} = {value!r} has no effect: {reason(recipe)}{tail}")
    return out


def fast_mode_estimate(d: Any, vocab: int = 32064, bytes_per: int = 4) -> str:
    """The memory a per-token vocab-logit history would take, for the fast-mode refusal."""
    rows = d.limit or 7473
    tokens = rows * min(d.max_length, 150)
    gb = tokens * vocab * bytes_per / 1e9
    return (f"its history buffer would hold every supervised token's {vocab}-way logits: "
            f"~{rows} rows x ~{tokens // rows} tokens x {vocab} x {bytes_per} B = ~{gb:.0f} GB")


def before_run(recipe: Recipe) -> None:
    """Parse-time checks of a command about to run (train, data-check): a local
    model.name_or_path exists and is a directory (config.json and weights are checked when the
    model loads: data-check needs only the tokenizer), and each key set to no effect is logged
    once (rank 0) as a warning."""
    if recipe.model.build is None:
        from pace_llm.model import check_model_dir

        check_model_dir(recipe.model.name_or_path, need_model=False)
    if os.environ.get("RANK", "0") == "0":  # once, not once per rank
        for line in inert_keys(recipe):
            log.warning("warning: %s", line)


# ------------------------------------------------------------- what the recipe points at
ATTN = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4",
        "flex_attention", "paged|eager")
"""transformers 5's attention backends (model.attn_implementation)."""


def resource_problems(recipe: Recipe) -> list[str]:
    """config.validate's checks of what the recipe names outside itself, before anything loads:
    the DeepSpeed JSON (structure, via DeepSpeed's own config classes), a model.build's
    model_type, and model.attn_implementation."""
    problems = []
    m, ds = recipe.model, recipe.deepspeed
    if m.build is not None:
        from pace_llm.tinymodel import build_problem

        problems += [problem] if (problem := build_problem(m.build)) else []
    attn = m.attn_implementation
    if attn is not None and attn not in ATTN and "/" not in attn:
        near = difflib.get_close_matches(attn, ATTN, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}? " if near else ""
        problems.append(f"model.attn_implementation: {attn!r} is not allowed; {hint}expected one "
                        f"of {', '.join(ATTN)} (or a hub kernel like kernels-community/"
                        "flash-attn), or null for the model's default")
    if ds is not None and Path(ds).is_file():
        from pace_llm.dsconfig import read_ds_json

        problems += read_ds_json(ds, deep=False)[1]  # DeepSpeed's own classes: in training
    elif ds is not None:
        what = "is a directory; give a JSON file" if Path(ds).is_dir() else "does not exist"
        problems.append(f"deepspeed: config file {ds!r} {what}; use one of ds_configs/*.json")
    return problems


# ----------------------------------------------------------------------- the loaded model
# learned position tables that start after the padding index (RoBERTa family)
POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "xlm-roberta-xl": 2}


def check_model(recipe: Recipe, model: Any, tokenizer: Any, task: Any) -> None:
    """Refuse a model that cannot run the task: token ids beyond its embedding rows, or
    sequences beyond its position limit. Every problem in one UserError.

    Call after the base model is loaded (and adapters injected) and before the optimizer and
    ``deepspeed.initialize``. ``task`` is the TaskData of ``pace_llm.data.build.build_task``.
    """
    problems = _vocab_problems(model, tokenizer, task) + _length_problems(recipe, model, task)
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} problem(s) with this model:\n"
                        + "\n".join(f"  - {p}" for p in problems))


def _ids(task: Any) -> Iterable[list[int]]:
    rows = [*task.eval, *(r for rows in task.extra_eval.values() for r in rows)]  # eval: lists
    for row in rows:
        for key in ("input_ids", "prompt_ids", "target_ids"):
            if row.get(key):
                yield row[key]


def _vocab_problems(model: Any, tokenizer: Any, task: Any) -> list[str]:
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if not isinstance(rows, int):
        return []
    top_tokenizer = len(tokenizer) - 1
    top_data = max([task.max_train_id, *(max(ids) for ids in _ids(task))])  # train: the cache's
    if max(top_tokenizer, top_data) < rows:
        return []
    return [(f"the tokenizer's ids reach {top_tokenizer} (len(tokenizer) = {len(tokenizer)}; "
             f"the task's examples use ids up to {top_data}) but the model has {rows} embedding "
             f"rows (ids 0..{rows - 1}): the tokenizer does not belong to this model. Use the "
             "tokenizer saved with the model (same directory), or resize the model's "
             "embeddings (model.resize_token_embeddings) and save it")]


def _length_problems(recipe: Recipe, model: Any, task: Any) -> list[str]:
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return []
    limit -= POSITION_OFFSET.get(getattr(config, "model_type", None), 0)
    problems = []
    if recipe.data.max_length > limit:
        problems.append(f"data.max_length: {recipe.data.max_length} is beyond the model's "
                        f"{limit} positions (config.max_position_embeddings); set "
                        f"--data.max_length {limit} (or lower)")
    inputs = [r.get("prompt_ids") or r.get("input_ids") or [] for r in task.eval]
    longest = max(map(len, inputs), default=0)
    if longest > limit:
        problems.append(f"an evaluation input has {longest} tokens, beyond the model's {limit} "
                        "positions (evaluation rows are never cut); use shorter evaluation rows "
                        "(data.eval_path) or a model with more positions")
    return problems
