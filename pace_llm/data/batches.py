"""Batches: a deterministic, resumable, length-grouped order of global batches, and collation.

One optimizer step consumes one *global batch* of ``micro × accum × world`` examples. Within a
global batch the examples are sorted by length, so each micro-batch pads little. Rank r's
a-th micro-batch is the slice ``[(a·world + r)·micro, … + micro)``; the same global batch is
therefore trained whatever the split into ranks and accumulation steps, which is what makes
runs comparable across ZeRO stages and world sizes.

Orders (each ``batches_from(cursor)`` yields ``(cursor after, global batch)`` forever):

- :class:`BatchPlan`: every epoch a permutation of the training set, a pure function of
  (seed, epoch), held as one integer array (8 bytes an example, no Python objects);
- :class:`MixturePlan` (``data.mix``): each position of a global batch draws its source by the
  mixture weights, then that source's next example in its own reshuffled cycle;
- ``pace_llm.tasks.stream.StreamPlan`` (``data.streaming``): read as consumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from pace_llm.errors import UserError

IGNORE = -100
GROUP_CHUNK = 64  # global batches per length-sorting window
DRAW_CHUNK = 1 << 20  # mixture source draws generated at a time


@dataclass
class Cursor:
    """Where the data stream is: the epoch and the global batch within it (streaming: the
    records of this rank's share consumed in the epoch)."""

    epoch: int = 0
    batch: int = 0


class BatchPlan:
    """The order of global batches for every epoch, a pure function of (seed, epoch)."""

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
            plan = self.epoch(epoch)
            for b in range(batch, len(plan)):
                nxt = Cursor(epoch, b + 1) if b + 1 < len(plan) else Cursor(epoch + 1, 0)
                yield nxt, plan[b].tolist()
            epoch, batch = epoch + 1, 0

    def source_counts(self, global_batch: list[int]) -> dict[str, int] | None:
        return None


class MixturePlan:
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

    def source_counts(self, global_batch: list[int]) -> dict[str, int]:
        """Examples of each source in a global batch."""
        which = np.searchsorted(self.offsets, np.asarray(global_batch), side="right") - 1
        counts = np.bincount(which, minlength=len(self.names))
        return {name: int(c) for name, c in zip(self.names, counts)}


def rank_micro_batches(global_batch: list[int], micro: int, accum: int, world: int,
                       rank: int) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) of one global batch."""
    return [global_batch[(a * world + rank) * micro:(a * world + rank + 1) * micro]
            for a in range(accum)]


def padded_width(longest: int, multiple: int) -> int:
    """``longest`` rounded up to a multiple of ``multiple`` (stable shapes for kernels)."""
    return -(-longest // multiple) * multiple


def collate_causal(examples: list[dict], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad input_ids/labels to the longest row (rounded up to ``multiple``); labels are
    -100 on padding (unshifted)."""
    width = padded_width(max(len(e["input_ids"]) for e in examples), multiple)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_cls(examples: list[dict], pad_id: int, regression: bool,
                multiple: int = 1) -> dict[str, torch.Tensor]:
    width = padded_width(max(len(e["input_ids"]) for e in examples), multiple)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
    dtype = torch.float32 if regression else torch.long
    labels = torch.tensor([e["label"] for e in examples], dtype=dtype)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collator(causal: bool, pad_id: int, regression: bool = False, multiple: int = 1
             ) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """The collate function of a task: causal LM rows, or classification (regression) rows,
    padded to a multiple of ``multiple`` tokens (``data.pad_to_multiple_of``)."""
    if causal:
        return partial(collate_causal, pad_id=pad_id, multiple=multiple)
    return partial(collate_cls, pad_id=pad_id, regression=regression, multiple=multiple)


def supervised_index(labels: torch.Tensor, views: int = 1) -> torch.Tensor:
    """Flat indices of the supervised next-token positions of ``views`` stacked copies.

    With b = rows/views and T the width, position t of row i (i < b) is supervised when
    labels[i, t+1] ≠ −100; its index into the [rows·T] flattened hidden states is i·T + t for
    view 1 and i·T + t + v·b·T for view v+1 (view-major, row-major within a view: the order of
    boolean-mask indexing). Its target is labels.flatten()[index + 1]. Cheap on the CPU batch;
    on a device it syncs (``nonzero``).
    """
    rows, width = labels.shape
    if rows % views:
        raise ValueError(f"batch of {rows} rows cannot be split into {views} PACE views")
    b = rows // views
    row, col = (labels[:b, 1:] != IGNORE).nonzero(as_tuple=True)
    flat = row * width + col
    return torch.cat([flat + v * b * width for v in range(views)]) if views > 1 else flat


def supervised_count(batch: dict[str, torch.Tensor], causal: bool) -> int:
    """Tokens (causal: labels ≠ −100 after the shift) or examples (classification) in a batch."""
    if causal:
        return int((batch["labels"][:, 1:] != IGNORE).sum())
    return int(batch["labels"].shape[0])
