"""The GPU suite of issue #14: one command, one GPU, under 8 minutes, everything in one folder.

    python3 bench/gpu_suite.py --out $OUT             # on the H200 (budget 7.5 min)
    python bench/gpu_suite.py --dry-run --out DIR     # on a CPU: every stage at a tiny shape

On the device tool: ``run(command="PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py --out $OUT",
carry=["bench/wheels"], timeout_s=540)`` after ``bash bench/prepare_wheels.sh`` here.

Stages (each one's failure is recorded in the summary and the suite goes on):
  packages    what the interpreter has; wheels from ``--wheels`` (bench/prepare_wheels.sh) go
              into a private folder (pip --no-index --no-deps --target) put first on the
              children's PYTHONPATH: a wheel whose package is missing, or (transformers, peft,
              deepspeed, datasets, jsonargparse: the versions the project is tested with) of
              another version, or (their dependencies) older. torch is the image's, never carried.
  data        synthetic GSM8K-format problems (bench/suite_data.py; ``--data``: a local file).
  counter     bench/launch_count.py at bf16 ZeRO-0, pace_llm off/full vs PEFT + Trainer: a CPU
              measurement, run in the background from the start on one thread (the GPU
              processes use other cores); its report is counter.md.
  prepare     bench/suite_worker.py prepare: versions, CUDA, the recipe fields of the optional
              axes, the tokenizer and the random-init Llama, a bf16 matmul rate.
  throughput  one fresh process per (contender, micro-batch, axis value, repeat), run one at a
              time: bench/throughput.py's pace_llm off/full/lazy and PEFT + Trainer contenders,
              bf16, ZeRO-0, micro-batch 16 and the GPU-bound 64 (lazy: 16 only), each process
              measuring windows of steps with the SDPA cuDNN backend on and off (on/off/off/on);
              ``data.pad_to_multiple_of`` 8 and 64 (pace_llm off and PEFT, micro 16) and
              ``train.compile`` (pace_llm off, micro 16) only where the recipe has the field.
              Repeat 1 of every job first, then repeat 2 in reverse order; a job starts only if
              its estimate (its own first repeat, else the slowest finished job of its shape)
              fits in what is left of ``--budget-min``; the next process imports its libraries
              while the current one measures and touches the GPU only after it has exited.
Files in ``--out`` (flat, 5, as the device tool brings back at most 8): summary.json,
summary.md, windows.jsonl (every process's step records), counter.md, logs.tar.gz.

Modules: suite_env.py (packages), suite_data.py (data), suite_worker.py (the worker processes),
suite_jobs.py (the job plan, the budget, the loop), suite_report.py (figures, ratios, markdown).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import suite_data  # noqa: E402
import suite_report as R  # noqa: E402
import throughput as TP  # noqa: E402
from suite_env import ensure_packages  # noqa: E402
from suite_jobs import (StageError, finish, launch, plan_jobs, run_jobs, spawn,  # noqa: E402
                        stop_all, tail)


# --------------------------------------------------------------------------- stages
def start_counter(a, data: str, work: Path, env: dict, deadline: float) -> subprocess.Popen:
    args = [str(BENCH / "launch_count.py"), "--dtypes", "bf16", "--zero", "0", "--contenders",
            a.counter_contenders, "--data", data, "--workdir", str(work / "counter"),
            "--timeout", str(int(deadline - time.monotonic()))]
    args += ["--dry-run"] if a.dry_run else []
    args += ["--forced-failure"] if "counter" in a.fail else []  # argparse refuses it: rc 2
    return spawn(args, work / "counter.md", env | {"OMP_NUM_THREADS": "1"})


def collect_counter(p, work: Path, deadline: float, s: dict) -> None:
    rc = finish(p, deadline - time.monotonic())
    rows = []
    for f in sorted((work / "counter").glob("result_*.json")):
        r = json.loads(f.read_text())
        rows.append({"config": f.stem[len("result_"):], "total": r["total"],
                     "total_syncs": r["total_syncs"], "launches": r["launches"],
                     "syncs": r["syncs"]})
    s["counter"] = {"status": "ok" if rc == 0 else f"failed (rc {rc})", "rows": rows}
    if rc:
        why = "stopped at the budget" if rc == 124 else f"rc {rc}"
        s["errors"].append({"stage": "counter", "message": why,
                            "log_tail": tail(work / "counter.md")})


def run_prepare(a, cfg: dict, work: Path, env: dict, deadline: float) -> dict:
    (work / "prepare_config.json").write_text(json.dumps(cfg))
    out = work / "prepare.json"
    p = spawn([str(BENCH / "suite_worker.py"), "prepare", str(work / "prepare_config.json"),
               str(out)], work / "logs" / "prepare.log", env)
    rc = finish(p, min(300, deadline - time.monotonic()))
    info = json.loads(out.read_text()) if out.is_file() else {}
    if rc or "base" not in info:
        raise StageError(f"prepare failed (rc {rc}): " + tail(work / "logs" / "prepare.log", 600))
    return info


# --------------------------------------------------------------------------- main
def settings(a: argparse.Namespace) -> dict:
    """The model shape and step counts: the 1B shape on a GPU, a tiny one for --dry-run."""
    if a.dry_run:
        shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128, vocab_size=1024)
        return {"shape": shape, "micro": {"16": 2, "64": 4}, "limit": a.limit or 200,
                "tokenizer_vocab": 1000}
    shape = dict(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                 num_key_value_heads=a.kv_heads, intermediate_size=a.intermediate,
                 vocab_size=a.vocab)
    return {"shape": shape, "micro": {"16": 16, "64": 64}, "limit": a.limit or 4000,
            "tokenizer_vocab": 8000}


def run_suite(a, s: dict, work: Path, deadline: float) -> None:
    info = s["environment"]
    try:
        ensure_packages(a, work, info, min(240.0, deadline - time.monotonic()))
    except Exception as exc:  # recorded; the stages below say what it costs
        s["errors"].append({"stage": "packages", "message": f"{type(exc).__name__}: {exc}"})
    env = os.environ | {"PYTHONPATH": os.pathsep.join(
        p for p in [os.environ.get("PYTHONPATH", ""), str(REPO)] if p),
        "OMP_NUM_THREADS": str(a.threads), "PACE_LLM_CACHE": str(work / "cache"),
        "PACE_BENCH_DEVICE": "cpu" if a.dry_run else "cuda", "TOKENIZERS_PARALLELISM": "false"}
    if a.dry_run:
        env |= {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    st = settings(a)
    data = (TP.data_path(a.data) if a.data
            else str(suite_data.write(work / "data", st["limit"], seed=0)))
    build = {"model_type": "llama", **st["shape"], "max_position_embeddings": 2048,
             "tie_word_embeddings": False}
    counts = R.param_counts(build)
    sh = st["shape"]
    s["model"] = {"build": build, "counts": counts, "data": data, "shape_text": (
        f"hidden {sh['hidden_size']}, {sh['num_hidden_layers']} layers, "
        f"{sh['num_attention_heads']} heads / {sh['num_key_value_heads']} KV heads, "
        f"intermediate {sh['intermediate_size']}, vocabulary {sh['vocab_size']}, untied lm_head")}
    counter = None
    if a.counter != "off":
        counter = start_counter(a, data, work, env, deadline)
        s["notes"].append("the counter (CPU, one thread) ran alongside the GPU processes")
    base = {"data": data, "limit": st["limit"], "build": build, "base": str(work / "base"),
            "tokenizer_vocab": st["tokenizer_vocab"], "max_length": a.max_length, "lr": 2e-4,
            "dtype": "bf16", "ds": "zero0.json"}
    contenders, shapes = a.contenders.split(","), a.shapes.split(",")
    early: dict[str, subprocess.Popen] = {}  # the first job imports while prepare runs
    first = plan_jobs(contenders, shapes, st["micro"], [1], False, 1)
    if first and not a.no_prefetch:
        launch(a, first[0], base, work, env, {}, early)
    prepared = None
    try:
        prepared = run_prepare(a, base, work, env, deadline)
        info.update({k: v for k, v in prepared.items() if k != "base"})
        s["model"]["parameters"] = prepared["base"]["parameters"]
        s["model"]["base"] = prepared["base"]
        if not a.dry_run and not prepared.get("cuda"):
            raise StageError("no CUDA device visible to torch: the throughput stage needs one")
    except Exception as exc:  # recorded; no throughput without a base and a GPU
        s["errors"].append({"stage": "prepare", "message": f"{type(exc).__name__}: {exc}"})
        prepared = None
    b = (prepared or {}).get("base", {})
    s["model"]["data_text"] = (
        f"{'synthetic GSM8K-format problems (bench/suite_data.py)' if not a.data else data}, "
        f"{st['limit']} rows, {b.get('mean_tokens', float('nan')):.0f} tokens on average "
        f"({b.get('min_tokens')}-{b.get('max_tokens')}, {b.get('distinct_lengths')} lengths), "
        f"tokenizer {b.get('tokenizer_pieces')} pieces")
    fields = (prepared or {}).get("fields", {})
    pads = [int(m) for m in a.pads.split(",")] if fields.get("data.pad_to_multiple_of") else [1]
    s["axes"] = {"cuDNN SDPA": "on/off windows in every process",
                 "data.pad_to_multiple_of": f"{a.pads} (pace_llm off and PEFT, micro 16)" if len(
                     pads) > 1 else "skipped: the recipe has no data.pad_to_multiple_of"
                 if not fields.get("data.pad_to_multiple_of") else f"{a.pads} only (--pads)",
                 "train.compile": "pace_llm off, micro 16" if fields.get("train.compile")
                 else "skipped: the recipe has no train.compile"}
    for k, v in s["axes"].items():
        if v.startswith("skipped"):
            print(f"note: {k} {v}", flush=True)
    jobs = plan_jobs(contenders, shapes, st["micro"], pads, bool(fields.get("train.compile")),
                     a.repeats)
    if prepared:
        run_jobs(a, jobs, base, work, env, deadline, fields, counts, s, early)
    else:
        s["skipped"] += [{"stage": "throughput", "job": j.tag, "message": "prepare failed"}
                         for j in jobs]
    if counter is not None:
        collect_counter(counter, work, deadline, s)
    s["table"] = R.table(s["runs"])
    s["ratios"] = R.ratios(s["table"])
    complete = [r for r in range(1, a.repeats + 1) if not any(
        x.get("job", "").endswith(f"-r{r}") for x in s["skipped"])]
    budget = [x for x in s["skipped"] if x["message"].startswith("budget")]
    s["budget"] = {"repeats_planned": a.repeats, "repeats_complete": complete,
                   "skipped_for_budget": len(budget), "note": (
                       f"Repeats complete: {complete or 'none'} of {a.repeats}; "
                       + (f"{len(budget)} jobs not started: the budget ran low."
                          if budget else "no job was dropped for the budget."))}


def write_outputs(s: dict, out: Path, work: Path, t0: float) -> None:
    s["suite"]["elapsed_s"] = time.monotonic() - t0
    s.pop("_t0", None)
    (out / "summary.json").write_text(json.dumps(s, indent=1, default=str))
    (out / "summary.md").write_text(R.render(s))
    for name in ("windows.jsonl", "counter.md"):
        if (work / name).is_file():
            (out / name).write_bytes((work / name).read_bytes())
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for f in sorted(work.rglob("*")):
            rel = f.relative_to(work)
            keep = rel.parts[0] in ("logs", "jobs", "counter") or rel.name == "prepare.json"
            if f.is_file() and keep and f.suffix in (".log", ".txt", ".json", ".yaml"):
                tar.add(f, arcname=str(rel))


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="the folder everything is written to")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 1 repeat")
    ap.add_argument("--budget-min", type=float, default=7.5, help="wall-clock budget, minutes")
    ap.add_argument("--data", help="a local GSM8K-format train.jsonl (default: synthetic)")
    ap.add_argument("--limit", type=int, help="rows (default 4000; dry run 200)")
    ap.add_argument("--repeats", type=int, help="processes per job (default 2; dry run 1)")
    ap.add_argument("--contenders", default="off,full,lazy,peft")
    ap.add_argument("--shapes", default="16,64", help="micro-batch roles: 16 and/or 64")
    ap.add_argument("--window-steps", default="5,4", help="steps per window at micro 16,64")
    ap.add_argument("--warmup", type=int, default=2, help="steps before the windows")
    ap.add_argument("--pads", default="1,8,64", help="data.pad_to_multiple_of values measured "
                    "(pace_llm off and PEFT, micro 16; every other job pads to 1)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000, help="model vocabulary rows")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU")
    ap.add_argument("--threads", type=int, default=4, help="OMP_NUM_THREADS of GPU processes")
    ap.add_argument("--job-timeout", type=float, default=150, help="seconds per process")
    ap.add_argument("--counter", choices=["parallel", "off"], default="parallel")
    ap.add_argument("--counter-contenders", default="off,full,peft")
    ap.add_argument("--wheels", default=str(BENCH / "wheels"))
    ap.add_argument("--keep-image-packages", action="store_true",
                    help="install carried wheels only for missing or older packages")
    ap.add_argument("--no-prefetch", action="store_true",
                    help="start each process only when the previous one has exited")
    ap.add_argument("--fail", default="", help="force failures (test): 'counter' and/or job "
                                               "keys such as peft-mb16")
    ap.add_argument("--workdir", help="scratch folder (default: a new one under /tmp)")
    a = ap.parse_args()
    a.fail = set(filter(None, a.fail.split(",")))
    a.repeats = a.repeats or (1 if a.dry_run else 2)
    steps = [int(x) for x in a.window_steps.split(",")]
    a.window_steps = {"16": 1, "64": 1} if a.dry_run else {"16": steps[0], "64": steps[-1]}
    return a


def main() -> None:
    a = parse()
    t0 = time.monotonic()
    deadline = t0 + a.budget_min * 60
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="pace_gpu_suite_"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the summary is still written
    s: dict = {"suite": {"command": "python bench/gpu_suite.py " + " ".join(sys.argv[1:]),
                         "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                             "%Y-%m-%d %H:%M UTC"), "dry_run": a.dry_run,
                         "budget_s": a.budget_min * 60, "workdir": str(work)},
               "environment": {}, "model": {"counts": {"n_6nt": 0}, "shape_text": "?",
                                            "data_text": "?"},
               "method": METHOD.format(w=a.warmup, n16=a.window_steps["16"],
                                       n64=a.window_steps["64"], peak=a.peak_tflops),
               "axes": {}, "runs": [], "table": [], "ratios": [], "errors": [], "skipped": [],
               "notes": [], "counter": {"status": "not run"}, "budget": {"note": ""},
               "_t0": t0}
    try:
        run_suite(a, s, work, deadline)
    except BaseException as exc:  # whatever stops the suite, the summary is written
        s["errors"].append({"stage": "suite", "message": f"{type(exc).__name__}: {exc}"})
    finally:
        stop_all()
        write_outputs(s, out, work, t0)
    print(R.render(s))
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")


METHOD = ("Each job is a fresh process: {w} warmup steps (cuDNN SDPA alternating on/off), then "
          "4 windows (cuDNN on/off/off/on) of {n16} steps at micro 16, {n64} at micro 64, no "
          "logging step; a step ends with torch.cuda.synchronize(). tokens/s = non-padding "
          "tokens / window wall time; mean step = wall / steps; median = of the step "
          "durations; peak GPU MB = the CUDA allocator's peak in the windows. MFU 6NT = 6·N·T / "
          "time / {peak:.0f} TFLOP/s, T = non-padding tokens × views (2 on PACE-paired steps); "
          "MFU useful = bench/throughput.py's count (frozen base: no weight gradients; lm_head "
          "at supervised positions only) over the same peak.")


if __name__ == "__main__":
    main()
