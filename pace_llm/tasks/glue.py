"""GLUE: the eight tasks as sequence classification (STS-B as regression), with exact metrics.

Sources: the hub (``nyu-mll/glue``, config = the task; eval split ``validation``, MNLI
``validation_matched`` plus ``validation_mismatched`` in ``extra_eval``), local jsonl/json/
parquet files with the hub's columns, or local GLUE-format TSV files. A TSV directory may use
the GLUE layout (``train.tsv`` / ``dev.tsv``, MNLI ``dev_matched.tsv`` / ``dev_mismatched.tsv``),
the CoLA release layout (``in_domain_train.tsv``; eval = ``in_domain_dev.tsv`` +
``out_of_domain_dev.tsv``, which together are GLUE's CoLA dev) or the alps SST-2 layout
(``alps_train.tsv`` + ``alps_dev.tsv`` = GLUE train; ``alps_test.tsv`` = GLUE dev). TSV labels
are mapped to the hub's ids (MNLI: entailment 0, neutral 1, contradiction 2; QNLI/RTE:
entailment 0, not_entailment 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pace_llm.data.length import LengthPolicy
from pace_llm.data.sources import (LOCAL_EXTS, Rows, load_splits, looks_like_path, read_hub,
                                   read_local)
from pace_llm.data.spec import Splits, TaskSpec
from pace_llm.errors import UserError, read_text

if TYPE_CHECKING:
    from pace_llm.schema import DataArgs


@dataclass(frozen=True)
class GlueSpec:
    """Where a GLUE task's text and label live, and how its labels read."""

    text: tuple[str, ...]
    """Hub / jsonl column names of the one or two input sentences."""
    tsv_text: tuple[str, ...]
    """The same columns' names in the GLUE TSV header."""
    tsv_label: str
    labels: tuple[str, ...] | None
    """TSV label strings in id order; None = a float score (STS-B)."""
    metric: str
    eval_split: str = "validation"


SPECS: dict[str, GlueSpec] = {
    "cola": GlueSpec(("sentence",), ("sentence",), "label", ("0", "1"), "matthews"),
    "sst2": GlueSpec(("sentence",), ("sentence",), "label", ("0", "1"), "accuracy"),
    "mrpc": GlueSpec(("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
                     ("0", "1"), "accuracy_f1"),
    "qqp": GlueSpec(("question1", "question2"), ("question1", "question2"), "is_duplicate",
                    ("0", "1"), "accuracy_f1"),
    "stsb": GlueSpec(("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", None,
                     "correlation"),
    "mnli": GlueSpec(("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
                     ("entailment", "neutral", "contradiction"), "accuracy",
                     "validation_matched"),
    "qnli": GlueSpec(("question", "sentence"), ("question", "sentence"), "label",
                     ("entailment", "not_entailment"), "accuracy"),
    "rte": GlueSpec(("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                    ("entailment", "not_entailment"), "accuracy"),
}

GLUE_TASKS = tuple(SPECS)
"""The GLUE task names ``data.glue_task`` accepts."""

# TSV directory layouts: (train files, eval files); the first whose train files exist wins.
TSV_LAYOUTS = (
    (("train.tsv",), ("dev.tsv",)),
    (("train.tsv",), ("dev_matched.tsv",)),
    (("in_domain_train.tsv",), ("in_domain_dev.tsv", "out_of_domain_dev.tsv")),
    (("alps_train.tsv", "alps_dev.tsv"), ("alps_test.tsv",)),
)
COLA_RAW_COLUMNS = 4  # CoLA release / GLUE CoLA train+dev: source, label, author mark, sentence


# --------------------------------------------------------------------------------------------
# Metrics (exact, no sklearn): predictions are argmax ids, or floats for STS-B.
# --------------------------------------------------------------------------------------------

def _check(predictions: list, labels: list) -> None:
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"metric needs equal, non-empty lists; got {len(predictions)} "
                         f"predictions and {len(labels)} labels")


def accuracy(predictions: list[int], labels: list[int]) -> float:
    _check(predictions, labels)
    return sum(int(p) == int(y) for p, y in zip(predictions, labels)) / len(labels)


def _confusion(predictions: list[int], labels: list[int]) -> tuple[int, int, int, int]:
    tp = sum(int(p) == 1 and int(y) == 1 for p, y in zip(predictions, labels))
    tn = sum(int(p) == 0 and int(y) == 0 for p, y in zip(predictions, labels))
    fp = sum(int(p) == 1 and int(y) == 0 for p, y in zip(predictions, labels))
    fn = sum(int(p) == 0 and int(y) == 1 for p, y in zip(predictions, labels))
    return tp, tn, fp, fn


def f1_binary(predictions: list[int], labels: list[int]) -> float:
    """F1 of the positive class (1); 0 when there is no true or predicted positive."""
    _check(predictions, labels)
    tp, _, fp, fn = _confusion(predictions, labels)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(predictions: list[int], labels: list[int]) -> float:
    """Matthews correlation (tp·tn − fp·fn) / sqrt(...); 0 when a margin is empty."""
    _check(predictions, labels)
    tp, tn, fp, fn = _confusion(predictions, labels)
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def pearson(x: list[float], y: list[float]) -> float:
    _check(x, y)
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else 0.0


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties getting the mean of their positions (as scipy.stats.rankdata)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    return pearson(ranks(x), ranks(y))


def glue_metric(task: str):
    """The metric function of a GLUE task: (predictions, labels) -> {name: value}."""
    kind = SPECS[task].metric

    def metric(predictions: list, labels: list) -> dict[str, float]:
        if kind == "matthews":
            return {"matthews": matthews(predictions, labels),
                    "accuracy": accuracy(predictions, labels)}
        if kind == "correlation":
            p = [float(v) for v in predictions]
            y = [float(v) for v in labels]
            return {"pearson": pearson(p, y), "spearman": spearman(p, y)}
        if kind == "accuracy_f1":
            return {"accuracy": accuracy(predictions, labels), "f1": f1_binary(predictions, labels)}
        return {"accuracy": accuracy(predictions, labels)}

    return metric


MAIN_METRIC = {"matthews": "matthews", "correlation": "pearson", "accuracy_f1": "accuracy",
               "accuracy": "accuracy"}


# --------------------------------------------------------------------------------------------
# Reading: TSV files and directories, hub splits, labels.
# --------------------------------------------------------------------------------------------

def read_tsv(path: Path, task: str) -> Rows:
    """A GLUE TSV as rows keyed by the hub's column names plus ``label`` (still a string).

    No quoting (GLUE text contains stray quotes). A headerless 4-column file is read as the
    CoLA layout when the task is cola.
    """
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} does not exist")
    spec = SPECS[task]
    lines = read_text(path).split("\n")
    lines = [line.rstrip("\r") for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise UserError(f"{path}: the dataset is empty (no rows)")
    header = lines[0].split("\t")
    if spec.tsv_label in header and all(c in header for c in spec.tsv_text):
        columns = [header.index(c) for c in spec.tsv_text] + [header.index(spec.tsv_label)]
        rows, body = Rows(str(path), header_lines=1), lines[1:]
        width = len(header)
    elif task == "cola" and len(header) == COLA_RAW_COLUMNS:
        columns, rows, body, width = [3, 1], Rows(str(path)), lines, COLA_RAW_COLUMNS
    else:
        need = ", ".join(repr(c) for c in spec.tsv_text + (spec.tsv_label,))
        raise UserError(f"{path}: the header {header!r} lacks the {task} columns {need} (a GLUE "
                        f"{task} train/dev TSV has them; test files have no labels)")
    for n, line in enumerate(body, start=1):
        fields = line.split("\t")
        if len(fields) <= max(columns):
            raise UserError(f"{rows.where(n)}: {len(fields)} tab-separated fields, expected "
                            f"{width}")
        keys = spec.text + ("label",)
        rows.items.append((n, {k: fields[c] for k, c in zip(keys, columns)}))
    return rows


def _head(parts: list[Rows], limit: int | None) -> list[Rows]:
    """The first ``limit`` rows across several files."""
    out = []
    for part in parts:
        if limit is not None and limit <= 0:
            break
        out.append(part.head(limit))
        limit = None if limit is None else limit - len(out[-1].items)
    return out


def _reader(task: str):
    def read(path: Path) -> Rows:
        return read_tsv(path, task) if path.suffix.lower() == ".tsv" else read_local(path)
    return read


def _tsv_layout(local: Path) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The TSV layout of a directory: one whose train and eval files exist, else train only."""
    def have(files: tuple[str, ...]) -> bool:
        return all((local / f).is_file() for f in files)

    complete = [(t, e) for t, e in TSV_LAYOUTS if have(t) and have(e)]
    partial = [(t, e) for t, e in TSV_LAYOUTS if have(t)]
    return (complete or partial or [None])[0]


def load_glue(data: DataArgs, task: str
              ) -> tuple[list[Rows], list[Rows], dict[str, list[Rows]]]:
    """Train, eval and extra eval sets (MNLI mismatched) for a GLUE task, each a list of files
    whose rows are used in order (so errors can name the file)."""
    spec = SPECS[task]
    local = Path(data.path).expanduser()
    layout = _tsv_layout(local) if data.path and local.is_dir() else None
    if layout is not None:
        train_files, eval_files = layout
        train = [read_tsv(local / f, task) for f in train_files]
        extra = {}
        if data.eval_path:
            evals = [_reader(task)(Path(data.eval_path).expanduser())]
        elif all((local / f).is_file() for f in eval_files):
            evals = [read_tsv(local / f, task) for f in eval_files]
        else:
            raise UserError(f"data.path {data.path!r}: no eval file "
                            f"({', '.join(eval_files)}) found; set data.eval_path")
        if task == "mnli" and (local / "dev_mismatched.tsv").is_file():
            extra["mismatched"] = [read_tsv(local / "dev_mismatched.tsv", task)]
        return train, evals, extra
    config = data.hub_config or task
    train, evals = load_splits(data.path, data.eval_path, config, spec.eval_split, _reader(task),
                               eval_names=(spec.eval_split, "validation", "dev", "dev_matched"),
                               columns=data.columns, streaming=data.streaming)
    if evals is None:
        raise UserError(f"data.path {data.path!r}: no evaluation split found; set data.eval_path")
    extra = {}
    if task == "mnli" and not looks_like_path(data.path, LOCAL_EXTS) and data.eval_path is None:
        extra["mismatched"] = [read_hub(data.path, config, "validation_mismatched")]
    return [train], [evals], extra


def parse_label(rows: Rows, n: int, row: dict[str, Any], spec: GlueSpec) -> int | float:
    """The row's label as the hub's id (or float score); outside the label set -> UserError."""
    value = rows.get(n, row, "label", (str, int, float))
    if spec.labels is None:
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not 0.0 <= score <= 5.0:
            raise UserError(f"{rows.where(n)}: label {value!r} is not a similarity score in "
                            "[0, 5]")
        return score
    if isinstance(value, str) and value.strip() in spec.labels:
        return spec.labels.index(value.strip())
    if isinstance(value, int) and 0 <= value < len(spec.labels):
        return value
    allowed = ", ".join(spec.labels) + (f" (or ids 0..{len(spec.labels) - 1})"
                                        if not spec.labels[0].isdigit() else "")
    raise UserError(f"{rows.where(n)}: label {value!r} is outside the label set {{{allowed}}}"
                    + ("; -1 marks an unlabelled test split: evaluate on validation" if
                       value in (-1, "-1") else ""))


# --------------------------------------------------------------------------------------------
# Records and tokenization
# --------------------------------------------------------------------------------------------

def records(rows: Rows, spec: GlueSpec) -> Iterator[dict[str, Any]]:
    """Validated {where, <text columns>, label} records, label as the hub's id (or score)."""
    for n, row in rows.nonempty():
        yield {"where": rows.where(n), **{c: rows.get(n, row, c) for c in spec.text},
               "label": parse_label(rows, n, row, spec)}


@dataclass(frozen=True)
class Ctx:
    text: tuple[str, ...]
    max_length: int


def encode(tok: Any, ctx: Ctx, records: list[dict], policy: LengthPolicy | None
           ) -> list[dict | None]:
    """Tokenize (pairs as pairs); ``policy`` None = eval (too long is always truncated).
    One example per record, None where the policy drops it."""
    if not records:
        return []
    columns = [[r[c] for r in records] for c in ctx.text]
    encoded = tok(*columns, add_special_tokens=True)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    too_long = sorted(i for i, n in enumerate(lengths) if n > ctx.max_length)
    if policy is not None:
        for i in too_long:  # raises in error mode
            policy.too_long(lengths[i], records[i]["where"])
    if too_long and (policy is None or policy.mode == "truncate"):
        cut = tok(*[[c[i] for i in too_long] for c in columns], add_special_tokens=True,
                  truncation=True, max_length=ctx.max_length)["input_ids"]
        for i, ids in zip(too_long, cut):
            encoded[i] = ids
    out: list[dict | None] = []
    long = set(too_long)
    for i, (ids, record) in enumerate(zip(encoded, records)):
        if policy is not None and i in long and policy.mode == "drop":
            policy.drop_classification(lengths[i])
            out.append(None)
            continue
        if policy is not None:
            policy.keep_classification(len(ids), truncated=i in long)
        out.append({"input_ids": list(ids), "label": record["label"]})
    return out


def train_examples(tok: Any, ctx: Ctx, records: list[dict], policy: LengthPolicy
                   ) -> list[dict | None]:
    return encode(tok, ctx, records, policy)


def eval_examples(tok: Any, ctx: Ctx, records: list[dict]) -> list[dict]:
    return encode(tok, ctx, records, None)


def _read(data: DataArgs, task: str) -> Splits:
    spec = SPECS[task]
    train_parts, eval_parts, extra_parts = load_glue(data, task)

    def reader(parts: list[Rows]) -> Callable[[], list[dict]]:
        return lambda: [r for part in parts for r in records(part, spec)]

    return Splits(train=(r for part in _head(train_parts, data.limit) for r in records(part, spec)),
                  source=" + ".join(p.source for p in train_parts), eval=reader(eval_parts),
                  extra={name: reader(parts) for name, parts in extra_parts.items()})


def task_spec(data: DataArgs, tok: Any) -> TaskSpec:
    """A GLUE task (``data.glue_task``) as a seq_cls spec."""
    task = data.glue_task
    if task not in SPECS:
        raise UserError(f"data.glue_task: {task!r} is not allowed; expected one of "
                        f"{', '.join(SPECS)}")
    spec = SPECS[task]
    label = "float64" if spec.labels is None else "int64"
    return TaskSpec(kind="seq_cls", name=f"glue/{task}",
                    num_labels=1 if spec.labels is None else len(spec.labels),
                    metric=glue_metric(task), main_metric=MAIN_METRIC[spec.metric],
                    read=lambda: _read(data, task),
                    schema={"where": "string", **{c: "string" for c in spec.text}, "label": label},
                    train_fn=train_examples, eval_fn=eval_examples,
                    ctx=Ctx(spec.text, data.max_length), key={"glue_task": task},
                    label_dtype=label)


def texts(data: DataArgs) -> list[str]:
    """Training sentences (pairs joined by a newline) for training an offline tokenizer."""
    spec = SPECS[data.glue_task]
    train, _, _ = load_glue(data, data.glue_task)
    return ["\n".join(part.get(n, row, c) for c in spec.text)
            for part in _head(train, data.limit) for n, row in part.nonempty().items]
