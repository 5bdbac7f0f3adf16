"""A task's definition contract: how to read and validate its rows and turn them into examples.

A task module (``pace_llm/tasks``) gives a :class:`TaskSpec`; its ``read`` returns the rows as
:class:`Splits`, its row -> example functions apply ``data.on_too_long`` through a
:class:`pace_llm.data.length.LengthPolicy`; :mod:`pace_llm.data.build` (lists),
:mod:`pace_llm.data.cache` (Arrow) and :mod:`pace_llm.data.stream` run them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pace_llm.data.examples import Examples, TaskData
from pace_llm.data.length import LengthPolicy
from pace_llm.schema import Kind


@dataclass
class Splits:
    """A task's validated rows as *records*: flat dicts with a ``where`` naming the row."""

    train: Iterable[dict]
    """Training records in order, read lazily."""
    source: str
    """Names the training data in length-policy messages."""
    eval: Callable[[], list[dict]] | None
    """Evaluation records (read after the training set is tokenized); None = hold out."""
    extra: dict[str, Callable[[], list[dict]]] = field(default_factory=dict)
    holdout: Callable[[int], int] | None = None
    """Given the number of training records, how many at the end are evaluation records."""
    limit: int | None = None
    """Training records kept after the hold-out (None: all)."""


def split_records(splits: Splits, records: Sequence[dict]) -> tuple[Sequence[dict], list[dict]]:
    """(train records, eval records): the hold-out taken, the limit applied."""
    evals = None
    if splits.eval is None:
        hold = splits.holdout(len(records))
        records, evals = records[:len(records) - hold], list(records[len(records) - hold:])
    train = records[:splits.limit] if splits.limit is not None else records
    return train, evals if evals is not None else splits.eval()


@dataclass
class TaskSpec:
    """A task ready to build: what it is, how to read its rows and turn them into examples."""

    kind: Kind
    name: str
    num_labels: int | None
    metric: Callable[[list, list], dict[str, float]]
    main_metric: str
    read: Callable[[], Splits]
    schema: dict[str, str]
    """A record's columns: name -> string, int64, float64 or messages (role/content list)."""
    train_fn: Callable[[Any, Any, list[dict], LengthPolicy], list[dict | None]]
    """(tokenizer, ctx, records, policy) -> one example per record, None if dropped; a
    module-level function (it is sent to the tokenizing processes)."""
    eval_fn: Callable[[Any, Any, list[dict]], list[dict]]
    ctx: Any = None
    key: dict[str, Any] = field(default_factory=dict)
    """What else the tokens depend on (the resolved chat template, EOS id, ...)."""
    label_dtype: str = "int64"
    """seq_cls: int64 class ids or float64 scores."""

    @property
    def columns(self) -> tuple[str, ...]:
        return ("input_ids", "labels") if self.kind == "causal_lm" else ("input_ids", "label")

    def task(self, train: Examples | list[dict], evals: list[dict], stats: dict[str, int],
             extra: dict[str, list[dict]], streaming: bool = False) -> TaskData:
        return TaskData(kind=self.kind, train=train, eval=evals, num_labels=self.num_labels,
                        stats={**stats, "eval_rows": len(evals)}, metric=self.metric,
                        name=self.name, main_metric=self.main_metric, extra_eval=extra,
                        streaming=streaming)
