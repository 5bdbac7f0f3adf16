"""The fast unit seam: two real training steps in one process (ZeRO-0, fp32, one rank), with
pinned values, so a refactor of the step is caught in seconds without launching ranks.

The run is built exactly as ``pace-llm train`` builds it (``train.started``); the steps are
``Trainer.train_step`` on the first global batches of the data order. The process is forked
from the test process (as tests/launch.py does), so its one-rank process group does not stay
behind in pytest's process for the tests that fork ranks later.
"""

from __future__ import annotations

import os
import sys

import pytest

from pace_llm import setup as S
from pace_llm.config import load_recipe
from pace_llm.records import settle
from tests.launch import argv, one_rank

# (task_loss, consistency, grad_norm) of steps 1 and 2, per mode; step 1 reproduced by the
# code before the architecture change (same seed, data, model). "full" re-pinned from a run of
# the keyed noise stream (pace_llm/noise.py, issue #14): its noise values changed, "off" did not
PINNED = {
    "off": (6.357508939855239, 0.0, 0.7830625772476196, 6.281492078626478, 0.0,
            0.8178516030311584),
    "full": (6.357508939855239, 0.0, 0.8361867070198059, 6.284631677576013, 0.021861324439177644,
             1.1033508777618408),
}


def one_run(base, out, mode: str, results) -> None:
    recipe = load_recipe(argv(base, out, pace__mode=mode, pace__sigma=1.0,
                              pace__consistency_weight=0.5, eval__at_start=False))
    with S.started(recipe) as trainer:
        trainer.stepper.train()
        stream = trainer.run.batches.batches_from(trainer.cursor)
        first = trainer.train_step(next(stream)[1])
        trainer.step += 1
        second = trainer.train_step(next(stream)[1])
    settle([first, second])  # device values to floats, as the logging step does
    results.send((first, second))  # a pipe: sent before the exit below, unlike a Queue
    sys.stdout.flush()
    os._exit(0)


def steps_in_a_child(base, out, mode: str):
    return one_rank(one_run, base, out, mode, wait=120)


@pytest.mark.parametrize("mode", ["off", "full"])
def test_one_step_pinned(tiny_base, tmp_path, mode):
    first, second = steps_in_a_child(tiny_base, tmp_path / mode, mode)
    got = tuple(s[k] for s in (first, second) for k in ("task_loss", "consistency", "grad_norm"))
    want = PINNED[mode]
    assert got == pytest.approx(want, rel=1e-5), got
    assert first["views"] == (2 if mode == "full" else 1) and first["paired"] == (mode == "full")
    if mode == "off":
        assert first["consistency"] == 0.0
    else:
        assert first["consistency"] == 0.0  # B = 0 at step 1: both views equal the base
        assert second["consistency"] > 0.0
