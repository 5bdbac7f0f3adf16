"""Peak memory of fp32 LoRA vs 4-bit QLoRA on the same model: load + a few PACE steps.

    python bench/qlora_memory.py [--steps 3] [--rows 2] [--length 64]

Each contender runs in a fresh subprocess, so its peak RSS is its own. The base is a random
Llama (hidden 1024, 8 blocks, vocab 32000, 160M parameters) saved once as a bf16 safetensors
checkpoint, as hub checkpoints are. Every contender imports the same libraries (torch,
transformers, bitsandbytes, deepspeed via pace_llm), injects the same noisy LoRA (r 16,
attn+mlp) and runs the same PACE ``full`` steps (doubled batch, AdamW on the adapters).
Contenders: ``lora-fp32`` (the reference), ``qlora-fp32`` (4-bit NF4 + double quant,
everything else fp32: the effect of quantization alone), ``lora-bf16`` and ``qlora-bf16`` (the
QLoRA recipe's setting: bf16 compute, embeddings / lm_head / norms in bf16).

Two things would make RSS measure something other than the model, and are switched off: glibc's
malloc keeps freed large blocks and grows RSS step after step (the subprocesses run with
``MALLOC_MMAP_THRESHOLD_=65536`` so RSS follows the live memory), and a bf16 load from a bf16
checkpoint leaves the tensors aliasing the mmapped file, so the whole file stays mapped and its
touched pages count (those bf16 tensors are cloned, one at a time, after the load). The
checkpoint is written, and the contenders started, by lean processes: a child inherits its
parent's maxrss. Numbers per contender (MB = 2^20 bytes):

    weights   bytes of the model's state_dict (packed 4-bit weights + quant states included)
    baseline  RSS after the imports (the same for all; subtracted for the "net" figures)
    load      peak RSS while loading; includes the mmapped checkpoint pages, which the
              loader keeps mapped until every tensor is read (the same 305 MB for all)
    train     peak RSS during the steps, after the load
    net       peak minus baseline: over load + steps ("net peak"), over the steps ("net train")

The peaks are the kernel's RSS high-water mark, the counter ``resource.getrusage`` maxrss
reports, read as VmHWM from /proc/self/status so it can be reset between phases
(/proc/self/clear_refs); maxrss itself also keeps what the kernel recorded when a thread exited.

The target: QLoRA's footprint below 40% of fp32 LoRA's. On this model 41% of the parameters are
embeddings and lm_head, which stay unquantized, so the same-precision weight ratio cannot go
below 49% (fp32) / 57% (bf16); activations are the same for both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
         "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 32000,
         "max_position_embeddings": 512, "tie_word_embeddings": False}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _hwm_mb() -> float:
    """Peak RSS since the last ``_reset_peak`` (VmHWM)."""
    return _status_mb("VmHWM")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the RSS high-water mark to the current RSS


CONTENDERS = ("lora-fp32", "qlora-fp32", "lora-bf16", "qlora-bf16")


def contender(kind: str, ckpt: str, steps: int, rows: int, length: int) -> dict:
    """Load the base as ``kind`` (CONTENDERS), inject noisy LoRA, run PACE steps."""
    import gc

    import bitsandbytes  # noqa: F401  (both contenders pay the same imports)
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from pace_llm.schema import LoraArgs, PaceArgs, QuantArgs
    from pace_llm.inject import inject_noisy_lora, trainable_parameters
    from pace_llm.lora import shared_views
    from pace_llm.quant import load_quantized

    torch.set_num_threads(1)
    gc.collect()
    _reset_peak()
    baseline = _rss_mb()
    t0 = time.perf_counter()
    method, _, precision = kind.partition("-")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    if method == "lora":
        model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype)
    else:
        model = load_quantized(LlamaForCausalLM, ckpt, QuantArgs(bits=4), dtype, 0)
    with torch.no_grad():  # own the tensors that alias the mmapped bf16 checkpoint file
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype == torch.bfloat16:
                t.data = t.data.clone()
    torch.manual_seed(0)
    inject_noisy_lora(model, LoraArgs(r=16, alpha=32), PaceArgs(mode="full", sigma=1.0))
    load_s = time.perf_counter() - t0
    gc.collect()
    load_peak, after_load = _hwm_mb(), _rss_mb()
    _reset_peak()
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-3)
    x = torch.randint(0, MODEL["vocab_size"], (rows, length),
                      generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        with shared_views(model, 2):
            logits = model(torch.cat([x, x])).logits
        v1, v2 = logits.chunk(2)
        ce = F.cross_entropy(v1[:, :-1].reshape(-1, v1.shape[-1]).float(), x[:, 1:].reshape(-1))
        loss = ce + 0.05 * (v1 - v2).float().pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(ce.item(), 4))
    step_s = (time.perf_counter() - t0) / steps
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"kind": kind, "baseline_mb": baseline, "load_peak_mb": load_peak,
            "after_load_mb": after_load, "train_peak_mb": _hwm_mb(),
            "state_dict_mb": weights / 2**20, "trainable": sum(p.numel() for p in params),
            "load_s": load_s, "step_s": step_s, "losses": losses}


def write_checkpoint(path: str) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).to(torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=2, help="micro-batch rows (doubled by PACE)")
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=MODEL["vocab_size"],
                    help="vocabulary (embeddings + lm_head stay unquantized: 41%% of the "
                         "parameters at 32000, 2%% at 512, the test tokenizers' size)")
    ap.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--write", help=argparse.SUPPRESS)
    args = ap.parse_args()
    MODEL["vocab_size"] = args.vocab
    if args.write:
        print("PARAMS", write_checkpoint(args.write))
        return
    if args.contender:
        print("RESULT " + json.dumps(contender(args.contender, args.ckpt, args.steps, args.rows,
                                               args.length)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536"}
    with tempfile.TemporaryDirectory() as ckpt:
        proc = subprocess.run([sys.executable, __file__, "--write", ckpt, "--vocab",
                               str(args.vocab)], env=env,
                              capture_output=True, text=True, check=True)
        n_params = int(proc.stdout.split("PARAMS ")[1].split()[0])
        ckpt_mb = sum(f.stat().st_size for f in Path(ckpt).iterdir()) / 2**20
        results = {}
        for kind in CONTENDERS:
            cmd = [sys.executable, __file__, "--contender", kind, "--ckpt", ckpt,
                   "--vocab", str(args.vocab),
                   "--steps", str(args.steps), "--rows", str(args.rows),
                   "--length", str(args.length)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
            results[kind] = json.loads(lines[-1][len("RESULT "):])

    print(f"model: Llama {MODEL['hidden_size']}x{MODEL['num_hidden_layers']}, vocab "
          f"{MODEL['vocab_size']}, {n_params / 1e6:.1f}M params; bf16 checkpoint {ckpt_mb:.0f} MB; "
          f"PACE full, r 16 attn+mlp, {args.steps} steps of {args.rows}x{args.length} (doubled)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, python "
          f"{platform.python_version()}; MB = 2^20 bytes")
    print("| contender | weights | baseline | load peak | train peak | net peak | net train | "
          "load s | step s | CE first -> last |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results.values():
        r["net_peak"] = max(r["load_peak_mb"], r["train_peak_mb"]) - r["baseline_mb"]
        r["net_train"] = r["train_peak_mb"] - r["baseline_mb"]
        print(f"| {r['kind']} | {r['state_dict_mb']:.0f} | {r['baseline_mb']:.0f} | "
              f"{r['load_peak_mb']:.0f} | {r['train_peak_mb']:.0f} | {r['net_peak']:.0f} | "
              f"{r['net_train']:.0f} | {r['load_s']:.1f} | {r['step_s']:.2f} | "
              f"{r['losses'][0]} -> {r['losses'][-1]} |")
    for q, lo in (("qlora-fp32", "lora-fp32"), ("qlora-bf16", "lora-bf16"),
                  ("qlora-bf16", "lora-fp32")):
        a, b = results[q], results[lo]
        print(f"{q} / {lo}: weights {a['state_dict_mb'] / b['state_dict_mb']:.1%}, "
              f"net peak {a['net_peak'] / b['net_peak']:.1%}, "
              f"net train peak {a['net_train'] / b['net_train']:.1%} (target < 40%)")


if __name__ == "__main__":
    main()
