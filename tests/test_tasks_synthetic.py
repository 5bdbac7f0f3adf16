"""Synthetic problems and the offline base builder: seeded, correct arithmetic, GSM8K format."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from pace_llm.schema import DataArgs
from pace_llm.errors import UserError
from pace_llm.data.build import build_task, task_texts
from pace_llm.tasks.gsm8k import PAPER_PROMPT, extract_answer
from pace_llm.tasks.synthetic import EVAL_EXAMPLES, generate, splits
from pace_llm.tinymodel import build_base, train_tokenizer

BUILD = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
         "max_position_embeddings": 256, "vocab_size": 400}
STEP = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)$")


def test_problems_are_seeded_and_arithmetically_right():
    rows = generate(300, seed=3)
    assert rows == generate(300, seed=3) and rows != generate(300, seed=4)
    for row in rows:
        *steps, final = row["answer"].split("\n")
        assert final.startswith("#### ") and 1 <= len(steps) <= 2
        for step in steps:
            a, op, b, c = STEP.match(step).groups()
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)
        assert extract_answer(row["answer"]) == STEP.match(steps[-1]).group(4)
        assert all(int(n) < 10 for n in re.findall(r"\d+", row["question"]))
    for marker in ("gets ", "gives away", "in each bag.", "then finds", "loose"):
        assert any(marker in r["question"] for r in rows), marker  # every template is drawn


def test_eval_problems_are_unseen():
    train, evals = splits(DataArgs(task="synthetic", num_examples=500, seed=1))
    assert len(train) == 500 and len(evals) == EVAL_EXAMPLES
    assert not {r["question"] for r in evals} & {r["question"] for r in train}


def test_too_many_problems_requested():
    with pytest.raises(UserError, match="cannot draw 3 synthetic problems outside"):
        generate(3, seed=0, exclude={r["question"] for r in generate(100_000, seed=0)})


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_build_base_is_deterministic_and_consistent(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = DataArgs(task="synthetic", num_examples=300)
    texts = task_texts(data)
    assert texts[0].startswith(PAPER_PROMPT.split("{")[0]) and "\n\n" in texts[0]
    a = build_base(BUILD, texts, tmp_path / "a", seed=5)
    b = build_base(BUILD, texts, tmp_path / "b", seed=5)
    c = build_base(BUILD, texts, tmp_path / "c", seed=6)
    assert digest(a) == digest(b)
    assert digest(a)["model.safetensors"] != digest(c)["model.safetensors"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(digest(a))
    tok = AutoTokenizer.from_pretrained(a)
    model = AutoModelForCausalLM.from_pretrained(a)
    assert model.config.vocab_size == len(tok) <= 400
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        1, 2, 0)
    ids = tok("5 + 17 = 22")["input_ids"]
    assert ids[0] == 1 and tok.convert_ids_to_tokens(ids).count("1") == 1  # BOS, split digits
    assert tok.decode(ids, skip_special_tokens=True) == "5 + 17 = 22"


def test_synthetic_task_masks_on_built_tokenizer(tmp_path):
    data = DataArgs(task="synthetic", num_examples=200, seed=2, max_length=256)
    tok = train_tokenizer(task_texts(data), tmp_path / "tok", 512)
    task = build_task(data, tok)
    train, evals = splits(data)
    assert task.name == "synthetic" and task.stats["rows"] == 200
    assert task.stats["eval_rows"] == EVAL_EXAMPLES
    for row, ex in zip(train[:20], task.train):
        assert tok.decode([t for t in ex["labels"] if t != -100]) == row["answer"] + "</s>"
        n_prompt = ex["labels"].count(-100)
        assert tok.decode(ex["input_ids"][:n_prompt]) == (
            "<s> " + PAPER_PROMPT.format(question=row["question"]) + "\n\n")
    assert task.eval[0]["reference"] == evals[0]["answer"]
    assert task.metric([evals[0]["answer"], "#### 0"], [e["answer"] for e in evals[:2]]) == {
        "exact_match": 0.5}


def test_build_base_rejects_bad_builds(tmp_path):
    with pytest.raises(UserError, match="model.build needs a model_type"):
        build_base({"hidden_size": 64}, ["some text"], tmp_path / "x")
    with pytest.raises(UserError, match="vocab_size: 100 is too small"):
        build_base({"model_type": "llama", "vocab_size": 100}, ["some text"], tmp_path / "x")
    with pytest.raises(UserError, match="model.build: .*not_a_model"):
        build_base({"model_type": "not_a_model"}, ["some text"], tmp_path / "x")
