"""The fast unit seam: one real training step in this process (ZeRO-0, fp32, one rank), with
pinned values, so a refactor of the step is caught in seconds without forking ranks.

The run is built exactly as ``pace-llm train`` builds it (``train.setup`` -> ``make_trainer``);
the step is ``Trainer.train_step`` on the first global batch of the data order.
"""

from __future__ import annotations

import pytest

from pace_llm import train as T
from pace_llm.config import load_recipe
from tests.test_engine import argv

# (task_loss, consistency, grad_norm) of steps 1 and 2, per mode; step 1 reproduced by the
# code before the architecture change (same seed, data, model)
PINNED = {
    "off": (6.357508939855239, 0.0, 0.7830625772476196, 6.281492078626478, 0.0,
            0.8178516030311584),
    "full": (6.357508939855239, 0.0, 0.7714921236038208, 6.282490085911107, 0.0241967359104672,
             1.3841021060943604),
}


def one_run(base, out, mode: str):
    recipe = load_recipe(argv(base, out, pace__mode=mode, pace__sigma=1.0,
                              pace__consistency_weight=0.5, eval__at_start=False))
    trainer = T.make_trainer(T.setup(recipe))
    trainer.engine.train()
    stream = trainer.run.batches.batches_from(trainer.cursor)
    first = trainer.train_step(next(stream)[1])
    trainer.step += 1
    second = trainer.train_step(next(stream)[1])
    return first, second


@pytest.mark.parametrize("mode", ["off", "full"])
def test_one_step_pinned(tiny_base, tmp_path, mode):
    first, second = one_run(tiny_base, tmp_path / mode, mode)
    got = tuple(s[k] for s in (first, second) for k in ("task_loss", "consistency", "grad_norm"))
    want = PINNED[mode]
    assert got == pytest.approx(want, rel=1e-5), got
    assert first["views"] == (2 if mode == "full" else 1) and first["paired"] == (mode == "full")
    if mode == "off":
        assert first["consistency"] == 0.0
    else:
        assert first["consistency"] == 0.0  # B = 0 at step 1: both views equal the base
        assert second["consistency"] > 0.0
