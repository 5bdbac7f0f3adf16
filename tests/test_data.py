"""pace_llm.data.batches and collate: the epoch order as one integer array, padding to a
multiple, collation."""

from __future__ import annotations

import numpy as np
import pytest

from pace_llm.data.batches import Cursor, EpochOrder
from pace_llm.data.collate import collator
from pace_llm.data.examples import IGNORE


@pytest.mark.parametrize("multiple", [1, 8, 64])
def test_padding_rounds_the_width_up_and_masks_it(multiple):
    rows = [{"input_ids": [5] * n, "labels": [IGNORE] * 2 + [7] * (n - 2)} for n in (3, 17, 9)]
    batch = collator(True, pad_id=0, multiple=multiple)(rows)
    width = {1: 17, 8: 24, 64: 64}[multiple]
    assert batch["input_ids"].shape == (3, width) == batch["labels"].shape
    assert batch["attention_mask"].sum(1).tolist() == [3, 17, 9]
    assert (batch["labels"] != IGNORE).sum().item() == 1 + 15 + 7  # padding is never a target
    cls = collator(False, pad_id=0, multiple=multiple)([{"input_ids": [1] * 5, "label": 1}])
    assert cls["input_ids"].shape == (1, {1: 5, 8: 8, 64: 64}[multiple])


def test_the_epoch_order_is_one_integer_array():
    lengths = np.random.default_rng(0).integers(5, 100, 1003).tolist()
    plan = EpochOrder(lengths, 8, seed=3)
    epoch = plan.epoch(0)
    assert epoch.shape == (125, 8) and epoch.dtype.kind == "i"
    assert len(set(epoch.ravel().tolist())) == 1000  # 3 examples left over, none twice
    assert not np.array_equal(epoch, plan.epoch(1))
    first = [b for _, b in zip(range(3), plan.batches_from(Cursor()))]
    assert first[0] == (Cursor(0, 1), epoch[0].tolist())
    assert all(isinstance(i, int) for i in first[0][1])
