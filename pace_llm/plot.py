"""The curves PNG of a run: task and consistency loss, adapter grad norm, the output gradient,
eval metric and FP-distance, and the held-out loss against the step (the curves users compare
between pace.mode off and full; the eval loss moves while a task metric is still 0). The PNG's
Description text names its panels."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, eval records) of a metrics.jsonl."""
    train, evals = [], []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if "eval" in rec:
            evals.append(rec)
        elif "task_loss" in rec:
            train.append(rec)
    return train, evals


def plot_metrics(metrics_file: Path, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics_file)
    fig, axes = plt.subplots(1, 6, figsize=(26, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["task_loss"] for r in train], label="task loss")
    axes[0].set_title("task loss")
    axes[1].plot(steps, [r["consistency_loss"] for r in train], color="tab:orange")
    axes[1].set_title("consistency loss")
    axes[2].plot(steps, [r["grad_norm"] or 0.0 for r in train], color="tab:green",
                 label="training (noisy total loss)")
    clean = [(r["step"], r["clean_grad_norm"]) for r in train if r.get("clean_grad_norm")]
    if clean:
        axes[2].plot(*zip(*clean), color="tab:olive", label="task loss, no noise")
    axes[2].set_title("adapter grad norm")
    axes[2].legend(fontsize=7)
    e_steps = [r["step"] for r in evals]
    out_grad = [(r["step"], r["eval"]["output_grad_norm"]) for r in evals
                if r["eval"].get("output_grad_norm") is not None]
    if out_grad:
        axes[3].plot(*zip(*out_grad), "o-", color="tab:brown")
    axes[3].set_title("output gradient ‖∂f/∂θ_adapter‖/√K (eval)")
    axes[4].plot(e_steps, [r["eval"]["fp_distance"] for r in evals], "o-", color="tab:red",
                 label="FP-distance")
    axes[4].set_title("eval: FP-distance (circles), metric (squares)")
    metric = [r["eval"].get("metric") for r in evals]
    if any(m is not None for m in metric):
        ax = axes[4].twinx()
        ax.plot(e_steps, [m if m is not None else float("nan") for m in metric], "s--",
                color="tab:purple", label="metric")
        ax.set_ylabel("metric")
    eval_loss = [(r["step"], r["eval"]["eval_loss"]) for r in evals
                  if r["eval"].get("eval_loss") is not None]
    if eval_loss:
        axes[5].plot(*zip(*eval_loss), "o-", color="tab:blue")
    axes[5].set_title("eval loss (held-out answers)")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    panels = " | ".join(ax.get_title() for ax in axes)
    fig.savefig(png, dpi=80, metadata={"Description": f"pace_llm curves: {panels}"})
    plt.close(fig)
    return png
