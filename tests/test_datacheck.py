"""`pace-llm data-check`: the rendered, masked example, the statistics, exit code 2 on bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DATA, data_lines

from pace_llm import cli, datacheck
from pace_llm.tinymodel import tokenizer_from_sentencepiece

REPO = Path(__file__).resolve().parents[1]
SPM = DATA / "tokenizers" / "llama2c_tinystories_bpe512_bytefallback.model"


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture
def recipe(tmp_path) -> Path:
    """A gsm8k recipe on the fixture data with a local tokenizer directory as the model."""
    tokenizer_from_sentencepiece(SPM, tmp_path / "model")
    path = tmp_path / "r.yaml"
    path.write_text(f"model:\n  name_or_path: {tmp_path / 'model'}\n"
                    f"data:\n  task: gsm8k\n  path: {DATA / 'gsm8k'}\n  limit: 12\n")
    return path


def test_demo_recipe(capsys):
    assert datacheck.main(["--recipe", "recipes/demo.yaml", "--data.num_examples", "50"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("task: synthetic (causal_lm)\n--- training example 0 ---\n")
    assert "[SUP]" in out and out.count("[SUP]") == out.count("[/SUP]") == 1
    supervised = out.split("[SUP]")[1].split("[/SUP]")[0]
    assert supervised.endswith("</s>") and "#### " in supervised
    assert "Answer below question" in out.split("[SUP]")[0]
    assert "\nrows: 50\n" in out and "\neval_rows: 200" in out and "\ndropped: 0\n" in out


def test_local_model_and_data(recipe, capsys):
    assert datacheck.main(["--recipe", str(recipe), "--example", "1"]) == 0
    out = capsys.readouterr().out
    second = json.loads((DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[1])
    assert "--- training example 1 ---" in out
    assert f"[SUP]{second['answer']}</s>[/SUP]" in out
    eval_rows = len(data_lines(DATA / "gsm8k" / "test.jsonl"))
    assert "\nrows: 12\n" in out and f"\neval_rows: {eval_rows}\n" in out
    assert "\ntruncated: 0\n" in out
    test0 = json.loads((DATA / "gsm8k" / "test.jsonl").read_text().splitlines()[0])
    assert f"  reference: {test0['answer']!r}" in out


def test_bad_data_exits_2_with_one_message(recipe, capsys):
    missing = recipe.parent / "absent.jsonl"
    argv = ["--recipe", str(recipe), "--data.path", str(missing), "--data.eval_path",
            str(missing)]
    assert datacheck.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: data file '{missing}' does not exist\n"
    assert cli.main(["data-check", *argv]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_bad_row_and_bad_example_index(recipe, tmp_path, capsys):
    rows = tmp_path / "train.jsonl"
    rows.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n"
                    + json.dumps({"question": "q"}) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    assert datacheck.main(["--recipe", str(recipe), "--data.path", str(rows)]) == 2
    assert f"{rows} row 2: missing field 'answer'" in capsys.readouterr().err
    assert datacheck.main(["--recipe", str(recipe), "--example", "99"]) == 2
    assert "--example 99: the training set has 12 examples" in capsys.readouterr().err
    assert datacheck.main(["--recipe", str(recipe), "--data.tsk", "glue"]) == 2
