"""Batches: a deterministic, resumable, length-grouped order of global batches, and collation.

One optimizer step consumes one *global batch* of ``micro × accum × world`` examples. Within a
global batch the examples are sorted by length, so each micro-batch pads little. Rank r's
a-th micro-batch is the slice ``[(a·world + r)·micro, … + micro)``; the same global batch is
therefore trained whatever the split into ranks and accumulation steps, which is what makes
runs comparable across ZeRO stages and world sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from pace_llm.errors import UserError

IGNORE = -100
GROUP_CHUNK = 32  # global batches per length-sorting window


@dataclass
class Cursor:
    """Where the data stream is: the epoch and the global batch within it."""

    epoch: int = 0
    batch: int = 0


class BatchPlan:
    """The order of global batches for every epoch, a pure function of (seed, epoch)."""

    def __init__(self, lengths: list[int], global_batch: int, seed: int):
        if len(lengths) < global_batch:
            raise UserError(f"the training set has {len(lengths)} examples, fewer than one global "
                            f"batch of {global_batch} (micro_batch_size x grad_accum x ranks); "
                            "lower train.micro_batch_size or train.grad_accum, or add data")
        self.lengths = lengths
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = len(lengths) // global_batch

    def epoch(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        order = order[: self.steps_per_epoch * self.global_batch]
        window = self.global_batch * GROUP_CHUNK
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + self.global_batch] for i in range(0, len(chunk), self.global_batch)]
        shuffle = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in shuffle]

    def batches_from(self, cursor: Cursor):
        """Yield (cursor_after, global_batch) forever, starting at ``cursor``."""
        epoch, batch = cursor.epoch, cursor.batch
        while True:
            plan = self.epoch(epoch)
            for b in range(batch, len(plan)):
                nxt = Cursor(epoch, b + 1) if b + 1 < len(plan) else Cursor(epoch + 1, 0)
                yield nxt, plan[b]
            epoch, batch = epoch + 1, 0


def rank_micro_batches(global_batch: list[int], micro: int, accum: int, world: int,
                       rank: int) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) of one global batch."""
    return [global_batch[(a * world + rank) * micro:(a * world + rank + 1) * micro]
            for a in range(accum)]


def collate_causal(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad input_ids/labels; labels are -100 on padding (unshifted)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_cls(examples: list[dict], pad_id: int, regression: bool) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
    dtype = torch.float32 if regression else torch.long
    labels = torch.tensor([e["label"] for e in examples], dtype=dtype)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collator(causal: bool, pad_id: int, regression: bool = False
             ) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """The collate function of a task: causal LM rows, or classification (regression) rows."""
    if causal:
        return partial(collate_causal, pad_id=pad_id)
    return partial(collate_cls, pad_id=pad_id, regression=regression)


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

