"""``data.streaming``: training rows read, checked and tokenized as they are consumed.

For corpora that should not be materialised: nothing is cached or held but the shuffle buffer
and the current global batch. Evaluation rows (small) are read and tokenized at the start.
:class:`StreamSource` reads the training records afresh for each pass and tokenizes what it is
given; the order of the records, each rank's share of them and the cursor are
:class:`pace_llm.data.batches.StreamOrder`'s, which hands each global batch's examples to the
:class:`StreamExamples` view that training reads them from.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

from pace_llm.data.examples import ExampleSequence, TaskData
from pace_llm.data.files import stream_identity
from pace_llm.data.length import LengthPolicy
from pace_llm.data.spec import TaskSpec
from pace_llm.errors import UserError

HEAD = 16  # examples tokenized at the start: evaluation probes, data-check, preflight

Record = tuple[int, dict]  # (row id in file order, validated record)


class StreamSource:
    """A task's training records, read afresh for every pass, and their tokenization."""

    def __init__(self, spec: TaskSpec, data: Any, tok: Any, rows: int | None):
        self.spec, self.data, self.tok, self.rows = spec, data, tok, rows

    def records(self) -> Iterator[Record]:
        """(row id, record) in file order: the training rows (the hold-out excluded)."""
        return enumerate(islice(iter(self.spec.read().train), self.rows))

    def tokenize(self, records: list[dict]) -> list[dict | None]:
        """The examples of these records (None: dropped by data.on_too_long)."""
        policy = LengthPolicy(self.data.max_length, self.data.on_too_long, self.data.path)
        return self.spec.train_fn(self.tok, self.spec.ctx, records, policy)


class StreamExamples(ExampleSequence):
    """``TaskData.train`` when streaming: the first examples by position (``train[i]``,
    ``len``: evaluation probes, data-check; :attr:`lengths` and :attr:`max_token_id` are
    theirs) and, by row id, the examples of the global batch being trained (:meth:`lookup`),
    which the stream order hands over (:meth:`hold`) as it yields that batch."""

    def __init__(self, head: list[dict], source: StreamSource):
        self.head, self.source = head, source
        self._held: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.head)

    def row(self, j: int) -> dict:
        return self.head[j]

    def hold(self, batch: dict[int, dict]) -> None:
        """The hand-over: the examples of the global batch about to be trained, by row id
        (the previous batch's are let go)."""
        self._held = batch

    def lookup(self, ids: list[int]) -> list[dict]:
        """Examples of the held global batch by row id."""
        return [self._held[i] for i in ids]


def build(spec: TaskSpec, data: Any, tok: Any) -> TaskData:
    """The streamed task: evaluation rows and the first HEAD examples now, the rest as used."""
    splits = spec.read()
    rows = splits.limit
    if splits.eval is None:  # a hold-out tail: count the rows (read, not tokenized)
        n = sum(1 for _ in splits.train)
        hold = splits.holdout(n)
        eval_records = list(islice(iter(spec.read().train), n - hold, n))
        rows = n - hold if rows is None else min(rows, n - hold)
    else:
        eval_records = splits.eval()
    source = StreamSource(spec, data, tok, rows)
    head: list[dict] = []
    for _, record in source.records():
        head += [e for e in source.tokenize([record]) if e is not None]
        if len(head) == HEAD:
            break
    if not head:
        raise UserError(f"{splits.source}: no training example is left after data.on_too_long "
                        f"({data.on_too_long}, data.max_length {data.max_length})")
    examples = StreamExamples(head, source)
    evals = spec.eval_fn(tok, spec.ctx, eval_records)
    extra = {name: spec.eval_fn(tok, spec.ctx, read()) for name, read in splits.extra.items()}
    task = spec.task(examples, evals, {"streaming_shuffle_buffer": data.shuffle_buffer}, extra,
                     streaming=True)
    task.identity = {"kind": "stream", "files": stream_identity((data.path, data.eval_path))}
    return task
