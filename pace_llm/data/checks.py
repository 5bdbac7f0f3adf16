"""The data section's checks: pure functions of the recipe, each problem naming its key
(the recipe's checks report them with the rest)."""

from __future__ import annotations

import difflib
import math
from typing import Any

from pace_llm.data.mix import KEYS, source_name
from pace_llm.data.templates import name_problem
from pace_llm.data.tokens import prompt_style_problem, renders_chat
from pace_llm.schema import TASKS
from pace_llm.tasks.glue import GLUE_TASKS


def data_problems(recipe: Any) -> list[str]:
    """Every problem of ``recipe.data`` and of how it meets the other sections."""
    d, t = recipe.data, recipe.train
    p: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.append(msg)

    need(d.max_length >= 8, f"data.max_length: {d.max_length} must be >= 8")
    if d.task == "glue":
        need(d.glue_task in GLUE_TASKS, f"data.glue_task: {d.glue_task!r} is not allowed; "
             f"expected one of {', '.join(GLUE_TASKS)}")
    need(d.num_examples > 0, f"data.num_examples: {d.num_examples} must be > 0")
    need(d.limit is None or d.limit > 0, f"data.limit: {d.limit} must be > 0 or null")
    need(0 < d.holdout < 1, f"data.holdout: {d.holdout} must be a fraction between 0 and 1 "
         "(e.g. 0.05: the last 5% of the training rows are evaluated, at least 1, at most 200)")
    need(d.pad_to_multiple_of is None or d.pad_to_multiple_of >= 1,
         f"data.pad_to_multiple_of: {d.pad_to_multiple_of} must be >= 1 (1 = no rounding)")
    need(d.shuffle_buffer >= 1, f"data.shuffle_buffer: {d.shuffle_buffer} must be >= 1 "
         "(1 = file order)")
    if (problem := name_problem(d.chat_template)) is not None:
        p.append(problem)
    elif TASKS[d.task] == "causal_lm" and not d.mix and (
            problem := prompt_style_problem(d.prompt_style, d.chat_template)) is not None:
        p.append(problem)
    if d.streaming:
        need(t.max_steps > 0, "data.streaming needs train.max_steps > 0: a stream has no known "
             "length, so train.epochs cannot be turned into steps")
        need(recipe.pace.mode != "fast", "pace.mode 'fast' keeps an output per training example "
             "and cannot stream; use full or lazy, or data.streaming: false")
        need(d.task != "synthetic", "data.streaming: the synthetic task is generated in memory; "
             "stream a file or hub dataset (data.task gsm8k, instruct or glue)")
    return p + mix_problems(d)


def mix_problems(data: Any) -> list[str]:
    """Every problem of ``data.mix`` (and of what it conflicts with), each naming the key."""
    mix = data.mix
    if mix is None:
        return []
    if not isinstance(mix, list) or not mix:
        return [f"data.mix: {mix!r} must be a non-empty list of sources like {{path: x.jsonl, "
                "weight: 1}}"]
    p: list[str] = []
    if data.path:
        p.append(f"data.path {data.path!r} and data.mix are both set: a mixture lists its paths "
                 "in data.mix; remove data.path")
    if data.streaming:
        p.append("data.streaming with data.mix is not supported: stream one source, or mix "
                 "sources through the task cache (data.streaming: false)")
    names: dict[str, int] = {}
    for i, item in enumerate(mix):
        at = f"data.mix[{i}]"
        if not isinstance(item, dict):
            p.append(f"{at}: {item!r} must be a mapping like {{path: x.jsonl, weight: 1}}")
            continue
        for key in item:
            if key not in KEYS:
                near = difflib.get_close_matches(str(key), KEYS, n=1, cutoff=0.5)
                hint = f"did you mean '{near[0]}'?" if near else "valid keys: " + ", ".join(KEYS)
                p.append(f"{at}.{key}: unknown key; {hint}")
        p += _item_problems(at, item, data)
        name = source_name(item, i)
        if name in names:
            p.append(f"{at}: source name {name!r} is also data.mix[{names[name]}]'s; give each "
                     "source a distinct name: key")
        names.setdefault(name, i)
    return p + _weight_sum_problems(mix) + _template_problems(mix, data)


def _template_problems(mix: list[Any], data: Any) -> list[str]:
    """The sources that render conversations (instruct, or a causal task with prompt_style
    chat) must render them with one chat template: the adapter is exported, evaluated and served
    with one (chat_template.jinja), so a second one would be trained on and then never used.
    (Told apart by the recipe's keys: instruct's plain layout, a template's name or file, or the
    tokenizer's own.)"""
    used: dict[str, list[str]] = {}
    for i, item in enumerate(mix):
        if not isinstance(item, dict):
            continue
        task = item.get("task", data.task)
        style = item.get("prompt_style", data.prompt_style)
        if renders_chat(task, style):
            template = item.get("chat_template", data.chat_template)
            shown = ("pace_llm's plain layout" if style != "chat" else
                     "the tokenizer's own" if template is None else repr(template))
            used.setdefault(shown, []).append(f"data.mix[{i}] ({source_name(item, i)})")
    if len(used) < 2:
        return []
    listed = "; ".join(f"{', '.join(at)}: {shown}" for shown, at in used.items())
    return [f"data.mix: the sources render conversations with {len(used)} chat templates "
            f"({listed}); an adapter is evaluated, exported and served with one: set one "
            "data.chat_template for every source (or none, for the tokenizer's own)"]


def _valid_weight(weight: Any) -> bool:
    """A source's weight: a finite number > 0 (not a bool)."""
    return (isinstance(weight, (int, float)) and not isinstance(weight, bool)
            and math.isfinite(weight) and weight > 0)


def _weight_sum_problems(mix: list[Any]) -> list[str]:
    """The weights' sum must be a finite number (each is checked on its own above)."""
    weights = [item.get("weight", 1.0) for item in mix if isinstance(item, dict)]
    if not all(_valid_weight(w) for w in weights) or math.isfinite(sum(weights)):
        return []
    shown = ", ".join(map(repr, weights))
    return [(f"data.mix: the weights ({shown}) sum to more than the largest float; only their "
             "ratios matter: scale them down (e.g. 1 and 1)")]


def _item_problems(at: str, item: dict[str, Any], data: Any) -> list[str]:
    p = []
    if not isinstance(item.get("path"), str) or not item["path"]:
        p.append(f"{at}.path: {item.get('path')!r}; every source needs a path (a local file or "
                 "directory, or a hub dataset id)")
    weight = item.get("weight", 1.0)
    if not _valid_weight(weight):
        p.append(f"{at}.weight: {weight!r} must be a number > 0 (a source's share of the "
                 "examples is its weight over the sum of the weights)")
    task = item.get("task", data.task)
    if task not in TASKS:
        p.append(f"{at}.task: {task!r} is not allowed; expected one of {', '.join(TASKS)}")
    elif TASKS[task] != TASKS[data.task]:
        p.append(f"{at}.task: {task!r} trains a {TASKS[task]} model but data.task {data.task!r} a "
                 f"{TASKS[data.task]} one; every source of a mixture trains the same head")
    if item.get("prompt_style", "plain") not in ("plain", "chat"):
        p.append(f"{at}.prompt_style: {item['prompt_style']!r} is not allowed; expected plain "
                 "or chat")
    limit = item.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        p.append(f"{at}.limit: {limit!r} must be an integer > 0 or null")
    columns = item.get("columns")
    if columns is not None and not (isinstance(columns, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in columns.items())):
        p.append(f"{at}.columns: {columns!r} must map task fields to your data's fields, e.g. "
                 "{question: prompt, answer: response}")
    for key in ("name", "eval_path", "hub_config", "chat_template", "glue_task"):
        if item.get(key) is not None and not isinstance(item[key], str):
            p.append(f"{at}.{key}: {item[key]!r} must be a string")
    template = item.get("chat_template")
    if isinstance(template, str) and (problem := name_problem(template, f"{at}.chat_template")):
        p.append(problem)
    style, template = item.get("prompt_style", data.prompt_style), item.get(
        "chat_template", data.chat_template)
    if TASKS.get(task) == "causal_lm" and isinstance(template, (str, type(None))) and (
            problem := prompt_style_problem(style, template)):
        p.append(f"{at}: {problem}")
    return p
