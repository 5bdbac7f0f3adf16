"""What the data package hands around: examples, their containers and a built task.

A task definition (``pace_llm/tasks``) gives a :class:`pace_llm.data.spec.TaskSpec`;
:mod:`pace_llm.data.build` turns it into :class:`TaskData`, whose training examples are
held by one of four containers, all of the one declared shape :class:`Examples`: a list
(:class:`ListExamples`), the task cache's memory-mapped :class:`ArrowExamples`, a mixture's
concatenation (``data.mix.ConcatExamples``) or the stream's view
(``data.stream.StreamExamples``).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pace_llm.schema import Kind

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


@dataclass(frozen=True)
class Mixture:
    """The sources of a mixture (``data.mix``, pace_llm/data/mix.py), in recipe order."""

    names: list[str]
    weights: list[float]
    sizes: list[int]
    """Training examples of each source."""


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
    """``data.mix``: its sources' names, weights and sizes."""
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
