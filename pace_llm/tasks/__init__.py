"""Tasks: tokenized training examples, evaluation inputs and the metric of each task family.

The engine calls :func:`build_task` once. A task module (gsm8k, glue, instruct, synthetic)
gives a :class:`Plan`: how to read and validate its rows (:class:`Splits`) and its row ->
example functions (they apply ``data.on_too_long``). :mod:`pace_llm.tasks.cache` runs the plan
once per data/tokenizer/settings key and stores the examples as Arrow, which every rank then
memory-maps; :func:`build_lists` runs the same functions in one loop (no cache).
:func:`task_texts` gives the raw text an offline base (``model.build``) trains its tokenizer on.
"""

from __future__ import annotations

import importlib
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pace_llm.schema import DataArgs
    from pace_llm.tasks.examples import LengthPolicy

Kind = Literal["causal_lm", "seq_cls"]

TASKS: dict[str, Kind] = {"gsm8k": "causal_lm", "glue": "seq_cls", "instruct": "causal_lm",
                          "synthetic": "causal_lm"}
"""The task registry: ``data.task`` name -> the kind of model it trains. Each name is a module
of this package with ``plan(data, tokenizer) -> Plan`` and ``texts(data) -> list[str]``;
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
    train: Sequence[dict]
    """A list, or (from the task cache) :class:`ArrowExamples`: ``train[i]``, ``len``, iteration."""
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
    extra_metrics: dict[str, tuple[Callable[[list, list], dict[str, float]], str]] = field(
        default_factory=dict)
    """(metric, main metric) of an extra set scored unlike ``eval`` (a mixture's sources)."""
    mixture: Any = None
    """``data.mix``: the :class:`pace_llm.tasks.mix.Mixture` (names, weights, sizes)."""
    streaming: bool = False
    """``data.streaming``: ``train`` is a :class:`pace_llm.tasks.stream.StreamExamples`."""

    @property
    def lengths(self) -> Sequence[int]:
        """Tokens of each training example (:func:`example_lengths`)."""
        return example_lengths(self.train)

    @property
    def max_train_id(self) -> int:
        """The largest input id of any training example (:func:`max_input_id`; streaming: of
        the first examples only)."""
        return max_input_id(self.train)

    def examples(self, ids: list[int]) -> list[dict]:
        """The training examples with these indices (streaming: of the current global batch)."""
        lookup = getattr(self.train, "lookup", None)
        return lookup(ids) if lookup is not None else [self.train[i] for i in ids]

    def probe_rows(self, n: int) -> list[dict]:
        """The first ``n`` training examples (fixed rows for the evaluation probes)."""
        return [self.train[i] for i in range(min(n, len(self.train)))]


def example_lengths(examples: Sequence[dict]) -> Sequence[int]:
    """Tokens of each example: the view's own ``lengths`` (the cache's length column as a
    compact ``array('i')``: no row is read), else counted from a list."""
    given = getattr(examples, "lengths", None)
    return given if given is not None else [len(e["input_ids"]) for e in examples]


def max_input_id(examples: Sequence[dict]) -> int:
    """The largest input id of the examples (-1 if none): the view's own ``max_token_id``,
    else read from every example."""
    given = getattr(examples, "max_token_id", None)
    if given is not None:
        return given
    return max((max(e["input_ids"], default=-1) for e in examples), default=-1)


class ExampleSequence(Sequence):
    """A read-only sequence of examples: ``[i]`` (negative too), slices, ``len``; a subclass
    gives ``__len__`` and ``row(j)`` for 0 <= j < len."""

    def row(self, j: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        j = i + len(self) if i < 0 else i
        if not 0 <= j < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        return self.row(j)


class ArrowExamples(ExampleSequence):
    """Training examples in a memory-mapped Arrow dataset, read as today's dicts of Python
    lists and ints (``examples[i]``); :attr:`lengths` comes from its ``length`` column."""

    def __init__(self, dataset: Any, columns: Sequence[str], max_token_id: int | None = None):
        self.dataset = dataset
        self.rows = dataset.select_columns(list(columns)).with_format(None)
        self._max_id = max_token_id

    def __len__(self) -> int:
        return self.rows.num_rows

    def row(self, j: int) -> dict:
        return self.rows[j]

    def __iter__(self) -> Iterator[dict]:
        for batch in self.rows.iter(batch_size=500):
            yield from (dict(zip(batch, values)) for values in zip(*batch.values()))

    @property
    def lengths(self) -> array:
        """Tokens of each example (4 bytes each; no row is read)."""
        column = self.dataset.data.column("length").to_numpy()
        out = array("i")
        out.frombytes(memoryview(column.astype(f"i{out.itemsize}", copy=False)).cast("B"))
        return out

    @property
    def max_token_id(self) -> int:
        """The largest input id of any example (-1 if none): noted when the cache was built,
        else computed by Arrow (which reads every id)."""
        if self._max_id is None:
            import pyarrow.compute as pc

            top = pc.max(pc.list_flatten(self.dataset.data.column("input_ids"))).as_py()
            self._max_id = -1 if top is None else int(top)
        return self._max_id


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


@dataclass
class Plan:
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

    def task(self, train: Sequence[dict], evals: list[dict], stats: dict[str, int],
             extra: dict[str, list[dict]], streaming: bool = False) -> TaskData:
        return TaskData(kind=self.kind, train=train, eval=evals, num_labels=self.num_labels,
                        stats={**stats, "eval_rows": len(evals)}, metric=self.metric,
                        name=self.name, main_metric=self.main_metric, extra_eval=extra,
                        streaming=streaming)


def split_records(splits: Splits, records: Sequence[dict]) -> tuple[Sequence[dict], list[dict]]:
    """(train records, eval records): the hold-out taken, the limit applied."""
    evals = None
    if splits.eval is None:
        hold = splits.holdout(len(records))
        records, evals = records[:len(records) - hold], list(records[len(records) - hold:])
    train = records[:splits.limit] if splits.limit is not None else records
    return train, evals if evals is not None else splits.eval()


def _module(task: str):
    return importlib.import_module(f"pace_llm.tasks.{task}")


def build_task(data: DataArgs, tokenizer: Any) -> TaskData:
    """Read, tokenize and check the task's data through the task cache (tokenized once, then
    memory-mapped by every rank), or as a stream (``data.streaming``), or each source of a
    mixture (``data.mix``); bad data raises UserError naming file and row."""
    from pace_llm.tasks import cache, mix, stream

    if data.mix:
        return mix.build(data, tokenizer, build_task)
    plan = _module(data.task).plan(data, tokenizer)
    if data.streaming:
        return stream.build(plan, data, tokenizer)
    return cache.build(plan, data, tokenizer)


def build_lists(data: DataArgs, tokenizer: Any) -> TaskData:
    """The task as Python lists, every row tokenized here in one loop (no cache, one process)."""
    from pace_llm.tasks.examples import LengthPolicy

    plan = _module(data.task).plan(data, tokenizer)
    splits = plan.read()
    train_records, eval_records = split_records(splits, list(splits.train))
    policy = LengthPolicy(data.max_length, data.on_too_long, splits.source)
    train = [e for e in plan.train_fn(tokenizer, plan.ctx, list(train_records), policy)
             if e is not None]
    stats = policy.finish()
    return plan.task(train, plan.eval_fn(tokenizer, plan.ctx, eval_records), stats,
                     {name: plan.eval_fn(tokenizer, plan.ctx, read())
                      for name, read in splits.extra.items()})


def task_texts(data: DataArgs) -> list[str]:
    """The task's training text (prompts and targets as rendered), to train a tokenizer on."""
    if data.mix:
        from pace_llm.tasks import mix

        return [text for source in mix.source_args(data) for text in task_texts(source)]
    return _module(data.task).texts(data)


__all__ = ["TASKS", "ArrowExamples", "ExampleSequence", "Plan", "Splits", "TaskData",
           "build_lists", "build_task", "example_lengths", "max_input_id", "task_texts"]
