"""data.streaming: the shuffle buffer's order, each rank's share, the cursor, and a run killed
and resumed mid-epoch that consumes exactly the examples of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import sys
from itertools import islice
from pathlib import Path

import pytest
from conftest import DATA

from pace_llm import setup as S
from pace_llm.config import load_recipe
from pace_llm.data.batches import Cursor, StreamOrder, shuffled
from pace_llm.data.stream import StreamExamples
from tests.launch import argv, one_rank

GSM8K = DATA / "gsm8k"


# ------------------------------------------------------------------------- the order
def test_shuffle_buffer_is_a_seeded_permutation_per_epoch():
    rows = [(i, {"n": i}) for i in range(1000)]
    a = [i for i, _ in shuffled(iter(rows), 64, seed=3, epoch=0)]
    assert sorted(a) == list(range(1000))  # every row once
    assert a == [i for i, _ in shuffled(iter(rows), 64, seed=3, epoch=0)]  # a pure function
    assert a != [i for i, _ in shuffled(iter(rows), 64, seed=3, epoch=1)]  # a new order per epoch
    assert a != [i for i, _ in shuffled(iter(rows), 64, seed=4, epoch=0)]
    assert [i for i, _ in shuffled(iter(rows), 1, seed=3, epoch=0)] == list(range(1000))
    # a row leaves the buffer no earlier than (its position - buffer size)
    assert all(p >= i - 64 for p, i in enumerate(a))
    assert sum(p != i for p, i in enumerate(a)) > 900  # and most rows moved


class FakeSource:
    """Rows 0..n-1; a row whose id is in ``drop`` is dropped by the length policy."""

    def __init__(self, n: int, drop: set[int] = frozenset()):
        self.n, self.drop, self.tokenized = n, drop, []

    def records(self):
        return ((i, {"id": i}) for i in range(self.n))

    def tokenize(self, records):
        self.tokenized += [r["id"] for r in records]
        return [None if r["id"] in self.drop else {"input_ids": [r["id"]], "labels": [r["id"]]}
                for r in records]


def plan(source, world=1, rank=0, micro=2, accum=2, buffer=8) -> StreamOrder:
    return StreamOrder(StreamExamples([], source), micro, accum, world, rank, seed=5,
                       buffer=buffer)


def mine(batch: list[int]) -> list[int]:
    return [i for i in batch if i >= 0]


def test_ranks_tokenize_disjoint_shares_of_one_order():
    order = [i for i, _ in shuffled(FakeSource(40).records(), 8, seed=5, epoch=0)]
    got = {}
    for rank in (0, 1):
        source = FakeSource(40)
        p = plan(source, world=2, rank=rank)
        batches = list(islice(p.batches_from(Cursor()), 5))  # 5 steps x 4 = this rank's 20 rows
        got[rank] = [i for _, b in batches for i in mine(b)]
        assert source.tokenized == got[rank]  # a rank tokenizes its own share only
        # own positions in the global batch: rank r's a-th micro-batch at (a*world + r)*micro
        first = batches[0][1]
        assert [i >= 0 for i in first] == ([True, True, False, False] * 2 if rank == 0
                                           else [False, False, True, True] * 2)
    assert not set(got[0]) & set(got[1]) and sorted(got[0] + got[1]) == list(range(40))
    # rank r takes runs of `micro` rows: positions p with (p // micro) % world == r
    assert got[0] == [order[p] for p in range(40) if (p // 2) % 2 == 0]
    # the examples of the current batch are looked up by row id
    p = plan(FakeSource(40), world=2, rank=1)
    _, batch = next(p.batches_from(Cursor()))
    assert [e["input_ids"][0] for e in p.examples.lookup(mine(batch))] == mine(batch)


def test_dropped_rows_are_replaced_and_the_cursor_resumes_exactly():
    source = FakeSource(30, drop={3, 7, 11, 20})
    full = list(islice(plan(source).batches_from(Cursor()), 12))  # 48 examples: 2+ epochs
    ids = [i for _, b in full for i in b]
    assert not {3, 7, 11, 20} & set(ids)
    assert ids[:26] != ids[26:52] and sorted(ids[:26]) == sorted(set(range(30)) - {3, 7, 11, 20})
    epochs = [c.epoch for c, _ in full]
    assert epochs[0] == 0 and epochs[-1] == 1
    for k in (1, 5, 6, 7):  # resume from the cursor after step k: the same continuation
        cursor = full[k - 1][0]
        again = list(islice(plan(FakeSource(30, drop={3, 7, 11, 20})).batches_from(cursor),
                            12 - k))
        assert [b for _, b in again] == [b for _, b in full[k:]], k


def test_an_empty_share_is_an_error():
    from pace_llm.errors import UserError

    with pytest.raises(UserError, match="rank 1 found no usable training row"):
        next(plan(FakeSource(2), world=2, rank=1).batches_from(Cursor()))
    with pytest.raises(UserError, match="rank 0 found no usable training row"):
        next(plan(FakeSource(6, drop=set(range(6)))).batches_from(Cursor()))


# ----------------------------------------------------------------- a killed, resumed run
def _child(argv_: list[str], stop_after: int | None, pipe) -> None:
    seen: list[list[int]] = []

    def record(trainer, global_batch, stats) -> None:
        seen.append([i for i in global_batch if i >= 0])
        if stop_after is not None and trainer.step == stop_after:
            pipe.send(seen)
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no checkpoint, no cleanup

    with S.started(load_recipe(argv_)) as trainer:
        trainer.on_step_end.append(record)
        trainer.train()
    pipe.send(seen)
    sys.stdout.flush()
    os._exit(0)


def consumed(argv_: list[str], stop_after: int | None = None) -> list[list[int]]:
    """The example ids of each step of a one-rank run in a forked child (hooks on the trainer);
    ``stop_after``: the child kills itself after that step."""
    return one_rank(_child, argv_, stop_after,
                    exitcode=-signal.SIGKILL if stop_after is not None else 0)


def stream_argv(base: Path, out: Path, **overrides) -> list[str]:
    opts = dict(data__task="gsm8k", data__path=GSM8K / "train.jsonl",
                data__eval_path=GSM8K / "test.jsonl", data__streaming=True,
                data__shuffle_buffer=16, data__max_length=512, train__max_steps=14,
                train__micro_batch_size=2, train__grad_accum=2, eval__at_start=False,
                eval__limit=2)
    return argv(base, out, **{**opts, **overrides})


@pytest.mark.multiproc
def test_a_killed_streamed_run_resumes_with_the_same_examples(tiny_base, tmp_path):
    whole = consumed(stream_argv(tiny_base, tmp_path / "whole"))
    ids = [i for step in whole for i in step]
    assert len(whole) == 14 and all(len(s) == 4 for s in whole)
    assert len(set(ids[:40])) == 40  # the first epoch: no example twice (100 rows, some dropped)
    out = tmp_path / "killed"
    before = consumed(stream_argv(tiny_base, out, train__save_every=5), stop_after=12)
    assert before == whole[:12]
    assert {p.name for p in (out / "checkpoints").glob("step-*")} == {"step-5", "step-10"}
    after = consumed(stream_argv(tiny_base, out, train__save_every=5, train__resume="auto"))
    assert after == whole[10:]  # steps 11-14 again, from the step-10 cursor


def test_streaming_recipe_errors(tiny_base, tmp_path):
    from pace_llm.errors import RecipeError

    with pytest.raises(RecipeError) as err:
        load_recipe(stream_argv(tiny_base, tmp_path, train__max_steps=0, pace__mode="fast",
                                data__shuffle_buffer=0))
    text = str(err.value)
    assert "data.streaming needs train.max_steps > 0" in text
    assert "pace.mode 'fast' keeps an output per training example and cannot stream" in text
    assert "data.shuffle_buffer: 0 must be >= 1" in text


@pytest.mark.multiproc
def test_two_ranks_streamed_killed_and_resumed_match_and_need_two_ranks(tiny_base, tmp_path):
    from safetensors.torch import load_file

    from tests.launch import Ranks, ckpt_exists, metrics, run

    def metrics_of(result, where):
        codes, log = result
        assert codes == [0, 0], log
        return metrics(where)

    common = dict(train__max_steps=8, train__save_every=3, train__micro_batch_size=1,
                  data__on_too_long="drop", data__max_length=300)  # drops: shares differ
    ref, _ = metrics_of(run(stream_argv(tiny_base, tmp_path / "ref", **common), 2,
                            tmp_path / "ref-logs"), tmp_path / "ref")
    out = tmp_path / "killed"
    ranks = Ranks(stream_argv(tiny_base, out, **common), 2, tmp_path / "killed-logs")
    ranks.kill_when(ckpt_exists(out, 3))
    # one rank cannot continue a two-rank stream: exit 2, nothing changed
    codes, log = run(stream_argv(tiny_base, out, train__resume="auto", **common), 1,
                     tmp_path / "one-rank-logs")
    assert codes == [2], log
    assert "was written by 2 ranks; resume it with the same number (this run has 1)" in log
    codes, log = run(stream_argv(tiny_base, out, train__resume="auto", **common), 2,
                     tmp_path / "resume-logs")
    assert codes == [0, 0], log
    got, _ = metrics(out)
    assert [r["task_loss"] for r in got] == [r["task_loss"] for r in ref]
    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
