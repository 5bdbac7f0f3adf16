"""The task cache (tokenize once, Arrow, shared by every rank) and CSV/TSV data files.

The cached builder must give exactly the examples of the one-process Python path
(:func:`pace_llm.data.build.build_lists`: the same row -> example functions in one loop), in order,
with the same statistics and the same row-numbered errors, also when the rows are tokenized
in two worker processes.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import DATA

from pace_llm.schema import DataArgs
from pace_llm.data import cache
from pace_llm.data.batches import EpochOrder
from pace_llm.data.build import build_lists, build_task
from pace_llm.data.examples import ArrowExamples
from pace_llm.distributed import free_port
from pace_llm.errors import UserError
from pace_llm.tasks import gsm8k
from pace_llm.tinymodel import tokenizer_from_sentencepiece

SPM = DATA / "tokenizers" / "llama2c_tinystories_bpe512_bytefallback.model"
GSM8K, GLUE = DATA / "gsm8k", DATA / "glue"
SEEDS = DATA / "instruct" / "self_instruct_seed_tasks.jsonl"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>' + (eos_token if m['role'] == 'assistant' else '') + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GOOD = {"question": "Tom has 3 pens and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer_from_sentencepiece(SPM, tmp_path_factory.mktemp("tok"))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PACE_LLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def two_workers(monkeypatch):
    """Tokenize even a small fixture in two processes (contiguous shards)."""
    monkeypatch.setattr(cache, "MIN_ROWS_PER_PROC", 1)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cached_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "tasks").iterdir()) if (root / "tasks").is_dir() else []


IDENTITY = {
    "gsm8k": {"task": "gsm8k", "path": str(GSM8K)},
    "gsm8k-chat-drop": {"task": "gsm8k", "path": str(GSM8K), "prompt_style": "chat",
                        "max_length": 460, "on_too_long": "drop"},
    "gsm8k-truncate": {"task": "gsm8k", "path": str(GSM8K), "max_length": 400,
                       "on_too_long": "truncate", "limit": 60},
    "cola": {"task": "glue", "glue_task": "cola", "path": str(GLUE / "CoLA"), "max_length": 512},
    "sst2-truncate": {"task": "glue", "glue_task": "sst2", "path": str(GLUE / "SST-2"),
                      "max_length": 24, "on_too_long": "truncate"},
    "mrpc": {"task": "glue", "glue_task": "mrpc", "path": str(GLUE / "MRPC-sample" / "train.tsv"),
             "eval_path": str(GLUE / "MRPC-sample" / "train.tsv"), "max_length": 512},
    "self-instruct": {"task": "instruct", "path": str(SEEDS), "prompt_style": "chat",
                      "max_length": 8192},
    "self-instruct-drop": {"task": "instruct", "path": str(SEEDS), "max_length": 240,
                           "on_too_long": "drop"},
    "synthetic": {"task": "synthetic", "num_examples": 300, "seed": 3},
}


@pytest.mark.parametrize("name", list(IDENTITY))
def test_cached_examples_equal_the_python_path(tok, name, two_workers):
    tok.chat_template = CHATML
    data = DataArgs(**IDENTITY[name], num_proc=2)
    new, old = build_task(data, tok), build_lists(data, tok)
    assert isinstance(new.train, ArrowExamples) and isinstance(old.train, list)
    assert len(new.train) == len(old.train) > 0
    assert list(new.train) == old.train  # same examples, same order
    assert [new.train[i] for i in range(len(new.train))] == old.train
    assert new.train[-1] == old.train[-1] and new.train[:3] == old.train[:3]
    assert new.eval == old.eval and new.extra_eval == old.extra_eval
    assert new.stats == old.stats and list(new.stats) == list(old.stats)
    assert list(new.lengths) == old.lengths == [len(e["input_ids"]) for e in old.train]
    assert (EpochOrder(new.lengths, 4, 7).epoch(1) == EpochOrder(old.lengths, 4, 7).epoch(1)).all()
    assert new.max_train_id == old.max_train_id
    first = new.train[0]
    assert all(type(v) is list for k, v in first.items() if k != "label")
    assert all(type(t) is int for t in first["input_ids"])
    assert (new.kind, new.name, new.num_labels, new.main_metric) == (
        old.kind, old.name, old.num_labels, old.main_metric)
    if name.endswith(("drop", "truncate")):
        assert new.stats["dropped"] + new.stats["truncated"] > 0  # the policy did something


def test_second_build_is_a_cache_hit(tok, cache_dir, monkeypatch, caplog):
    data = DataArgs(task="gsm8k", path=str(GSM8K), limit=30)
    with caplog.at_level(logging.INFO, logger="pace_llm"):
        first = build_task(data, tok)
    assert "task cache: built" in caplog.text and "read 152 rows" in caplog.text
    (directory,) = cached_dirs(cache_dir)

    def boom(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(gsm8k, "segments", boom)  # train and eval examples both need it
    monkeypatch.setattr(gsm8k, "load_splits", boom)  # nor is the data read
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pace_llm"):
        again = build_task(data, tok)
    assert f"task cache hit: {cache_dir / 'tasks' / directory}" in caplog.text
    assert "read 152 rows" in caplog.text  # the build's log lines are replayed
    assert list(again.train) == list(first.train) and again.eval == first.eval
    assert again.stats == first.stats
    with pytest.raises(AssertionError, match="tokenized again"):
        build_task(DataArgs(task="gsm8k", path=str(GSM8K), limit=31), tok)


def test_key_covers_data_length_policy_and_tokenizer(tmp_path):
    shutil.copytree(GSM8K, tmp_path / "gsm8k")
    data = DataArgs(task="gsm8k", path=str(tmp_path / "gsm8k"))
    tok = tokenizer_from_sentencepiece(SPM, tmp_path / "tok1")

    def key(d: DataArgs, t=tok) -> str:
        return cache.cache_key(gsm8k.task_spec(d, t), d, t)[0]

    base = key(data)
    assert key(DataArgs(task="gsm8k", path=str(tmp_path / "gsm8k"))) == base
    changed = {key(DataArgs(task="gsm8k", path=str(tmp_path / "gsm8k"), **kw))
               for kw in ({"max_length": 512}, {"on_too_long": "truncate"}, {"limit": 10},
                          {"prompt_style": "chat"}, {"num_examples": 7})}
    assert base not in changed and len(changed) == 5
    other = tokenizer_from_sentencepiece(SPM, tmp_path / "tok2")
    assert key(data, other) == base  # the same tokenizer in another directory
    other.chat_template = CHATML
    other.add_tokens(["<|im_end|>"], special_tokens=True)
    assert key(data, other) != base
    train = tmp_path / "gsm8k" / "train.jsonl"
    lines = train.read_text().splitlines()
    row = json.loads(lines[5])
    row["answer"] += " "
    train.write_text("\n".join(lines[:5] + [json.dumps(row)] + lines[6:]) + "\n")
    assert key(data) != base
    (tmp_path / "gsm8k" / "test.jsonl").write_text(lines[0] + "\n")  # the eval file counts too
    assert len({base, key(data)}) == 2


def test_changed_file_is_tokenized_again(tok, tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD] * 3)
    write_jsonl(tmp_path / "test.jsonl", [GOOD])
    data = DataArgs(task="gsm8k", path=str(path))
    assert build_task(data, tok).stats["rows"] == 3
    write_jsonl(path, [GOOD] * 4)
    assert build_task(data, tok).stats["rows"] == 4
    assert len(cached_dirs(cache_dir)) == 2


SPY = {"path": None}


def spy_train_examples(tok, ctx, records, policy):
    """gsm8k's row -> example function, noting the process that ran it."""
    with open(SPY["path"], "a") as f:
        f.write(f"{os.getpid()} {records[0]['where']}\n")
    return gsm8k_train_examples(tok, ctx, records, policy)


gsm8k_train_examples = gsm8k.train_examples


def test_rows_are_tokenized_in_num_proc_workers(tok, tmp_path, monkeypatch, two_workers):
    SPY["path"] = tmp_path / "spy"
    monkeypatch.setattr(gsm8k, "train_examples", spy_train_examples)
    task = build_task(DataArgs(task="gsm8k", path=str(GSM8K), num_proc=2), tok)
    calls = [line.split(" ", 1) for line in SPY["path"].read_text().splitlines()]
    assert len({pid for pid, _ in calls}) == 2 and str(os.getpid()) not in dict(calls)
    assert sorted(where.rsplit(" ", 1)[1] for _, where in calls) == ["1", "51"]  # two shards
    assert task.stats["rows"] == 100


def test_worker_errors_are_the_same_user_errors(tok, tmp_path, two_workers):
    long = {"question": "word " * 300, "answer": "#### 3"}
    rows = [GOOD] * 40
    cases = [
        ({30: long}, "error", r"train\.jsonl row 31: \d+ tokens, longer than data\.max_length"),
        ({12: long, 35: long}, "error", r"train\.jsonl row 13: \d+ tokens"),  # the first one
        ({25: {"question": "q"}}, "drop", r"train\.jsonl row 26: missing field 'answer'"),
        ({i: long for i in range(40)}, "drop", (r"every example \(40\) is longer than "
                                                r"data\.max_length=128 \(the shortest has")),
    ]
    write_jsonl(tmp_path / "test.jsonl", [GOOD])
    for bad, mode, message in cases:
        write_jsonl(tmp_path / "train.jsonl", [bad.get(i, r) for i, r in enumerate(rows)])
        data = DataArgs(task="gsm8k", path=str(tmp_path), max_length=128, on_too_long=mode,
                        num_proc=2)
        with pytest.raises(UserError, match=message) as new:
            build_task(data, tok)
        with pytest.raises(UserError) as old:
            build_lists(data, tok)
        assert str(new.value) == str(old.value)
    convs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                              "content": "hello"}]}] * 30
    convs[20] = {"messages": [{"role": "assistant", "content": "x"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", convs)
    with pytest.raises(UserError, match=rf"{path} row 21: the conversation starts with an "
                                        "assistant turn"):
        build_task(DataArgs(task="instruct", path=str(path), num_proc=2), tok)


def test_failed_build_leaves_no_cache(tok, cache_dir, monkeypatch):
    data = DataArgs(task="gsm8k", path=str(GSM8K), limit=10)
    real = cache._tokenize

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "_tokenize", killed)
    with pytest.raises(KeyboardInterrupt):
        build_task(data, tok)
    assert cached_dirs(cache_dir) == []  # neither a directory nor a temporary one
    spec = gsm8k.task_spec(data, tok)
    directory = cache.task_dir(spec, data, cache.cache_key(spec, data, tok)[0])
    stale = directory.parent / f".{directory.name}.tmp-{socket.gethostname()}-99999999"
    (stale / "work").mkdir(parents=True)  # what a SIGKILL leaves
    monkeypatch.setattr(cache, "_tokenize", real)
    assert build_task(data, tok).stats["rows"] == 10
    assert cached_dirs(cache_dir) == [directory.name]


def test_num_proc_and_cache_dir(tok, tmp_path):
    with pytest.raises(UserError, match="data.num_proc: 0 must be an integer >= 1"):
        build_task(DataArgs(task="synthetic", num_examples=20, num_proc=0), tok)
    build_task(DataArgs(task="synthetic", num_examples=20, cache_dir=str(tmp_path / "mine")), tok)
    assert len(cached_dirs(tmp_path / "mine")) == 1
    assert cache.num_proc(DataArgs()) == min(8, len(os.sched_getaffinity(0)))


def _rank(rank: int, port: int, data: DataArgs, tok, out: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = 1
    try:
        import torch.distributed as dist

        # a short default timeout: the wait for rank 0's build must not be bound by it
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=3))
        task = build_task(data, tok)
        (out / f"rank{rank}.json").write_text(json.dumps(
            {"train": list(task.train), "eval": task.eval, "stats": task.stats,
             "arrow": isinstance(task.train, ArrowExamples)}))
        dist.barrier()
        dist.destroy_process_group()
        code = 0
    except BaseException:  # noqa: BLE001 - reported through the file
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
    os._exit(code)


def test_two_ranks_tokenize_once(tok, tmp_path, monkeypatch):
    real = cache._build_into

    def counted(*args, **kwargs):
        with (tmp_path / "builds").open("a") as f:
            f.write(f"{os.environ['RANK']}\n")
        time.sleep(5)  # a build longer than the process group's timeout
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "_build_into", counted)
    data = DataArgs(task="gsm8k", path=str(GSM8K), limit=40, cache_dir=str(tmp_path / "c"))
    for attempt in range(2):  # a first build, then a start from the cache
        port, ctx = free_port(), mp.get_context("fork")
        procs = [ctx.Process(target=_rank, args=(r, port, data, tok, tmp_path)) for r in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        errors = "".join(p.read_text() for p in tmp_path.glob("rank*.err"))
        assert [p.exitcode for p in procs] == [0, 0], errors
        assert (tmp_path / "builds").read_text() == "0\n"  # rank 0, once, on the first start
        rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
        assert rank0 == rank1 and rank0["arrow"] and rank0["stats"]["rows"] == 40
    expected = build_lists(data, tok)
    assert rank0["train"] == expected.train and rank0["eval"] == expected.eval


# ------------------------------------------------------------------------------ CSV / TSV

def write_table(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("ext,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_read_like_jsonl(tok, tmp_path, ext, delimiter):
    rows = [GOOD, {"question": 'She said "two, please"\tthen left.', "answer": "#### 2"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:1])
    (tmp_path / "t").mkdir()
    write_table(tmp_path / "t" / f"train{ext}", rows, delimiter)
    write_table(tmp_path / "t" / f"test{ext}", rows[:1], delimiter)
    want = build_lists(DataArgs(task="gsm8k", path=str(tmp_path / "train.jsonl")), tok)
    got = build_task(DataArgs(task="gsm8k", path=str(tmp_path / "t")), tok)
    assert list(got.train) == want.train and got.eval == want.eval
    alpaca = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
              {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    write_table(tmp_path / f"alpaca{ext}", alpaca, delimiter)
    write_jsonl(tmp_path / "alpaca.jsonl", alpaca)
    a = build_task(DataArgs(task="instruct", path=str(tmp_path / f"alpaca{ext}")), tok)
    b = build_task(DataArgs(task="instruct", path=str(tmp_path / "alpaca.jsonl")), tok)
    assert list(a.train) == list(b.train) and a.eval == b.eval


def test_csv_errors_name_file_row_and_line(tok, tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [GOOD])
    path = tmp_path / "train.csv"
    data = DataArgs(task="gsm8k", path=str(path), eval_path=str(tmp_path / "test.jsonl"))
    cases = [
        ('question,answer\nq,#### 1\nq2\n', (r"train\.csv row 2 \(line 3\): 1 fields, "
                                            r"expected 2 \(the header has: question, answer\)")),
        ('question,answer\n"q\nover two lines",#### 1\n\nq,a,b\n',  # quoted newline, blank line
         r"train\.csv row 2 \(line 5\): 3 fields, expected 2"),
        ('question\nq\nq2\n', (r"train\.csv row 1 \(line 2\): missing field 'answer' \(the "
                               r"row has: question\)")),
        ('question,answer\nq,#### 1\n"q2,#### 2\nq3,#### 3\n',
         r"train\.csv line 3: malformed CSV \(unexpected end of data\)"),
        ('question,answer\nq,#### 1\n"q2"x,#### 2\n', r"train\.csv line 3: malformed CSV"),
        ('question,answer\n', r"train\.csv: the dataset is empty"),
        ('', r"train\.csv: the dataset is empty \(no header row\)"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            build_task(data, tok)
    path.write_bytes(b"question,answer\nq,#### 1\ncaf\xe9,#### 2\n")
    with pytest.raises(UserError, match=r"train\.csv line 3: not UTF-8 text \(byte 0xe9 at "
                                        r"column 4\)"):
        build_task(data, tok)
    path.write_bytes(b"question,answer\nq,#### 1\n\x00\x01,#### 2\n")
    with pytest.raises(UserError, match=r"train\.csv line 3: binary data"):
        build_task(data, tok)


def test_the_tests_never_touch_the_users_home():
    """tests/conftest.py points HOME, the XDG folders, the Hugging Face caches and the task
    cache into one temporary folder at import, before anything reads them (and so does every
    child and subprocess of a test)."""
    from huggingface_hub import constants

    from conftest import HOME

    home = Path(HOME)
    assert Path.home() == home and home.name.startswith("pace_llm-tests-home-")
    del os.environ["PACE_LLM_CACHE"]  # this module's fixture set its own: the default here
    assert cache.cache_root(DataArgs()).is_relative_to(home)
    for path in (constants.HF_HOME, constants.HF_HUB_CACHE, os.environ["XDG_CACHE_HOME"],
                 os.environ["MPLCONFIGDIR"]):
        assert Path(path).is_relative_to(home), path
