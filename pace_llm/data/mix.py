"""``data.mix``: several data sources in one run, sampled by weight.

A recipe lists its sources instead of ``data.path``::

    data:
      task: instruct            # the default task of every source; all share its model head
      max_length: 1024          # every data key applies to every source ...
      mix:
        - {path: data/alpaca.jsonl, weight: 3}
        - {path: openai/gsm8k, task: gsm8k, weight: 1, name: math}
        - {path: data/chats.csv, weight: 1, columns: {instruction: prompt, output: reply}}

... unless a source sets its own (:data:`OVERRIDES`). Each source is built as a task of its
own through the task cache (tokenized once, memory-mapped), so a source keeps its row-numbered
errors, prefixed with ``data.mix[i] (name)``. Training draws each example's source by weight
(:class:`pace_llm.data.MixturePlan`); every metrics record counts the examples of each source
(``examples_by_source``). Evaluation: the first source is the run's eval set (its metric ranks
checkpoints and drives ``eval.patience``); every other source is scored on its own eval split,
with its own task's metric, under ``extra.<name>``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pace_llm.errors import UserError
from pace_llm.tasks import (TASKS, ExampleSequence, TaskData, example_lengths,
                            max_input_id)

OVERRIDES = ("task", "eval_path", "hub_config", "prompt_style", "chat_template", "limit",
             "glue_task", "columns")
"""The data keys a source may set for itself (besides ``path``, ``weight`` and ``name``)."""
KEYS = ("path", "weight", "name", *OVERRIDES)
PATH_KEYS = ("path", "eval_path", "chat_template")
"""A source's keys that hold paths (resolved against the recipe file's folder)."""


@dataclass(frozen=True)
class Mixture:
    """The sources of a mixture, in recipe order."""

    names: list[str]
    weights: list[float]
    sizes: list[int]
    """Training examples of each source."""


def source_name(item: dict[str, Any], i: int) -> str:
    """The source's ``name``, else its file's stem (or hub id's last part)."""
    if item.get("name"):
        return str(item["name"])
    path = str(item.get("path", f"source{i}"))
    return Path(path).stem if Path(path).suffix else path.rstrip("/").rsplit("/", 1)[-1]


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
    return p


def _item_problems(at: str, item: dict[str, Any], data: Any) -> list[str]:
    p = []
    if not isinstance(item.get("path"), str) or not item["path"]:
        p.append(f"{at}.path: {item.get('path')!r}; every source needs a path (a local file or "
                 "directory, or a hub dataset id)")
    weight = item.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
            math.isfinite(weight) and weight > 0):
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
    return p


OWN = ("eval_path", "hub_config", "limit", "columns")
"""Keys that belong to one source: a source that does not set them has none (the data
section's apply to every source otherwise: task, prompt_style, chat_template, max_length…)."""


def source_args(data: Any) -> list[Any]:
    """One ``DataArgs`` per source: the recipe's data section with the source's path and own
    keys (valid items: :func:`mix_problems` has passed)."""
    return [dataclasses.replace(data, mix=None, path=item["path"],
                                **{**dict.fromkeys(OWN), **{k: item[k] for k in OVERRIDES
                                                            if k in item}})
            for item in data.mix]


def build(data: Any, tok: Any, build_one: Callable[[Any, Any], TaskData]) -> TaskData:
    """The mixture as one TaskData: each source built by ``build_one`` (the task cache), its
    training examples numbered after the previous source's."""
    names = [source_name(item, i) for i, item in enumerate(data.mix)]
    weights = [float(item.get("weight", 1.0)) for item in data.mix]
    tasks = []
    for i, (name, args) in enumerate(zip(names, source_args(data))):
        try:
            tasks.append(build_one(args, tok))
        except UserError as exc:
            raise UserError(f"data.mix[{i}] ({name}): {exc}") from None
        if tasks[-1].num_labels != tasks[0].num_labels:
            raise UserError(f"data.mix[{i}] ({name}): {tasks[-1].num_labels} labels, but "
                            f"data.mix[0] ({names[0]}) has {tasks[0].num_labels}; every source "
                            "of a mixture trains the same head")
    first = tasks[0]
    extra: dict[str, list[dict]] = {f"{names[0]}/{k}": v for k, v in first.extra_eval.items()}
    metrics = {}
    for name, task in zip(names[1:], tasks[1:]):
        extra[name] = task.eval
        metrics[name] = (task.metric, task.main_metric)
        for k, rows in task.extra_eval.items():
            extra[f"{name}/{k}"], metrics[f"{name}/{k}"] = rows, (task.metric, task.main_metric)
    stats: dict[str, int] = {}
    for name, task in zip(names, tasks):
        for key, value in task.stats.items():
            if key != "eval_rows":
                stats[key] = stats.get(key, 0) + value
        stats[f"train_rows[{name}]"] = len(task.train)
    return TaskData(kind=first.kind, train=ConcatExamples([t.train for t in tasks]),
                    eval=first.eval, num_labels=first.num_labels,
                    stats={**stats, "eval_rows": len(first.eval)}, metric=first.metric,
                    name="mix(" + ", ".join(names) + ")", main_metric=first.main_metric,
                    extra_eval=extra, extra_metrics=metrics,
                    mixture=Mixture(names, weights, [len(t.train) for t in tasks]))


class ConcatExamples(ExampleSequence):
    """The training examples of several sources, numbered one source after another."""

    def __init__(self, parts: list[Sequence[dict]]):
        self.parts = parts
        self.starts = [0, *np.cumsum([len(p) for p in parts]).tolist()]

    def __len__(self) -> int:
        return self.starts[-1]

    def row(self, j: int) -> dict:
        s = bisect_right(self.starts, j) - 1
        return self.parts[s][j - self.starts[s]]

    def part_lengths(self) -> list[Sequence[int]]:
        """Each source's example lengths (the cache's length column, no row read)."""
        return [example_lengths(p) for p in self.parts]

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate([np.asarray(x, dtype=np.int32) for x in self.part_lengths()])

    @property
    def max_token_id(self) -> int:
        return max(max_input_id(p) for p in self.parts)
