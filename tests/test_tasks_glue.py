"""GLUE task: exact metrics, the real CoLA / SST-2 / MRPC files, pairs, labels, bad data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, data_lines

from pace_llm.schema import DataArgs
from pace_llm.errors import UserError
from pace_llm.data.build import build_task
from pace_llm.tasks.glue import (accuracy, f1_binary, glue_metric, matthews, pearson, ranks,
                                 read_tsv, spearman)
from pace_llm.tinymodel import tokenizer_from_sentencepiece

SPM = DATA / "tokenizers" / "llama2c_tinystories_bpe512_bytefallback.model"
GLUE = DATA / "glue"  # samples of the real files (tests/fixtures/SOURCES.md)
COLA, SST2 = GLUE / "CoLA", GLUE / "SST-2"


def labels_in(path: Path, header: bool) -> list[int]:
    """The 0/1 label column of a CoLA (column 2, no header) or SST-2 (column 2, header) file."""
    return [int(line.split("\t")[1]) for line in data_lines(path, header)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer_from_sentencepiece(SPM, tmp_path_factory.mktemp("tok"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ metrics

def test_binary_metrics_by_hand():
    preds = [1, 1, 0, 0, 1, 0, 1, 1]
    labels = [1, 0, 0, 0, 1, 1, 1, 0]
    # tp = 3, tn = 2, fp = 2, fn = 1
    assert accuracy(preds, labels) == 5 / 8
    assert f1_binary(preds, labels) == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert matthews(preds, labels) == pytest.approx((3 * 2 - 2 * 1) / (5 * 4 * 4 * 3) ** 0.5)
    assert matthews([1, 1, 1], [1, 0, 1]) == 0.0  # an empty margin: defined as 0
    assert f1_binary([0, 0], [0, 0]) == 0.0
    assert matthews([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)


def test_correlations_match_references():
    r = random.Random(0)
    x = [r.uniform(0, 5) for _ in range(200)]
    y = [v + r.gauss(0, 1) for v in x]
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    # no ties: Spearman = 1 - 6 sum d^2 / (n (n^2 - 1))
    d2 = sum((a - b) ** 2 for a, b in zip(ranks(x), ranks(y)))
    assert spearman(x, y) == pytest.approx(1 - 6 * d2 / (200 * (200 ** 2 - 1)), abs=1e-12)
    # ties get average ranks; value by hand (= scipy.stats.spearmanr)
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / 22.5 ** 0.5, abs=1e-12)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / (2 * 114 / 9) ** 0.5)  # by hand


def test_metric_keys_per_task():
    preds, labels = [1, 0, 1, 1], [1, 0, 0, 1]
    # tp = 2, tn = 1, fp = 1, fn = 0
    assert glue_metric("cola")(preds, labels) == {
        "matthews": pytest.approx((2 * 1 - 1 * 0) / (3 * 2 * 2 * 1) ** 0.5), "accuracy": 0.75}
    assert glue_metric("mrpc")(preds, labels) == {"accuracy": 0.75, "f1": 0.8}
    assert glue_metric("rte")(preds, labels) == {"accuracy": 0.75}
    stsb = glue_metric("stsb")([1.0, 2.0, 3.0], [2.0, 4.0, 7.0])
    assert stsb == {"pearson": pytest.approx(0.9933992677987828),
                    "spearman": pytest.approx(1.0)}


# ------------------------------------------------------------------------------ real files

def test_real_file_row_counts():
    for name in ("in_domain_train.tsv", "in_domain_dev.tsv", "out_of_domain_dev.tsv"):
        assert len(read_tsv(COLA / name, "cola").items) == len(data_lines(COLA / name)), name
    for name in ("alps_train.tsv", "alps_dev.tsv", "alps_test.tsv"):
        assert len(read_tsv(SST2 / name, "sst2").items) == len(data_lines(SST2 / name, True)), name
    mrpc = read_tsv(GLUE / "MRPC-sample" / "train.tsv", "mrpc")
    assert len(mrpc.items) == 6 and mrpc.items[0][1]["label"] == "1"
    assert mrpc.items[0][1]["sentence2"].startswith('" The foodservice pie')  # no quoting


def test_cola_release_directory(tok):
    task = build_task(DataArgs(task="glue", glue_task="cola", path=str(COLA),
                               max_length=512), tok)
    train = labels_in(COLA / "in_domain_train.tsv", False)
    dev = labels_in(COLA / "in_domain_dev.tsv", False) + labels_in(
        COLA / "out_of_domain_dev.tsv", False)  # = GLUE dev
    assert task.kind == "seq_cls" and task.num_labels == 2 and task.name == "glue/cola"
    assert task.stats["rows"] == len(train) and task.stats["eval_rows"] == len(dev)
    assert sum(e["label"] for e in task.train) == sum(train)  # acceptable sentences
    assert sum(e["label"] for e in task.eval) == sum(dev)
    first = task.train[0]
    assert first["input_ids"] == tok("Our friends won't buy this analysis, let alone the next "
                                     "one we propose.")["input_ids"]
    assert task.main_metric == "matthews"


def test_sst2_alps_directory_is_glue(tok):
    task = build_task(DataArgs(task="glue", glue_task="sst2", path=str(SST2),
                               limit=100), tok)
    dev = labels_in(SST2 / "alps_test.tsv", True)  # GLUE's SST-2 dev
    assert task.stats["rows"] == 100 and task.stats["eval_rows"] == len(dev)
    assert sum(e["label"] for e in task.eval) == sum(dev)
    assert task.eval[0]["input_ids"] == tok("it 's a charming and often affecting journey . ")[
        "input_ids"]


def test_sst2_single_files(tok):
    task = build_task(DataArgs(task="glue", glue_task="sst2",
                               path=str(SST2 / "alps_dev.tsv"),
                               eval_path=str(SST2 / "alps_test.tsv")), tok)
    assert task.stats["rows"] == len(data_lines(SST2 / "alps_dev.tsv", header=True))
    assert task.stats["eval_rows"] == len(data_lines(SST2 / "alps_test.tsv", header=True))


def test_pairs_tokenized_as_pairs(tok):
    task = build_task(DataArgs(task="glue", glue_task="mrpc",
                               path=str(GLUE / "MRPC-sample" / "train.tsv"),
                               eval_path=str(GLUE / "MRPC-sample" / "train.tsv")), tok)
    rows = (GLUE / "MRPC-sample" / "train.tsv").read_text().splitlines()[1:]
    first = rows[0].split("\t")
    assert task.train[0]["input_ids"] == tok(first[3], first[4])["input_ids"]
    assert [e["label"] for e in task.train] == [int(r.split("\t")[0]) for r in rows]


# ------------------------------------------------------------------------------ formats, labels

MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
               "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")


def mnli_row(i: int, label: str) -> str:
    fields = [str(i), "1", "1", "fiction", "(x)", "(y)", "(x)", "(y)", f"A man sleeps {i}.",
              "A person rests.", label, label]
    return "\t".join(fields) + "\n"


def test_mnli_tsv_directory_with_mismatched(tok, tmp_path):
    write(tmp_path / "train.tsv", MNLI_HEADER + mnli_row(0, "neutral")
          + mnli_row(1, "contradiction"))
    write(tmp_path / "dev_matched.tsv", MNLI_HEADER + mnli_row(2, "entailment"))
    write(tmp_path / "dev_mismatched.tsv", MNLI_HEADER + mnli_row(3, "contradiction")
          + mnli_row(4, "neutral"))
    task = build_task(DataArgs(task="glue", glue_task="mnli", path=str(tmp_path)), tok)
    assert task.num_labels == 3
    assert [e["label"] for e in task.train] == [1, 2]
    assert [e["label"] for e in task.eval] == [0]
    assert [e["label"] for e in task.extra_eval["mismatched"]] == [2, 1]
    assert task.train[0]["input_ids"] == tok("A man sleeps 0.", "A person rests.")["input_ids"]


def test_hub_columns_in_jsonl_and_stsb_regression(tok, tmp_path):
    rows = [{"sentence1": "A cat sits.", "sentence2": "A cat is sitting.", "label": 4.6},
            {"sentence1": "A dog runs.", "sentence2": "The sky is blue.", "label": 0.2}]
    write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write(tmp_path / "validation.jsonl", json.dumps(rows[0]) + "\n")
    task = build_task(DataArgs(task="glue", glue_task="stsb", path=str(tmp_path)), tok)
    assert task.num_labels == 1 and [e["label"] for e in task.train] == [4.6, 0.2]
    assert task.main_metric == "pearson"
    rows[1]["label"] = 7.0
    write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"train\.jsonl row 2: label 7\.0 is not a similarity "
                                        r"score in \[0, 5\]"):
        build_task(DataArgs(task="glue", glue_task="stsb", path=str(tmp_path)), tok)


def test_label_outside_set_names_file_and_row(tok, tmp_path):
    bad = write(tmp_path / "train.tsv", "sentence\tlabel\ngood movie\t1\nbad movie\t0\nmeh\t2\n")
    write(tmp_path / "dev.tsv", "sentence\tlabel\nfine\t1\n")
    with pytest.raises(UserError, match=rf"{bad} row 3 \(line 4\): label '2' is outside the "
                                        r"label set \{0, 1\}"):
        build_task(DataArgs(task="glue", glue_task="sst2", path=str(tmp_path)), tok)
    write(tmp_path / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    write(tmp_path / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(UserError, match=r"row 1 \(line 2\): label 'maybe' is outside the label "
                                        r"set \{entailment, not_entailment"):
        build_task(DataArgs(task="glue", glue_task="rte", path=str(tmp_path)), tok)
    rows = [{"premise": "p", "hypothesis": "h", "label": -1}]
    write(tmp_path / "x.jsonl", json.dumps(rows[0]) + "\n")
    with pytest.raises(UserError, match=r"x\.jsonl row 1: label -1 is outside .*unlabelled test"):
        build_task(DataArgs(task="glue", glue_task="mnli", path=str(tmp_path / "x.jsonl"),
                            eval_path=str(tmp_path / "x.jsonl")), tok)


def test_bad_glue_files(tok, tmp_path):
    with pytest.raises(UserError, match=r"data file '.*/missing\.tsv' does not exist"):
        build_task(DataArgs(task="glue", glue_task="sst2", path=str(tmp_path / "missing.tsv"),
                            eval_path=str(tmp_path / "missing.tsv")), tok)
    header_only = write(tmp_path / "train.tsv", "sentence\tlabel\n")
    write(tmp_path / "dev.tsv", "sentence\tlabel\nfine\t1\n")
    with pytest.raises(UserError, match=rf"{header_only}: the dataset is empty"):
        build_task(DataArgs(task="glue", glue_task="sst2", path=str(tmp_path)), tok)
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t1\nno tab here\n")
    with pytest.raises(UserError, match=r"train\.tsv row 2 \(line 3\): 1 tab-separated fields, "
                                        r"expected 2"):
        build_task(DataArgs(task="glue", glue_task="sst2", path=str(tmp_path)), tok)
    write(tmp_path / "train.tsv", "text\ty\ngood\t1\n")
    with pytest.raises(UserError, match=r"lacks the sst2 columns 'sentence', 'label'"):
        build_task(DataArgs(task="glue", glue_task="sst2", path=str(tmp_path)), tok)
    write(tmp_path / "t.jsonl", json.dumps({"sentence1": "a", "label": 1}) + "\n")
    with pytest.raises(UserError, match=r"t\.jsonl row 1: missing field 'sentence2'"):
        build_task(DataArgs(task="glue", glue_task="mrpc", path=str(tmp_path / "t.jsonl"),
                            eval_path=str(tmp_path / "t.jsonl")), tok)


def test_length_policy_for_classification(tok, tmp_path):
    long = "word " * 50
    write(tmp_path / "train.tsv", f"sentence\tlabel\nshort\t1\n{long}\t0\n")
    write(tmp_path / "dev.tsv", f"sentence\tlabel\n{long}\t1\n")
    args = {"task": "glue", "glue_task": "sst2", "path": str(tmp_path), "max_length": 16}
    cut = build_task(DataArgs(**args, on_too_long="truncate"), tok)
    assert (cut.stats["rows"], cut.stats["truncated"], cut.stats["dropped"]) == (2, 1, 0)
    assert [len(e["input_ids"]) for e in cut.train][1] == 16
    assert len(cut.eval[0]["input_ids"]) == 16  # eval is truncated, never dropped
    dropped = build_task(DataArgs(**args, on_too_long="drop"), tok)
    assert (dropped.stats["rows"], dropped.stats["dropped"]) == (1, 1)
    assert len(dropped.eval) == 1
    with pytest.raises(UserError, match=r"train\.tsv row 2 \(line 3\): \d+ tokens, longer than "
                                        r"data\.max_length=16"):
        build_task(DataArgs(**args, on_too_long="error"), tok)
    write(tmp_path / "train.tsv", f"sentence\tlabel\n{long}\t0\n")
    with pytest.raises(UserError, match="every example \\(1\\) is longer than"):
        build_task(DataArgs(**args, on_too_long="drop"), tok)
