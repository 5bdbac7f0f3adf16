"""What the data package hands around: examples, their containers, a task's rows and its spec.

A task definition (``pace_llm/tasks``) gives a :class:`TaskSpec`: how to read and validate its
rows (:class:`Splits`) and its row -> example functions (they apply ``data.on_too_long``).
:mod:`pace_llm.data.build` turns the spec into :class:`TaskData`, whose training examples are
held by one of four containers, all of the one declared shape :class:`Examples`: a list
(:class:`ListExamples`), the task cache's memory-mapped :class:`ArrowExamples`, a mixture's
concatenation (``data.mix.ConcatExamples``) or the stream's view
(``data.stream.StreamExamples``).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pace_llm.schema import Kind

if TYPE_CHECKING:
    from pace_llm.data.length import LengthPolicy
    from pace_llm.data.mix import Mixture


IGNORE = -100
"""The label of a position that is not supervised (causal LM), as the loss ignores it."""


class Examples(Protocol):
    """A task's training examples, whatever holds them.

    ``examples[i]`` (negative too), ``len`` and iteration give example dicts by position;
    :attr:`lengths` and :attr:`max_token_id` are what the batch order and the model checks read
    (a container may know them without reading a row); :meth:`lookup` gives the examples of a
    micro-batch's indices (the stream: row ids of the global batch being trained).
    """

    def __len__(self) -> int: ...

    def __getitem__(self, i: Any) -> Any: ...

    def __iter__(self) -> Iterator[dict]: ...

    @property
    def lengths(self) -> Sequence[int]:
        """Tokens of each example."""
        ...

    @property
    def max_token_id(self) -> int:
        """The largest input id of any example (-1 if none)."""
        ...

    def lookup(self, ids: list[int]) -> list[dict]:
        """The examples with these indices."""
        ...


class RowFacts:
    """What :class:`Examples` asks beyond the rows, read from the rows themselves (a container
    that knows them without reading every row overrides these)."""

    @property
    def lengths(self) -> Sequence[int]:
        return [len(e["input_ids"]) for e in self]

    @property
    def max_token_id(self) -> int:
        return max((max(e["input_ids"], default=-1) for e in self), default=-1)

    def lookup(self, ids: list[int]) -> list[dict]:
        return [self[i] for i in ids]


class ListExamples(RowFacts, list):
    """:class:`Examples` as a Python list (``build_lists``; a list given to :class:`TaskData`)."""


class ExampleSequence(RowFacts, Sequence):
    """A read-only :class:`Examples`: ``[i]`` (negative too), slices, ``len``; a subclass gives
    ``__len__`` and ``row(j)`` for 0 <= j < len, and overrides what it knows without reading
    rows (:attr:`lengths`, :attr:`max_token_id`)."""

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
    train: Examples
    """The training examples (a plain list given here is held as :class:`ListExamples`)."""
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
    mixture: Mixture | None = None
    """``data.mix``: the :class:`pace_llm.data.mix.Mixture` (names, weights, sizes)."""
    streaming: bool = False
    """``data.streaming``: ``train`` is a :class:`pace_llm.data.stream.StreamExamples`."""
    identity: dict[str, Any] | None = None
    """What identifies the training data (the task cache's key and the files' hashes, a
    stream's file sizes and ends, a mixture's sources'): kept in checkpoints, compared on resume
    (pace_llm/data/files.py ``data_changes``); None when not known (``build_lists``)."""

    def __post_init__(self) -> None:
        if type(self.train) is list:
            self.train = ListExamples(self.train)

    @property
    def lengths(self) -> Sequence[int]:
        """Tokens of each training example (the cache's length column: no row is read)."""
        return self.train.lengths

    @property
    def max_train_id(self) -> int:
        """The largest input id of any training example (streaming: of the first examples
        only)."""
        return self.train.max_token_id

    def examples(self, ids: list[int]) -> list[dict]:
        """The training examples with these indices (streaming: of the current global batch)."""
        return self.train.lookup(ids)

    def probe_rows(self, n: int) -> list[dict]:
        """The first ``n`` training examples (fixed rows for the evaluation probes)."""
        return [self.train[i] for i in range(min(n, len(self.train)))]


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
