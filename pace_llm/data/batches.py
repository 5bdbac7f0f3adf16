"""The order of global batches: deterministic, resumable, length-grouped; and their layout.

One optimizer step consumes one *global batch* of ``micro × accum × world`` examples. Within a
global batch the examples are sorted by length, so each micro-batch pads little. Rank r's
a-th micro-batch is the slice ``[(a·world + r)·micro, … + micro)`` (:func:`micro_batch_slice`,
the one statement of this layout); the same global batch is therefore trained whatever the
split into ranks and accumulation steps, which is what makes runs comparable across ZeRO stages
and world sizes.

Orders (:class:`BatchOrder`: each ``batches_from(cursor)`` yields ``(cursor after, global
batch)`` forever):

- :class:`EpochOrder`: every epoch a permutation of the training set, a pure function of
  (seed, epoch), held as one integer array (8 bytes an example, no Python objects);
- :class:`MixtureOrder` (``data.mix``): each position of a global batch draws its source by the
  mixture weights, then that source's next example in its own reshuffled cycle;
- :class:`StreamOrder` (``data.streaming``): the records as read, through a shuffle buffer,
  each rank tokenizing its own share.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

import numpy as np
import torch

from pace_llm.data.examples import TaskData
from pace_llm.data.stream import Record, StreamExamples
from pace_llm.errors import UserError

GROUP_CHUNK = 64  # global batches per length-sorting window
DRAW_CHUNK = 1 << 20  # mixture source draws generated at a time
SEED_TAG = 0x73747265616D  # "stream": the shuffle buffer's seed
DRAWS = 4096  # shuffle-buffer slots drawn at a time


@dataclass
class Cursor:
    """Where the data stream is: the epoch and the global batch within it (streaming: the
    records of this rank's share consumed in the epoch)."""

    epoch: int = 0
    batch: int = 0


def micro_batch_slice(a: int, rank: int, world: int, micro: int) -> slice:
    """Where rank ``rank``'s ``a``-th micro-batch lies in a global batch: positions
    ``[(a·world + rank)·micro, +micro)``."""
    start = (a * world + rank) * micro
    return slice(start, start + micro)


def rank_micro_batches(global_batch: list[int], micro: int, accum: int, world: int,
                       rank: int) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) of one global batch."""
    return [global_batch[micro_batch_slice(a, rank, world, micro)] for a in range(accum)]


class BatchOrder(Protocol):
    """What the trainer reads of an order of global batches."""

    global_batch: int
    steps_per_epoch: int | None
    """None: unknown (a stream)."""

    def batches_from(self, cursor: Cursor) -> Iterator[tuple[Cursor, list[int]]]:
        """Yield (cursor after, global batch) forever, starting at ``cursor``."""
        ...

    def source_counts(self, global_batch: list[int]) -> dict[str, int] | None:
        """Examples of each source in a global batch (a mixture), else None."""
        ...

    def seek(self, cursor: Cursor) -> str | None:
        """Check a resumed cursor against the data (and place the order there): None, or why
        the cursor lies outside the data (negative, past its epoch)."""
        ...


class EpochOrder:
    """Global batches of a shuffled epoch, length-grouped: every epoch's order is a pure function
    of (seed, epoch)."""

    def __init__(self, lengths: Sequence[int], global_batch: int, seed: int):
        if len(lengths) < global_batch:
            raise UserError(f"the training set has {len(lengths)} examples, fewer than one global "
                            f"batch of {global_batch} (micro_batch_size x grad_accum x ranks); "
                            "lower train.micro_batch_size or train.grad_accum, or add data")
        self.lengths = np.asarray(lengths, dtype=np.int32)
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = len(lengths) // global_batch

    def epoch(self, epoch: int) -> np.ndarray:
        """[steps_per_epoch, global_batch] example indices: a permutation cut to whole global
        batches, sorted by length (longest first, stable) within windows of GROUP_CHUNK
        batches, the batches then shuffled."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=g).numpy()
        order = order[: self.steps_per_epoch * self.global_batch]
        window = self.global_batch * GROUP_CHUNK
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            order[start:start + window] = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
        batches = order.reshape(self.steps_per_epoch, self.global_batch)
        return batches[torch.randperm(len(batches), generator=g).numpy()]

    def batches_from(self, cursor: Cursor) -> Iterator[tuple[Cursor, list[int]]]:
        """Yield (cursor_after, global_batch) forever, starting at ``cursor``."""
        epoch, batch = cursor.epoch, cursor.batch
        while True:
            order = self.epoch(epoch)
            for b in range(batch, len(order)):
                nxt = Cursor(epoch, b + 1) if b + 1 < len(order) else Cursor(epoch + 1, 0)
                yield nxt, order[b].tolist()
            epoch, batch = epoch + 1, 0

    def source_counts(self, global_batch: list[int]) -> dict[str, int] | None:
        return None

    def seek(self, cursor: Cursor) -> str | None:
        if cursor.epoch < 0 or not 0 <= cursor.batch < self.steps_per_epoch:
            return (f"epoch {cursor.epoch}, global batch {cursor.batch}: an epoch has global "
                    f"batches 0..{self.steps_per_epoch - 1}")
        return None


class MixtureOrder:
    """Global batches drawn from several sources by weight (``data.mix``).

    The examples of all sources are numbered one after another (source s's example i is
    ``offsets[s] + i``). Position p of global batch b draws its source from one seeded stream
    of categorical draws with probabilities ``weights / Σ weights`` (draw number b·G + p);
    source s's k-th draw is example ``perm(s, k // n_s)[k % n_s]``, a fresh permutation of the
    source per cycle through it. A global batch is then sorted by length (longest first). Batch
    b is a pure function of (seed, b): a resumed run continues the same sequence. An "epoch" is
    Σ n_s examples (for ``train.epochs``)."""

    def __init__(self, names: list[str], lengths: list[Sequence[int]], weights: list[float],
                 global_batch: int, seed: int):
        self.names = names
        self.sizes = np.array([len(x) for x in lengths], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.lengths = np.concatenate([np.asarray(x, dtype=np.int32) for x in lengths])
        total = float(sum(weights))
        self.p = np.array([w / total for w in weights])
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = max(1, int(self.sizes.sum()) // global_batch)
        if int(self.sizes.sum()) < global_batch:
            raise UserError(f"the mixture's sources hold {int(self.sizes.sum())} examples, fewer "
                            f"than one global batch of {global_batch}; add data or lower "
                            "train.micro_batch_size / train.grad_accum")

    def _draws(self) -> Iterator[np.ndarray]:
        rng = np.random.Generator(np.random.PCG64([self.seed, 0x6D6978]))  # "mix"
        while True:
            yield rng.choice(len(self.names), size=DRAW_CHUNK, p=self.p)

    def _perm(self, source: int, cycle: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64([self.seed, 0x6D6978, source, cycle]))
        return rng.permutation(int(self.sizes[source]))

    def batches_from(self, cursor: Cursor) -> Iterator[tuple[Cursor, list[int]]]:
        """Yield (cursor_after, global_batch) forever from global batch ``cursor.batch``."""
        G, skip = self.global_batch, cursor.batch * self.global_batch
        drawn = np.zeros(len(self.names), dtype=np.int64)  # draws per source so far
        perms: dict[int, tuple[int, np.ndarray]] = {}
        pending = np.empty(0, dtype=np.int64)
        b = cursor.batch
        for chunk in self._draws():
            if skip >= len(chunk):  # resume: count the draws before the cursor
                drawn += np.bincount(chunk, minlength=len(self.names))
                skip -= len(chunk)
                continue
            drawn += np.bincount(chunk[:skip], minlength=len(self.names))
            pending, skip = np.concatenate([pending, chunk[skip:]]), 0
            while len(pending) >= G:
                sources, pending = pending[:G], pending[G:]
                ids = np.empty(G, dtype=np.int64)
                for p, s in enumerate(sources.tolist()):
                    k, n = int(drawn[s]), int(self.sizes[s])
                    cycle, perm = perms.get(s, (-1, None))
                    if cycle != k // n:
                        perm = self._perm(s, k // n)
                        perms[s] = (k // n, perm)
                    ids[p] = self.offsets[s] + perm[k % n]
                    drawn[s] += 1
                ids = ids[np.argsort(-self.lengths[ids], kind="stable")]
                b += 1
                yield Cursor(0, b), ids.tolist()

    def seek(self, cursor: Cursor) -> str | None:
        if cursor.epoch != 0 or cursor.batch < 0:
            return (f"epoch {cursor.epoch}, global batch {cursor.batch}: a mixture counts its "
                    "global batches from 0 in epoch 0")
        return None

    def source_counts(self, global_batch: list[int]) -> dict[str, int]:
        """Examples of each source in a global batch."""
        which = np.searchsorted(self.offsets, np.asarray(global_batch), side="right") - 1
        counts = np.bincount(which, minlength=len(self.names))
        return {name: int(c) for name, c in zip(self.names, counts)}


def shuffled(records: Iterator[Record], size: int, seed: int, epoch: int) -> Iterator[Record]:
    """``records`` through a shuffle buffer of ``size`` (see :class:`StreamOrder`)."""
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


class StreamOrder:
    """This rank's global batches from the stream (``data.streaming``): each global batch holds
    this rank's row ids at its own positions and -1 at the others'; their examples are handed to
    the task's :class:`~pace_llm.data.stream.StreamExamples` (``hold``) as the batch is yielded.

    Order. Epoch e reads the training rows in file order (row ids 0, 1, … in that order; with no
    eval split the hold-out tail is excluded, which costs one extra read of the rows to count
    them) through a shuffle buffer of ``data.shuffle_buffer`` rows, as 🤗 datasets' streaming
    shuffle does: the buffer is filled with the first rows; then each incoming row replaces a
    uniformly drawn slot, whose row is emitted; at the end the buffer is emitted in a random
    order. The draws come from a generator seeded with (train.seed, e), so the order is a pure
    function of the seed and the epoch, and differs per epoch; a buffer of 1 is file order. A
    row can move forward by at most the buffer size: a sorted file needs a large buffer.

    Shares. Position p of the epoch's shuffled order belongs to rank ``(p // micro) % world``
    (the layout of :func:`micro_batch_slice`): every rank reads the (cheap) row stream and
    tokenizes only its own share. A rank fills each of its micro-batches with the next examples
    of its share; a row dropped by ``data.on_too_long: drop`` is replaced by the next one; at
    the end of its share the rank goes on with the next epoch. With one rank (or no drops) the
    global batches are the shuffled order cut into batches; with several ranks and drops, ranks
    may change epoch at different steps.

    Resume. A rank's cursor is (epoch, rows of its share consumed); checkpoints keep every
    rank's. A resumed run re-reads the epoch's rows up to the cursor (no tokenizing) and
    continues with exactly the examples an uninterrupted run would have seen; it needs the same
    number of ranks.
    """

    steps_per_epoch = None

    def __init__(self, examples: StreamExamples, micro: int, accum: int, world: int, rank: int,
                 seed: int, buffer: int):
        self.examples, self.source = examples, examples.source
        self.micro, self.accum, self.world, self.rank = micro, accum, world, rank
        self.seed, self.buffer = seed, buffer
        self.global_batch = micro * accum * world
        self._placed: tuple[Cursor, Iterator[Record]] | None = None  # seek's reading

    def share(self, epoch: int, skip: int = 0) -> Iterator[Record]:
        """This rank's records of the epoch's order, from its ``skip``-th on."""
        order = shuffled(self.source.records(), self.buffer, self.seed, epoch)
        mine = (r for p, r in enumerate(order) if (p // self.micro) % self.world == self.rank)
        return islice(mine, skip, None)

    def seek(self, cursor: Cursor) -> str | None:
        """Read this rank's share of the cursor's epoch up to it (no tokenizing): a cursor past
        the share's end, or negative, is refused; else :meth:`batches_from` goes on from there
        without reading it again."""
        if cursor.epoch < 0 or cursor.batch < 0:
            return f"rank {self.rank}: epoch {cursor.epoch}, row {cursor.batch} is negative"
        records = self.share(cursor.epoch)
        read = sum(1 for _ in islice(records, cursor.batch))
        if read < cursor.batch:
            return (f"rank {self.rank}: row {cursor.batch} of epoch {cursor.epoch}, but its share "
                    f"of the epoch has {read} rows")
        self._placed = (cursor, records)
        return None

    def batches_from(self, cursor: Cursor) -> Iterator[tuple[Cursor, list[int]]]:
        """Yield (cursor after, global batch) forever, starting at ``cursor``."""
        epoch, consumed = cursor.epoch, cursor.batch
        placed, self._placed = self._placed, None
        records = placed[1] if placed and placed[0] == cursor else self.share(epoch, consumed)
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
            self.examples.hold(dict(kept))  # the hand-over: lookup serves these now
            yield Cursor(epoch, consumed), self._layout([i for i, _ in kept])

    def _layout(self, ids: list[int]) -> list[int]:
        out = [-1] * self.global_batch
        for a in range(self.accum):
            out[micro_batch_slice(a, self.rank, self.world, self.micro)] = (
                ids[a * self.micro:(a + 1) * self.micro])
        return out

    def _empty_share(self, epoch: int) -> str:
        return (f"data.streaming: rank {self.rank} found no usable training row in epoch "
                f"{epoch} (its share is every {self.world}th run of {self.micro} rows); add "
                "data, or lower train.micro_batch_size or the number of ranks")

    def source_counts(self, global_batch: list[int]) -> dict[str, int] | None:
        return None


def stream_order(task: TaskData, recipe: Any, world: int, rank: int) -> StreamOrder:
    """The StreamOrder of a streamed task for this rank."""
    t = recipe.train
    return StreamOrder(task.train, t.micro_batch_size, t.grad_accum, world, rank, t.seed,
                       recipe.data.shuffle_buffer)


def batch_order(task: TaskData, recipe: Any, world: int, rank: int) -> tuple[BatchOrder, int]:
    """The run's order of global batches (a streamed task: this rank's share of the stream; a
    mixture: the weighted draw; else a permutation per epoch) and its number of optimizer steps
    (``train.max_steps``, else ``train.epochs`` of the order's steps per epoch)."""
    t = recipe.train
    global_batch = t.micro_batch_size * t.grad_accum * world
    if task.streaming:
        return stream_order(task, recipe, world, rank), t.max_steps
    if task.mixture is not None:
        m = task.mixture
        order: EpochOrder | MixtureOrder = MixtureOrder(m.names, task.train.part_lengths(),
                                                        m.weights, global_batch, t.seed)
    else:
        order = EpochOrder(task.train.lengths, global_batch, t.seed)
    return order, t.max_steps or max(1, int(t.epochs * order.steps_per_epoch))
