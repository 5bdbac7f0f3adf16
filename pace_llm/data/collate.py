"""Collation: a micro-batch's examples as padded tensors, and where its supervised tokens are.

Causal LM rows are right-padded to the longest row (rounded up to ``data.pad_to_multiple_of``),
labels -100 (:data:`~pace_llm.data.examples.IGNORE`) on padding and unshifted; classification
rows carry one label each (float for a regression).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from pace_llm.data.examples import IGNORE


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
