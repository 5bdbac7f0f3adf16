"""Figures of bench/gpu_suite.py: per-window metrics from a worker's step records, the table over
repeats, issue #14's acceptance ratios, and the markdown summary.

Model FLOPs for MFU (stated in the summary):

    MFU (6NT)     = 6 · N · T / window wall time / peak
    N             = the parameters a token's forward multiplies by: the block linears (q, k, v,
                    o, gate, up, down), the LoRA adapters and the lm_head (embeddings, norms
                    and attention products not counted)
    T             = tokens through the trained forward + backward: the non-padding tokens of
                    the window's steps, times 2 on PACE-paired steps (the doubled batch)
    peak          = the GPU's dense bf16 datasheet peak (--peak-tflops, H200: 989 TFLOP/s)

6·N·T is the usual convention (forward 2N, backward 4N per token). A LoRA step does less: the
frozen weights get no weight gradient (4N per token for them) and pace_llm computes logits only
at supervised positions, so "MFU (useful)" also gives bench/throughput.py's useful-FLOP count
(its docstring): views · [T · (4·N_frozen + 6·N_adapter) + S · 4·H·V].
"""

from __future__ import annotations

import statistics
from typing import Any

import throughput as TP

TARGETS = {"off/PEFT tokens/s, micro 16": (">=", 1.3),
           "off mean/median step, micro 16": ("<=", 1.1),
           "full/off step time, micro 64": ("<=", 1.8)}


def param_counts(build: dict) -> dict[str, int]:
    c = TP.model_counts(build)
    lm_head = build["hidden_size"] * build["vocab_size"]
    return {"frozen_linear": c["frozen_linear"], "adapter": c["adapter"], "lm_head": lm_head,
            "embedding": lm_head, "hidden": c["hidden"], "vocab": build["vocab_size"],
            "n_6nt": c["frozen_linear"] + c["adapter"] + lm_head}


def window(steps: list[dict], lo: int, hi: int, counts: dict, peak_flops: float) -> dict:
    """Steps lo+1..hi (1-based), timed from the end of step lo."""
    part = steps[lo:hi]
    wall = part[-1]["end"] - steps[lo - 1]["end"]
    durations = [b["end"] - a["end"] for a, b in zip(steps[lo - 1:hi - 1], part)]
    tokens = sum(s["tokens"] for s in part)
    trained = sum(s["views"] * s["tokens"] for s in part)
    padded = sum(s["padded"] for s in part)
    per_tok = 4 * counts["frozen_linear"] + 6 * counts["adapter"]
    useful = sum(s["views"] * (s["tokens"] * per_tok
                               + s["supervised"] * 4 * counts["hidden"] * counts["vocab"])
                 for s in part)
    return {"steps": hi - lo, "wall_s": wall, "durations": durations, "tokens": tokens,
            "trained_tokens": trained, "padded": padded,
            "flops_6nt": 6 * counts["n_6nt"] * trained, "flops_useful": useful,
            "peak_flops": peak_flops}


def combine(windows: list[dict], peaks: list[float | None]) -> dict:
    """One cuDNN setting of one process: its windows pooled."""
    wall = sum(w["wall_s"] for w in windows)
    n = sum(w["steps"] for w in windows)
    durations = [d for w in windows for d in w["durations"]]
    tokens = sum(w["tokens"] for w in windows)
    padded = sum(w["padded"] for w in windows)
    peak = windows[0]["peak_flops"]
    mean, median = wall / n, statistics.median(durations)
    known = [p for p in peaks if p is not None]
    return {"tokens_per_s": tokens / wall, "mean_step_s": mean, "median_step_s": median,
            "mean_over_median": mean / median, "steps": n, "tokens": tokens,
            "padding_frac": 1 - tokens / padded if padded else 0.0,
            "mfu_6nt": sum(w["flops_6nt"] for w in windows) / wall / peak,
            "mfu_useful": sum(w["flops_useful"] for w in windows) / wall / peak,
            "peak_mb": max(known) if known else None, "max_step_s": max(durations)}


def job_metrics(res: dict, cfg: dict, counts: dict, peak_flops: float) -> dict:
    """A tp worker's result: metrics per cuDNN setting, and what the process did."""
    steps, w, n = res["steps"], cfg["warmup"], cfg["window_steps"]
    peaks = {int(k): v for k, v in res.get("window_peaks_mb", {}).items()}
    by: dict[str, list] = {}
    notes = []
    for i, label in enumerate(cfg["windows"]):
        lo, hi = w + i * n, w + (i + 1) * n
        by.setdefault(label, []).append((window(steps, lo, hi, counts, peak_flops),
                                         peaks.get(hi)))
        used = res.get("cudnn_used", [])[lo:hi]
        if used and any(u != (label == "on") for u in used):
            notes.append(f"window {i + 1} meant cuDNN {label}, steps ran with {used}")
    mem = res.get("mem", {})
    out = {label: combine([x for x, _ in v], [p for _, p in v]) for label, v in by.items()}
    return {"by_cudnn": out, "notes": notes, "setup_s": res.get("setup_s"),
            "gpu_load_peak_mb": mem.get("gpu_load_peak_mb"),
            "peak_rss_mb": max(mem.get("load_hwm_mb", 0), mem.get("train_hwm_mb", 0)),
            "versions": res.get("versions")}


METRICS = ("tokens_per_s", "mean_step_s", "median_step_s", "mean_over_median", "mfu_6nt",
           "mfu_useful", "peak_mb", "padding_frac")


def table(runs: list[dict]) -> list[dict]:
    """Rows per (contender, shape, pad, compile, cuDNN), the mean over the repeats that ran."""
    rows: dict[tuple, dict] = {}
    for r in runs:
        if r["status"] != "ok":
            continue
        for label, m in r["metrics"]["by_cudnn"].items():
            key = (r["who"], r["shape"], r["pad"], r["compile"], label)
            row = rows.setdefault(key, {"who": r["who"], "shape": r["shape"], "micro": r["micro"],
                                        "pad": r["pad"], "compile": r["compile"], "cudnn": label,
                                        "repeats": [], "per_repeat": {k: [] for k in METRICS}})
            row["repeats"].append(r["repeat"])
            for k in METRICS:
                row["per_repeat"][k].append(m[k])
    for row in rows.values():
        for k, xs in row["per_repeat"].items():
            known = [x for x in xs if x is not None]
            row[k] = statistics.mean(known) if known else None
    return list(rows.values())


def ratios(rows: list[dict]) -> list[dict]:
    """Issue #14's acceptance ratios, per cuDNN setting, at pad 1 without compile."""
    def find(who: str, shape: str, cudnn: str) -> dict | None:
        return next((r for r in rows if (r["who"], r["shape"], r["cudnn"], r["pad"],
                                         r["compile"]) == (who, shape, cudnn, 1, False)), None)

    out = []
    for cudnn in ("on", "off"):
        specs = [("off/PEFT tokens/s, micro 16", ("off", "16"), ("peft", "16"), "tokens_per_s"),
                 ("off mean/median step, micro 16", ("off", "16"), None, "mean_over_median"),
                 ("full/off step time, micro 64", ("full", "64"), ("off", "64"), "mean_step_s")]
        for name, num, den, key in specs:
            op, target = TARGETS[name]
            a, b = find(*num, cudnn), find(*den, cudnn) if den else None
            entry: dict[str, Any] = {"name": name, "cudnn": cudnn, "target": target, "op": op,
                                     "value": None, "per_repeat": [], "status": "n/a"}
            missing = [f"{w} micro {sh}" for (w, sh), r in [(num, a)] + ([(den, b)] if den else [])
                       if r is None]
            if missing:
                entry["note"] = "not measured: " + ", ".join(missing)
            else:
                if den:
                    pa, pb = a["per_repeat"][key], b["per_repeat"][key]
                    entry["per_repeat"] = [x / y for x, y in zip(pa, pb)]
                    entry["value"] = a[key] / b[key]
                else:
                    entry["per_repeat"] = list(a["per_repeat"][key])
                    entry["value"] = a[key]
                ok = entry["value"] >= target if op == ">=" else entry["value"] <= target
                entry["status"] = "met" if ok else "missed"
            out.append(entry)
    return out


def _f(x: Any, fmt: str = "{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def render(s: dict) -> str:
    """The summary as markdown."""
    env, model = s["environment"], s["model"]
    L = [f"# GPU suite{' (dry run on the CPU)' if s['suite']['dry_run'] else ''}: "
         f"{s['suite']['date']}\n",
         f"Command: `{s['suite']['command']}`. Whole suite {s['suite']['elapsed_s']:.0f} s of a "
         f"{s['suite']['budget_s']:.0f} s budget. {s['budget']['note']}"
         + (" A dry run proves that every stage starts and writes its figures; a tiny model "
            "on a shared CPU measures nothing about the GPU." if s["suite"]["dry_run"] else "")
         + "\n",
         f"Machine: {env.get('device', 'no GPU')}; Python {env.get('python')}; "
         + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items()) + ". Wheels: "
         + (", ".join(env.get("installed_from_wheels") or []) or "none installed") + ".\n",
         f"Model: random-init Llama {model['shape_text']}, {_f(model.get('parameters'), '{:,}')} "
         f"parameters; N for 6·N·T = {model['counts']['n_6nt']:,}. Data: {model['data_text']}. "
         f"bf16, ZeRO-0, LoRA r {TP.LORA_R} on q/k/v/o/gate/up/down, PACE σ {TP.SIGMA} "
         f"λ {TP.LAMBDA}, lazy interval 2. {s['method']}\n",
         "| contender | micro | pad | compile | cuDNN | repeats | tokens/s | mean step s | "
         "median step s | mean/median | MFU 6NT | MFU useful | peak GPU MB | padding |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["table"]:
        L.append(f"| {r['who']} | {r['micro']} | {r['pad']} | {'yes' if r['compile'] else 'no'} "
                 f"| {r['cudnn']} | {len(r['repeats'])} | {_f(r['tokens_per_s'], '{:.0f}')} | "
                 f"{_f(r['mean_step_s'])} | {_f(r['median_step_s'])} | "
                 f"{_f(r['mean_over_median'], '{:.2f}')} | {_f(r['mfu_6nt'], '{:.2%}')} | "
                 f"{_f(r['mfu_useful'], '{:.2%}')} | {_f(r['peak_mb'], '{:.0f}')} | "
                 f"{_f(r['padding_frac'], '{:.1%}')} |")
    L += ["", "| acceptance ratio (issue #14) | cuDNN | value | per repeat | target | |",
          "|---|---|---|---|---|---|"]
    for r in s["ratios"]:
        L.append(f"| {r['name']} | {r['cudnn']} | {_f(r['value'], '{:.2f}')} | "
                 + (", ".join(f"{x:.2f}" for x in r["per_repeat"]) or "–")
                 + f" | {r['op']} {r['target']} | {r['status']}"
                 + (f" ({r['note']})" if r.get("note") else "") + " |")
    c = s["counter"]
    L += ["", f"Launch/sync counter (bench/launch_count.py, CPU, bf16 ZeRO-0): {c['status']}."]
    for row in c.get("rows", []):
        L.append(f"- {row['config']}: {row['total']:,.0f} launches, {row['total_syncs']:,.0f} host "
                 f"syncs per optimizer step")
    L += ["", "Axes: " + "; ".join(f"{k}: {v}" for k, v in s["axes"].items()) + "."]
    if env.get("matmul_flops"):
        L += ["", f"bf16 matmul 8192³ (best of 5): {max(env['matmul_flops']) / 1e12:.0f} TFLOP/s."]
    if env.get("sdpa"):
        L += ["", "SDPA forward + backward, 16 rows, causal bool mask, ms: first call at a new "
              "length / best of the next two:", "", "| backend | " + " | ".join(
                  str(r["length"]) for r in next(iter(env["sdpa"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(env["sdpa"].values())))]
        for name, rows in env["sdpa"].items():
            L.append(f"| {name} | " + " | ".join(
                r["error"][:60] if "error" in r else f"{r['first_ms']:.1f} / {r['then_ms']:.2f}"
                for r in rows) + " |")
    for title, key in (("Errors (recorded; the suite went on)", "errors"),
                       ("Skipped", "skipped"), ("Notes", "notes")):
        if s.get(key):
            L += ["", f"{title}:"] + [f"- {x if isinstance(x, str) else _item(x)}" for x in s[key]]
    return "\n".join(L) + "\n"


def _item(x: dict) -> str:
    tail = x.get("log_tail")
    return (f"{x.get('stage')} {x.get('job', '')}: {x.get('message')}"
            + (f" — log tail: `{tail[-300:]}`" if tail else ""))
