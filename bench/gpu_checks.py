"""The CUDA paths on one GPU (issues 3 and 5): precisions, ZeRO stages and QLoRA, end to end.

    python bench/gpu_checks.py [--work /tmp/pace_gpu] [--steps 400] [--parallel 4]

Every check is a real ``pace_llm/train.py`` run of the offline demo recipe (tiny random Llama,
synthetic GSM8K-format arithmetic, noisy LoRA + PACE ``full``, generation eval with exact match)
with command-line overrides; checks run ``--parallel`` at a time on the one GPU (they are tiny;
their tokens/s are therefore not benchmark figures). Then the QLoRA adapter is merged into the
dequantized base (``pace_llm.export --merge``) and PEFT loads the same adapter onto the 4-bit base
from the hub-style directory: their logits are compared. A markdown summary goes to stdout and to
``<work>/summary.md``; the logs are in ``<work>/<check>.log``.

    fp32 / bf16 / fp16      ZeRO-0, the demo as shipped apart from the precision (fp16: dynamic
                            loss scale); bf16 and fp16 curves are compared with fp32's
    bf16-zero3              ZeRO-3, one process (base partitioned, eval gathers it)
    bf16-zero3-offload      ds_configs/zero3_offload.json (DeepSpeedCPUAdam, optimizer on CPU)
    qlora-bf16-zero2/-zero3 4-bit NF4 double-quant base (the fp32 run's saved base), bf16 compute
    lora-bf16-zero2         the same without quantization (QLoRA's reference)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DS = REPO / "ds_configs"


def checks(work: Path, steps: int) -> list[list[tuple[str, list[str]]]]:
    """Waves of (name, overrides); a wave starts when the previous one has finished."""
    base = str(work / "fp32" / "base_model")
    quant = ["--model.build", "null", "--model.name_or_path", base, "--train.precision", "bf16"]
    short = ["--train.max_steps", str(steps // 2), "--eval.every", str(steps // 2)]
    return [
        [("fp32", ["--train.precision", "fp32"]),
         ("bf16", ["--train.precision", "bf16"]),
         ("fp16", ["--train.precision", "fp16"]),
         ("bf16-zero3", ["--train.precision", "bf16", "--deepspeed", str(DS / "zero3.json")])],
        [("qlora-bf16-zero2", [*quant, *short, "--quant.bits", "4",
                               "--deepspeed", str(DS / "zero2.json")]),
         ("qlora-bf16-zero3", [*quant, *short, "--quant.bits", "4",
                               "--deepspeed", str(DS / "zero3.json")]),
         ("lora-bf16-zero2", [*quant, *short, "--deepspeed", str(DS / "zero2.json")]),
         ("bf16-zero3-offload", ["--train.precision", "bf16", *short,
                                 "--deepspeed", str(DS / "zero3_offload.json")])],
    ]


def run(name: str, overrides: list[str], work: Path, steps: int, timeout: float) -> dict:
    out = work / name
    cmd = [sys.executable, str(REPO / "pace_llm" / "train.py"), "--recipe",
           str(REPO / "recipes" / "demo.yaml"), "--train.output_dir", str(out),
           "--train.overwrite", "true", "--train.max_steps", str(steps), "--eval.every", str(steps),
           *overrides]
    t = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"name": name, "rc": rc, "wall_s": time.perf_counter() - t, **read_metrics(out)}


def read_metrics(out: Path) -> dict:
    f = out / "metrics.jsonl"
    if not f.is_file():
        return {}
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "task_loss" in r]
    evals = [r for r in rows if "eval" in r]
    if not train:
        return {}
    return {"curve": [(r["step"], r["task_loss"]) for r in train],
            "first_loss": statistics.mean(r["task_loss"] for r in train[:3]),
            "last_loss": statistics.mean(r["task_loss"] for r in train[-3:]),
            "first_cons": train[0].get("consistency_loss"),
            "last_cons": train[-1].get("consistency_loss"),
            "skipped": train[-1].get("skipped_steps"),
            "peak_mb": max(r.get("peak_memory_mb") or 0 for r in train),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
            "eval": evals[-1]["eval"]["metrics"] if evals else None}


def curve_gap(a: dict, b: dict) -> float | None:
    """Largest relative difference of the task-loss curves at the steps both logged."""
    ca, cb = dict(a.get("curve", [])), dict(b.get("curve", []))
    common = sorted(set(ca) & set(cb))
    return max(abs(ca[s] - cb[s]) / abs(cb[s]) for s in common) if common else None


def merged_vs_4bit(work: Path, timeout: float) -> str:
    """Merge the 4-bit run's adapter into the dequantized base, compare logits with PEFT on the
    4-bit base, and report the NF4 error of the base itself."""
    run_dir = work / "qlora-bf16-zero2"
    merged = work / "qlora-merged"
    exp = subprocess.run([sys.executable, "-m", "pace_llm.export", "--run", str(run_dir),
                          "--merge", "--out", str(merged), "--dtype", "float32", "--overwrite"],
                         cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if exp.returncode:
        return f"merge export failed (rc {exp.returncode}):\n```\n{exp.stderr[-2000:]}\n```"
    code = f"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
base = "{work / 'fp32' / 'base_model'}"
dev = "cuda" if torch.cuda.is_available() else "cpu"
ids = torch.randint(3, 500, (4, 48), generator=torch.Generator().manual_seed(0)).to(dev)
def logits(m):
    with torch.no_grad():
        return m(input_ids=ids).logits.float()
def rel(a, b):
    return ((a - b).norm() / b.norm()).item()
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
q = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, device_map=dev)
full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(dev)
nf4 = rel(logits(q), logits(full))
q = PeftModel.from_pretrained(q, "{run_dir / 'adapter'}")
m = AutoModelForCausalLM.from_pretrained("{merged}", dtype=torch.float32).to(dev)
lq, lm = logits(q), logits(m)
print(f"NF4 base vs fp32 base: relative logit error {{nf4:.4f}}")
print(f"PEFT adapter on the 4-bit base vs merged dequantized model: {{rel(lq, lm):.2e}}"
      f" (argmax agreement {{(lq.argmax(-1) == lm.argmax(-1)).float().mean().item():.4f}})")
"""
    cmp = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    return cmp.stdout if cmp.returncode == 0 else f"compare failed:\n```\n{cmp.stderr[-2000:]}\n```"


def environment() -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    try:
        import bitsandbytes
        import deepspeed
        import transformers

        libs = (f"deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, "
                f"bitsandbytes {bitsandbytes.__version__}")
    except ImportError as e:
        libs = f"missing: {e}"
    return f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); {libs}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/pace_gpu")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=240, help="seconds per run")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, dict] = {}
    for wave in checks(work, a.steps):
        with ThreadPoolExecutor(a.parallel) as pool:
            for r in pool.map(lambda c: run(*c, work, a.steps, a.timeout), wave):
                results[r["name"]] = r
                print(f"{r['name']}: rc {r['rc']} in {r['wall_s']:.0f} s; loss "
                      f"{r.get('first_loss', float('nan')):.3f} -> "
                      f"{r.get('last_loss', float('nan')):.3f}; eval {r.get('eval')}", flush=True)
    merge = (merged_vs_4bit(work, a.timeout) if results["qlora-bf16-zero2"]["rc"] == 0
             else "skipped: the QLoRA run failed")

    L = [f"Environment: {environment()}. Demo recipe, {a.steps} steps (QLoRA / offload "
         f"{a.steps // 2}), {a.parallel} runs at a time on the GPU. Whole script "
         f"{(time.perf_counter() - started) / 60:.1f} min.\n",
         "| check | rc | wall s | task loss first → last | consistency first → last | "
         "skipped steps | peak GPU MB | eval | max rel. gap to fp32 curve |",
         "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        gap = curve_gap(r, results["fp32"]) if name in ("bf16", "fp16") else None
        cons = (f"{r['first_cons']:.4f} → {r['last_cons']:.4f}"
                if r.get("first_cons") is not None else "–")
        L.append(f"| {name} | {r['rc']} | {r['wall_s']:.0f} | "
                 + (f"{r['first_loss']:.3f} → {r['last_loss']:.3f} | {cons} | {r['skipped']} | "
                    f"{r['peak_mb']:.0f} | {json.dumps(r['eval'])} | "
                    if "first_loss" in r else "– | – | – | – | – | ")
                 + (f"{100 * gap:.1f}% |" if gap is not None else "– |"))
    L += ["", "QLoRA merge check (qlora-bf16-zero2):", "", merge]
    text = "\n".join(L)
    print("\n" + text)
    (work / "summary.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
