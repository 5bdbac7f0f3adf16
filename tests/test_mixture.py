"""data.mix: shares follow the weights, each source cycles through its examples, resume
continues the sequence, per-source counts and evaluation, and the recipe errors."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import numpy as np
import pytest
from conftest import DATA

from pace_llm.config import load_recipe
from pace_llm.errors import RecipeError
from pace_llm.data.batches import Cursor, MixtureOrder
from tests.launch import argv
from tests.test_streaming import consumed

SIZES = [300, 50, 1000]
WEIGHTS = [5.0, 3.0, 2.0]


def mixture(global_batch: int = 16, seed: int = 1) -> MixtureOrder:
    rng = np.random.default_rng(0)
    lengths = [rng.integers(4, 200, n).tolist() for n in SIZES]
    return MixtureOrder(["a", "b", "c"], lengths, WEIGHTS, global_batch, seed)


def test_shares_follow_the_weights_within_two_percent():
    plan = mixture()
    batches = [b for _, b in islice(plan.batches_from(Cursor()), 625)]  # 10,000 examples
    counts = Counter()
    for b in batches:
        counts.update(plan.source_counts(b))
    assert sum(counts.values()) == 10_000
    for name, w in zip("abc", WEIGHTS):
        assert abs(counts[name] / 10_000 - w / sum(WEIGHTS)) < 0.02, counts
    # each source cycles through all its examples before repeating one: over ~3,000 draws of
    # source b (50 examples) every example is drawn floor or ceil(draws / 50) times
    ids = Counter(i for b in batches for i in b if 300 <= i < 350)
    assert len(ids) == 50 and max(ids.values()) - min(ids.values()) <= 1, ids
    # a global batch is sorted longest first
    assert all(list(plan.lengths[b]) == sorted(plan.lengths[b], reverse=True) for b in batches)


def test_resume_continues_the_same_sequence():
    plan = mixture(global_batch=8)
    whole = list(islice(plan.batches_from(Cursor()), 300))
    for k in (1, 77, 299):
        again = list(islice(mixture(global_batch=8).batches_from(whole[k - 1][0]), 300 - k))
        assert again == whole[k:], k
    # far past one chunk of draws (2^20): the cursor alone decides the batch
    far = list(islice(plan.batches_from(Cursor(0, 200_000)), 2))
    assert far[0][0] == Cursor(0, 200_001)
    again = list(islice(mixture(global_batch=8).batches_from(Cursor(0, 200_001)), 1))
    assert again[0] == far[1]


def _mix(*sources: dict) -> str:
    return json.dumps(list(sources))


GSM = {"path": str(DATA / "gsm8k" / "train.jsonl"), "task": "gsm8k",
       "eval_path": str(DATA / "gsm8k" / "test.jsonl"), "weight": 3, "name": "math"}
SEED = {"path": str(DATA / "instruct" / "self_instruct_seed_tasks.jsonl"), "weight": 1,
        "name": "seed"}


def mix_argv(base, out, mix: str, **overrides):
    opts = dict(data__task="instruct", data__mix=mix, data__max_length=512, train__max_steps=8,
                train__micro_batch_size=4, eval__at_start=False, eval__limit=2,
                train__log_every=4)
    return argv(base, out, **{**opts, **overrides})


@pytest.mark.multiproc
def test_a_mixture_run_counts_sources_evaluates_each_and_resumes(tiny_base, tmp_path):
    out = tmp_path / "whole"
    whole = consumed(mix_argv(tiny_base, out, _mix(GSM, SEED)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "task_loss" in r]
    assert [r["step"] for r in train] == [4, 8]
    for r, steps in zip(train, (whole[:4], whole[4:])):
        n = sum(len(s) for s in steps)
        assert sum(r["examples_by_source"].values()) == n == 16
        assert set(r["examples_by_source"]) == {"math", "seed"}
    evals = [r["eval"] for r in rows if "eval" in r]
    # the first source is the eval set (its metric); the other is scored with its own task's
    assert set(evals[-1]["metrics"]) == {"exact_match"}
    assert set(evals[-1]["extra"]) == {"seed"} and "token_f1" in evals[-1]["extra"]["seed"]
    # killed after step 6 with a checkpoint at step 5: the resumed run redoes 6-8 identically
    killed = tmp_path / "killed"
    before = consumed(mix_argv(tiny_base, killed, _mix(GSM, SEED), train__save_every=5),
                      stop_after=6)
    assert before == whole[:6]
    after = consumed(mix_argv(tiny_base, killed, _mix(GSM, SEED), train__save_every=5,
                              train__resume="auto"))
    assert after == whole[5:]


def test_mixture_recipe_errors_are_listed_together(tiny_base, tmp_path):
    bad = _mix({**GSM, "weight": 0}, {**SEED, "wieght": 2}, {"weight": -1.5, "task": "glue"},
               {**SEED, "path": str(DATA / "x.jsonl")})
    with pytest.raises(RecipeError) as err:
        load_recipe(mix_argv(tiny_base, tmp_path, bad, data__path="also.jsonl"))
    text = str(err.value)
    for needle in ["data.path 'also.jsonl' and data.mix are both set",
                   "data.mix[0].weight: 0 must be a number > 0",
                   "data.mix[1].wieght: unknown key; did you mean 'weight'?",
                   "data.mix[2].path: None; every source needs a path",
                   "data.mix[2].weight: -1.5 must be a number > 0",
                   "data.mix[2].task: 'glue' trains a seq_cls model but data.task 'instruct'",
                   "data.mix[3]: source name 'seed' is also data.mix[1]'s"]:
        assert needle in text, (needle, text)


def test_a_source_whose_fields_do_not_fit_its_task_names_source_file_and_row(tiny_base,
                                                                              tmp_path):
    from pace_llm.errors import UserError
    from pace_llm.model import load_tokenizer
    from pace_llm.data.build import build_task

    recipe = load_recipe(mix_argv(tiny_base, tmp_path, _mix(
        SEED, {"path": SEED["path"], "task": "gsm8k", "name": "wrong",
               "eval_path": GSM["eval_path"]}), data__cache_dir=str(tmp_path / "cache")))
    tok = load_tokenizer(str(tiny_base), recipe)
    with pytest.raises(UserError) as err:
        build_task(recipe.data, tok)
    assert str(err.value).startswith(f"data.mix[1] (wrong): {SEED['path']} row 1: missing "
                                     "field 'question'"), err.value
    # data.columns maps the data's fields onto the task's: the same file now fits gsm8k
    fixed = load_recipe(mix_argv(tiny_base, tmp_path, _mix(SEED, {
        "path": SEED["path"], "task": "gsm8k", "name": "mapped", "eval_path": SEED["path"],
        "columns": {"question": "instruction", "answer": "name"}}),
        data__cache_dir=str(tmp_path / "cache")))
    task = build_task(fixed.data, tok)
    assert task.mixture.names == ["seed", "mapped"]
    assert task.mixture.sizes[1] == 175 and len(task.train) == sum(task.mixture.sizes)


def test_sources_rendering_conversations_share_one_chat_template(tiny_base, tmp_path):
    """The adapter is evaluated, exported and served with one chat template, so a mixture whose
    conversation-rendering sources name two is refused at parse time, naming each."""
    chat_gsm = {**GSM, "prompt_style": "chat", "chat_template": "llama-3"}
    with pytest.raises(RecipeError) as err:
        load_recipe(mix_argv(tiny_base, tmp_path, _mix(
            SEED, chat_gsm, {**SEED, "name": "again", "chat_template": "chatml"}),
            data__prompt_style="chat", data__chat_template="chatml"))
    assert ("data.mix: the sources render conversations with 2 chat templates "
            "(data.mix[0] (seed), data.mix[2] (again): 'chatml'; data.mix[1] (math): "
            "'llama-3'); an adapter is evaluated, exported and served with one: set one "
            "data.chat_template for every source (or none, for the tokenizer's own)"
            ) in str(err.value)
    with pytest.raises(RecipeError) as err:  # instruct's plain layout is a template too
        load_recipe(mix_argv(tiny_base, tmp_path, _mix(SEED, {**chat_gsm, "chat_template": None})))
    assert ("(data.mix[0] (seed): pace_llm's plain layout; data.mix[1] (math): the tokenizer's "
            "own)") in str(err.value)
    one = load_recipe(mix_argv(tiny_base, tmp_path, _mix(SEED, {**chat_gsm,
                                                               "chat_template": "chatml"}),
                               data__prompt_style="chat", data__chat_template="chatml"))
    assert [source["name"] for source in one.data.mix] == ["seed", "math"]
