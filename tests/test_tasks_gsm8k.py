"""GSM8K task: answer extraction, exact match, prompt/target masks, length policy, bad data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import DATA, data_lines

from pace_llm.schema import DataArgs
from pace_llm.errors import UserError
from pace_llm.data.build import build_task
from pace_llm.tasks.gsm8k import PAPER_PROMPT, exact_match, extract_answer, normalize_number
from pace_llm.tinymodel import tokenizer_from_sentencepiece

SPM = DATA / "tokenizers" / "llama2c_tinystories_bpe512_bytefallback.model"
GSM8K = DATA / "gsm8k"  # samples of the real files (tests/fixtures/SOURCES.md)
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer_from_sentencepiece(SPM, tmp_path_factory.mktemp("tok"))


def supervised(example: dict) -> list[int]:
    return [t for t in example["labels"] if t != -100]


def squeeze(text: str) -> str:
    """This sentencepiece model collapses runs of spaces (remove_extra_whitespaces)."""
    return re.sub(" {2,}", " ", text)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EXTRACTION = [
    ("#### 18", "18"),
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 18", "18"),
    ("#### 2,125", "2125"),
    ("#### 1,000,000", "1000000"),
    ("#### -3", "-3"),
    ("#### -1,200", "-1200"),
    ("#### 5.0", "5"),
    ("#### 5.50", "5.5"),
    ("#### 0.25", "0.25"),
    ("#### 007", "7"),
    ("#### $1,234.50", "1234.5"),
    ("#### 12 apples", "12"),
    ("#### 18\nQuestion: more text\n#### 20", "20"),
    ("x #### 7 and later 9", "7"),
    ("2 + 2 = 4\n####", "4"),
    ("The answer is 42.", "42"),
    ("I have 3 apples and 4 pears, 7 in total", "7"),
    ("She lost money: the result is -3 dollars", "-3"),
    ("Answer: (-4)", "-4"),
    ("16-3 = 13", "13"),
    ("5-3", "3"),
    ("It costs $70,000 in total", "70000"),
    ("1,2,3", "3"),
    ("The temperature is .5 degrees", "0.5"),
    ("10 - 4 = 6. Final answer: 6", "6"),
    ("no numbers here", None),
    ("####", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", EXTRACTION)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_number_compares_as_numbers():
    assert normalize_number("2,125") == normalize_number("2125") == "2125"
    assert normalize_number("5.0") == normalize_number("5") == "5"
    assert normalize_number("-3") != normalize_number("3")
    assert normalize_number("0.10") == "0.1"
    assert normalize_number("abc") is None


def test_every_gold_test_answer_extracts_to_itself():
    rows = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()]
    assert len(rows) == len(data_lines(GSM8K / "test.jsonl"))  # every gold answer in the file
    finals = [r["answer"].split("####")[-1].strip() for r in rows]
    assert sum("," in f for f in finals) > 0 and sum(f.startswith("-") for f in finals) > 0
    assert [extract_answer(r["answer"]) for r in rows] == [str(int(f.replace(",", "")))
                                                           for f in finals]


def test_exact_match_metric():
    refs = ["so #### 2,125", "#### 5", "#### -3", "#### 10"]
    gens = ["the answer: 2125", "#### 5.0", "#### 3", "nothing"]
    assert exact_match(gens, refs) == {"exact_match": 0.5}
    assert exact_match([], []) == {"exact_match": 0.0}
    with pytest.raises(ValueError):
        exact_match(["1"], [])


def test_plain_layout_and_mask_on_real_data(tok):
    data = DataArgs(task="gsm8k", path=str(GSM8K), limit=20, max_length=1024)
    task = build_task(data, tok)
    rows = [json.loads(line) for line in (GSM8K / "train.jsonl").read_text().splitlines()[:20]]
    test0 = json.loads((GSM8K / "test.jsonl").read_text().splitlines()[0])
    assert task.kind == "causal_lm" and task.name == "gsm8k" and task.num_labels is None
    assert task.stats["rows"] == 20
    assert task.stats["eval_rows"] == len(data_lines(GSM8K / "test.jsonl"))
    assert task.stats["truncated"] == task.stats["dropped"] == 0
    for row, ex in zip(rows, task.train):
        assert len(ex["input_ids"]) == len(ex["labels"])
        assert tok.decode(supervised(ex)) == squeeze(row["answer"]) + "</s>"
        n_prompt = ex["labels"].index(next(t for t in ex["labels"] if t != -100))
        assert ex["input_ids"][0] == tok.bos_token_id
        assert tok.decode(ex["input_ids"][:n_prompt], skip_special_tokens=True) == squeeze(
            PAPER_PROMPT.format(question=row["question"]) + "\n\n")
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert task.stats["tokens"] == sum(len(e["input_ids"]) for e in task.train)
    assert task.stats["supervised_tokens"] == sum(len(supervised(e)) for e in task.train)
    first = task.eval[0]
    assert first["reference"] == test0["answer"]
    assert tok.decode(first["prompt_ids"], skip_special_tokens=True) == squeeze(
        PAPER_PROMPT.format(question=test0["question"]) + "\n\n")
    assert first["prompt_ids"][0] == tok.bos_token_id
    assert tok.decode(first["target_ids"]) == squeeze(test0["answer"]) + "</s>"
    assert task.metric(["#### 18"], [test0["answer"]]) == {"exact_match": 1.0}


def test_train_prompt_ids_equal_eval_prompt_ids(tok, tmp_path):
    rows = [{"question": "Tom has 3 pens and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows)
    for style in ("plain", "chat"):
        tok.chat_template = CHATML
        task = build_task(DataArgs(task="gsm8k", path=str(tmp_path), prompt_style=style), tok)
        ex = task.train[0]
        n_prompt = sum(1 for t in ex["labels"] if t == -100)
        assert task.eval[0]["prompt_ids"] == ex["input_ids"][:n_prompt], style
        assert task.eval[0]["target_ids"] == ex["input_ids"][n_prompt:] == supervised(ex), style


def test_chat_style_supervises_only_the_reply(tok, tmp_path):
    tok.chat_template = CHATML
    rows = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows)
    task = build_task(DataArgs(task="gsm8k", path=str(tmp_path), prompt_style="chat"), tok)
    ex = task.train[0]
    # template has no EOS: the reply plus the template's end of turn, then EOS appended
    assert tok.decode(supervised(ex)) == "2 + 3 = 5\n#### 5<|im_end|>\n</s>"
    n_prompt = sum(1 for t in ex["labels"] if t == -100)
    assert tok.decode(ex["input_ids"][:n_prompt], skip_special_tokens=True) == (
        "<|im_start|>user\n" + PAPER_PROMPT.format(question="What is 2 + 3?")
        + "<|im_end|>\n<|im_start|>assistant\n")


def test_on_too_long(tok, tmp_path):
    short = {"question": "1 + 1?", "answer": "#### 2"}
    long = {"question": "word " * 200, "answer": "#### 3"}
    write_jsonl(tmp_path / "train.jsonl", [short, long, long])
    write_jsonl(tmp_path / "test.jsonl", [short])
    base = {"task": "gsm8k", "path": str(tmp_path), "max_length": 128}
    dropped = build_task(DataArgs(**base, on_too_long="drop"), tok)
    stats = dropped.stats
    assert (stats["rows"], stats["dropped"], stats["truncated"]) == (1, 2, 0)
    # truncation keeps the first 128 tokens: the long rows lose their whole target -> dropped
    cut = build_task(DataArgs(**base, on_too_long="truncate"), tok)
    assert (cut.stats["rows"], cut.stats["dropped"]) == (1, 2)
    with pytest.raises(UserError, match=r"train\.jsonl row 2: \d+ tokens, longer than "
                                        r"data\.max_length=128"):
        build_task(DataArgs(**base, on_too_long="error"), tok)
    write_jsonl(tmp_path / "train.jsonl", [short, {"question": "q", "answer": "word " * 100}])
    kept = build_task(DataArgs(**base, on_too_long="truncate"), tok)
    assert (kept.stats["rows"], kept.stats["truncated"]) == (2, 1)
    assert len(kept.train[1]["input_ids"]) == 128 and kept.train[1]["labels"][-1] != -100


def test_every_example_too_long(tok, tmp_path):
    long = {"question": "word " * 200, "answer": "#### 3"}
    write_jsonl(tmp_path / "train.jsonl", [long, long])
    write_jsonl(tmp_path / "test.jsonl", [long])
    with pytest.raises(UserError, match=r"train\.jsonl: every example \(2\) is longer than "
                                        r"data\.max_length=32"):
        build_task(DataArgs(task="gsm8k", path=str(tmp_path), max_length=32), tok)


def test_bad_data_names_file_and_row(tok, tmp_path):
    good = {"question": "1 + 1?", "answer": "#### 2"}
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(UserError, match=f"data file '{missing}' does not exist"):
        build_task(DataArgs(task="gsm8k", path=str(missing), eval_path=str(missing)), tok)
    write_jsonl(tmp_path / "train.jsonl", [good, {"question": "2 + 2?"}])
    write_jsonl(tmp_path / "test.jsonl", [good])
    with pytest.raises(UserError, match=rf"{tmp_path}/train\.jsonl row 2: missing field 'answer' "
                                        r"\(the row has: question\)"):
        build_task(DataArgs(task="gsm8k", path=str(tmp_path)), tok)
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(UserError, match=r"train\.jsonl: the dataset is empty"):
        build_task(DataArgs(task="gsm8k", path=str(tmp_path)), tok)
    (tmp_path / "train.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(UserError, match=r"train\.jsonl row 2: not valid JSON"):
        build_task(DataArgs(task="gsm8k", path=str(tmp_path)), tok)
    write_jsonl(tmp_path / "train.jsonl", [good, {"question": "q", "answer": 7}])
    with pytest.raises(UserError, match=r"row 2: field 'answer' is int 7; expected str"):
        build_task(DataArgs(task="gsm8k", path=str(tmp_path)), tok)
    lone = write_jsonl(tmp_path / "mine.jsonl", [good])
    with pytest.raises(UserError, match="set data.eval_path"):
        build_task(DataArgs(task="gsm8k", path=str(lone)), tok)


def test_hub_reader_via_datasets(tmp_path, monkeypatch):
    import datasets

    from pace_llm.data.sources import read_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")

    rows = [{"question": "1 + 1?", "answer": "#### 2"}, {"question": "2 + 2?", "answer": "#### 4"}]
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "test.jsonl", rows[:1])
    train = read_hub(str(tmp_path / "data"), None, "train")  # datasets.load_dataset on a data folder
    assert train.items == [(1, rows[0]), (2, rows[1])] and train.where(2).endswith("[train] row 2")
    with pytest.raises(UserError, match=r"cannot load hub dataset .* split 'validation'"):
        read_hub(str(tmp_path / "data"), None, "validation")
