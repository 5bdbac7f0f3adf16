"""``data.streaming``: training rows read, shuffled and tokenized as they are consumed.

For corpora that should not be materialised: nothing is cached or held but the shuffle buffer
and the current global batch. Evaluation rows (small) are read and tokenized at the start.

Order. Epoch e reads the training rows in file order (row ids 0, 1, … in that order; with no
eval split the hold-out tail is excluded, which costs one extra read of the rows to count them)
through a shuffle buffer of ``data.shuffle_buffer`` rows, as 🤗 datasets' streaming shuffle
does: the buffer is filled with the first rows; then each incoming row replaces a uniformly
drawn slot, whose row is emitted; at the end the buffer is emitted in a random order. The
draws come from a generator seeded with (train.seed, e), so the order is a pure function of
the seed and the epoch, and differs per epoch; a buffer of 1 is file order. A row can move
forward by at most the buffer size: a sorted file needs a large buffer.

Shares. Position p of the epoch's shuffled order belongs to rank ``(p // micro) % world``:
every rank reads the (cheap) row stream and tokenizes only its own share. A rank fills each of
its micro-batches with the next examples of its share; a row dropped by ``data.on_too_long:
drop`` is replaced by the next one; at the end of its share the rank goes on with the next
epoch. With one rank (or no drops) the global batches are the shuffled order cut into batches;
with several ranks and drops, ranks may change epoch at different steps.

Resume. A rank's cursor is (epoch, rows of its share consumed); checkpoints keep every rank's.
A resumed run re-reads the epoch's rows up to the cursor (no tokenizing) and continues with
exactly the examples an uninterrupted run would have seen; it needs the same number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np

from pace_llm.data import Cursor
from pace_llm.errors import UserError
from pace_llm.tasks import Plan, TaskData
from pace_llm.tasks.examples import LengthPolicy

HEAD = 16  # examples tokenized at the start: evaluation probes, data-check, preflight
SEED_TAG = 0x73747265616D  # "stream"
DRAWS = 4096  # buffer slots drawn at a time

Record = tuple[int, dict]  # (row id in file order, validated record)


class StreamSource:
    """A task's training records, read afresh for every pass, and their tokenization."""

    def __init__(self, plan: Plan, data: Any, tok: Any, rows: int | None):
        self.plan, self.data, self.tok, self.rows = plan, data, tok, rows

    def records(self) -> Iterator[Record]:
        """(row id, record) in file order: the training rows (the hold-out excluded)."""
        return enumerate(islice(iter(self.plan.read().train), self.rows))

    def tokenize(self, records: list[dict]) -> list[dict | None]:
        """The examples of these records (None: dropped by data.on_too_long)."""
        policy = LengthPolicy(self.data.max_length, self.data.on_too_long, self.data.path)
        return self.plan.train_fn(self.tok, self.plan.ctx, records, policy)


class StreamExamples:
    """``TaskData.train`` when streaming: the first examples by position (``train[i]``,
    ``len``: evaluation probes, data-check) and the current global batch's by row id
    (``lookup``)."""

    lengths = None

    def __init__(self, head: list[dict], source: StreamSource):
        self.head, self.source = head, source
        self.current: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.head)

    def __getitem__(self, i: int) -> dict:
        return self.head[i]

    def lookup(self, ids: list[int]) -> list[dict]:
        return [self.current[i] for i in ids]

    @property
    def max_token_id(self) -> int:
        return max((max(e["input_ids"], default=-1) for e in self.head), default=-1)


def build(plan: Plan, data: Any, tok: Any) -> TaskData:
    """The streamed task: evaluation rows and the first HEAD examples now, the rest as used."""
    splits = plan.read()
    rows = splits.limit
    if splits.eval is None:  # a hold-out tail: count the rows (read, not tokenized)
        n = sum(1 for _ in splits.train)
        hold = splits.holdout(n)
        eval_records = list(islice(iter(plan.read().train), n - hold, n))
        rows = n - hold if rows is None else min(rows, n - hold)
    else:
        eval_records = splits.eval()
    source = StreamSource(plan, data, tok, rows)
    head: list[dict] = []
    for _, record in source.records():
        head += [e for e in source.tokenize([record]) if e is not None]
        if len(head) == HEAD:
            break
    if not head:
        raise UserError(f"{splits.source}: no training example is left after data.on_too_long "
                        f"({data.on_too_long}, data.max_length {data.max_length})")
    examples = StreamExamples(head, source)
    evals = plan.eval_fn(tok, plan.ctx, eval_records)
    extra = {name: plan.eval_fn(tok, plan.ctx, read()) for name, read in splits.extra.items()}
    return plan.task(examples, evals, {"streaming_shuffle_buffer": data.shuffle_buffer}, extra,
                     streaming=True)


def shuffled(records: Iterator[Record], size: int, seed: int, epoch: int) -> Iterator[Record]:
    """``records`` through a shuffle buffer of ``size`` (see the module docstring)."""
    rng = np.random.Generator(np.random.PCG64([seed, SEED_TAG, epoch]))
    buffer: list[Record] = []
    draws: list[int] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        if not draws:
            draws = rng.integers(0, size, DRAWS).tolist()[::-1]
        j = draws.pop()
        yield buffer[j]
        buffer[j] = record
    for j in rng.permutation(len(buffer)).tolist():
        yield buffer[j]


class StreamPlan:
    """This rank's global batches from the stream (the ``batches`` of a streaming run): each
    global batch holds this rank's row ids at its own positions and -1 at the others'."""

    steps_per_epoch = None

    def __init__(self, examples: StreamExamples, micro: int, accum: int, world: int, rank: int,
                 seed: int, buffer: int):
        self.examples, self.source = examples, examples.source
        self.micro, self.accum, self.world, self.rank = micro, accum, world, rank
        self.seed, self.buffer = seed, buffer
        self.global_batch = micro * accum * world

    def share(self, epoch: int, skip: int = 0) -> Iterator[Record]:
        """This rank's records of the epoch's order, from its ``skip``-th on."""
        order = shuffled(self.source.records(), self.buffer, self.seed, epoch)
        mine = (r for p, r in enumerate(order) if (p // self.micro) % self.world == self.rank)
        return islice(mine, skip, None)

    def batches_from(self, cursor: Cursor) -> Iterator[tuple[Cursor, list[int]]]:
        """Yield (cursor after, global batch) forever, starting at ``cursor``."""
        epoch, consumed = cursor.epoch, cursor.batch
        records = self.share(epoch, consumed)
        need = self.micro * self.accum
        whole_epoch_unused = False  # a whole epoch of this rank's share had no usable row
        while True:
            kept: list[tuple[int, dict]] = []
            while len(kept) < need:
                chunk = list(islice(records, need - len(kept)))
                if not chunk:  # this rank's share of the epoch is used up
                    if consumed == 0 or whole_epoch_unused:
                        raise UserError(self._empty_share(epoch))
                    epoch, consumed, whole_epoch_unused = epoch + 1, 0, True
                    records = self.share(epoch)
                    continue
                examples = self.source.tokenize([r for _, r in chunk])
                consumed += len(chunk)
                kept += [(i, e) for (i, _), e in zip(chunk, examples) if e is not None]
                whole_epoch_unused &= all(e is None for e in examples)
            self.examples.current = dict(kept)
            yield Cursor(epoch, consumed), self._layout([i for i, _ in kept])

    def _layout(self, ids: list[int]) -> list[int]:
        out = [-1] * (self.micro * self.accum * self.world)
        for a in range(self.accum):
            start = (a * self.world + self.rank) * self.micro
            out[start:start + self.micro] = ids[a * self.micro:(a + 1) * self.micro]
        return out

    def _empty_share(self, epoch: int) -> str:
        return (f"data.streaming: rank {self.rank} found no usable training row in epoch "
                f"{epoch} (its share is every {self.world}th run of {self.micro} rows); add "
                "data, or lower train.micro_batch_size or the number of ranks")

    def source_counts(self, global_batch: list[int]) -> dict[str, int] | None:
        return None


def stream_plan(task: TaskData, recipe: Any, world: int, rank: int) -> StreamPlan:
    """The StreamPlan of a streamed task for this rank."""
    t = recipe.train
    return StreamPlan(task.train, t.micro_batch_size, t.grad_accum, world, rank, t.seed,
                      recipe.data.shuffle_buffer)


