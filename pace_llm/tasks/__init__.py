"""Tasks: tokenized training examples, evaluation inputs and the metric of each task family.

The engine calls :func:`build_task` once; a task module (gsm8k, glue, instruct, synthetic)
reads its rows, tokenizes them with the base model's tokenizer, applies
``data.on_too_long`` and returns a :class:`TaskData`. :func:`task_texts` gives the raw text
an offline base (``model.build``) trains its tokenizer on.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pace_llm.config import DataArgs

Kind = Literal["causal_lm", "seq_cls"]

TASKS: dict[str, Kind] = {"gsm8k": "causal_lm", "glue": "seq_cls", "instruct": "causal_lm",
                          "synthetic": "causal_lm"}
"""The task registry: ``data.task`` name -> the kind of model it trains. Each name is a module
of this package with ``build(data, tokenizer) -> TaskData`` and ``texts(data) -> list[str]``;
config's allowed task names derive from this table."""


@dataclass
class TaskData:
    """What a task hands the engine.

    causal_lm train rows: ``{"input_ids", "labels"}`` of equal length, labels -100 where not
    supervised and *unshifted* (labels[i] is the target token at position i). causal_lm eval
    rows: ``{"prompt_ids", "reference", "target_ids"}`` (the prompt exactly as fed to
    generation; the reference text for the metric; the answer's ids exactly as trained, EOS
    included, for an evaluation loss). Evaluation rows are never cut or dropped.
    seq_cls rows (train and eval): ``{"input_ids", "label"}`` (float for STS-B).
    """

    kind: Kind
    train: list[dict]
    eval: list[dict]
    num_labels: int | None
    stats: dict[str, int]
    """Train rows, tokens, supervised_tokens, truncated, dropped; and eval_rows."""
    metric: Callable[[list, list], dict[str, float]]
    """causal: (generated_texts, references); seq_cls: (predictions, labels) -> metrics."""
    name: str
    main_metric: str = ""
    """The key of ``metric``'s result that ranks checkpoints (eval.save_best)."""
    extra_eval: dict[str, list[dict]] = field(default_factory=dict)
    """Further evaluation sets in the form of ``eval``, by name (MNLI: mismatched)."""


def _module(task: str):
    return importlib.import_module(f"pace_llm.tasks.{task}")


def build_task(data: DataArgs, tokenizer: Any) -> TaskData:
    """Read, tokenize and check the task's data; bad data raises UserError naming file and row."""
    return _module(data.task).build(data, tokenizer)


def task_texts(data: DataArgs) -> list[str]:
    """The task's training text (prompts and targets as rendered), to train a tokenizer on."""
    return _module(data.task).texts(data)


__all__ = ["TASKS", "TaskData", "build_task", "task_texts"]
