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
(:class:`pace_llm.data.batches.MixtureOrder`); every metrics record counts the examples of each
source (``examples_by_source``). Evaluation: the first source is the run's eval set (its metric
ranks checkpoints and drives ``eval.patience``); every other source is scored on its own eval
split, with its own task's metric, under ``extra.<name>``. The recipe checks of ``data.mix``
are :func:`pace_llm.data.checks.mix_problems`.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pace_llm.data.examples import Examples, ExampleSequence, Mixture, TaskData
from pace_llm.errors import UserError

OVERRIDES = ("task", "eval_path", "hub_config", "prompt_style", "chat_template", "limit",
             "glue_task", "columns")
"""The data keys a source may set for itself (besides ``path``, ``weight`` and ``name``)."""
KEYS = ("path", "weight", "name", *OVERRIDES)
PATH_KEYS = ("path", "eval_path", "chat_template")
"""A source's keys that hold paths (resolved against the recipe file's folder)."""


def source_name(item: dict[str, Any], i: int) -> str:
    """The source's ``name``, else its file's stem (or hub id's last part)."""
    if item.get("name"):
        return str(item["name"])
    path = str(item.get("path", f"source{i}"))
    return Path(path).stem if Path(path).suffix else path.rstrip("/").rsplit("/", 1)[-1]


OWN = ("eval_path", "hub_config", "limit", "columns")
"""Keys that belong to one source: a source that does not set them has none (the data
section's apply to every source otherwise: task, prompt_style, chat_template, max_length…)."""


def source_args(data: Any) -> list[Any]:
    """One ``DataArgs`` per source: the recipe's data section with the source's path and own
    keys (valid items: :func:`pace_llm.data.checks.mix_problems` has passed)."""
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
                    mixture=Mixture(names, weights, [len(t.train) for t in tasks]),
                    identity={"kind": "mix", "sources": [t.identity for t in tasks]})


class ConcatExamples(ExampleSequence):
    """The training examples of several sources, numbered one source after another."""

    def __init__(self, parts: list[Examples]):
        self.parts = parts
        self.starts = [0, *np.cumsum([len(p) for p in parts]).tolist()]

    def __len__(self) -> int:
        return self.starts[-1]

    def row(self, j: int) -> dict:
        s = bisect_right(self.starts, j) - 1
        return self.parts[s][j - self.starts[s]]

    def part_lengths(self) -> list[Sequence[int]]:
        """Each source's example lengths (the cache's length column, no row read)."""
        return [p.lengths for p in self.parts]

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate([np.asarray(x, dtype=np.int32) for x in self.part_lengths()])

    @property
    def max_token_id(self) -> int:
        return max(p.max_token_id for p in self.parts)
