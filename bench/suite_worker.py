"""Worker processes of bench/gpu_suite.py: ``python bench/suite_worker.py WORKER CONFIG OUT``.

prepare   once per suite: what the machine has (package versions, CUDA, cuDNN, the recipe fields
          the optional axes need: ``data.pad_to_multiple_of``, ``train.compile``), the tokenizer
          (sentencepiece BPE trained on the suite's data, pace_llm.tinymodel.train_tokenizer)
          and the random-init Llama built from a config (no hub): bf16, initialised on the GPU
          when there is one, with the config's vocabulary (TinyLlama's 32000 rows, more than
          the tokenizer's pieces: the unused rows cost what a real vocabulary costs), and an
          8192³ bf16 matmul rate (GPU only).
tp        one throughput process: bench/throughput.py's pace_llm or PEFT + Trainer contender,
          run unchanged, observed through throughput's Recorder, which this worker replaces by
          one that sets the SDPA cuDNN backend (``torch.backends.cuda.enable_cudnn_sdp``) before
          every step from the suite's schedule (warmup steps alternate on/off, then windows
          on/off/off/on) and reads the CUDA allocator's peak at the end of every window.
          The process first imports its libraries (CPU only) and then waits for its ``go`` file,
          so the suite can start the next process while the current one measures.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import fields
from importlib import metadata
from pathlib import Path

import throughput as TP  # bench/ is sys.path[0] when this file runs

DISTS = ("torch", "transformers", "peft", "deepspeed", "datasets", "accelerate", "jsonargparse",
         "sentencepiece", "safetensors", "tokenizers", "huggingface-hub", "pydantic")


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- prepare
def probe() -> dict:
    import torch

    from pace_llm import schema

    info: dict = {"python": platform.python_version(), "versions": {d: version(d) for d in DISTS},
                  "torch_cuda": torch.version.cuda, "cuda": torch.cuda.is_available(),
                  "threads": torch.get_num_threads()}
    if info["cuda"]:
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
        info["cudnn"] = torch.backends.cudnn.version()
        info["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    names = {f"data.{f.name}" for f in fields(schema.DataArgs)}
    names |= {f"train.{f.name}" for f in fields(schema.TrainArgs)}
    info["fields"] = {k: k in names for k in ("data.pad_to_multiple_of", "train.compile")}
    return info


def build_base(cfg: dict) -> dict:
    """Tokenizer + random-init model in ``cfg['base']``; returns sizes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pace_llm.schema import DataArgs
    from pace_llm.tasks import gsm8k
    from pace_llm.tinymodel import train_tokenizer

    texts = list(gsm8k.texts(DataArgs(task="gsm8k", path=cfg["data"], limit=cfg["limit"])))
    base = Path(cfg["base"])
    tok = train_tokenizer(texts, base, cfg["tokenizer_vocab"])
    build = cfg["build"]
    if len(tok) > build["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tok)} pieces, the model {build['vocab_size']}")
    config = AutoConfig.for_model(**build, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(base)
    n = sum(p.numel() for p in model.parameters())
    lengths = [len(ids) for ids in tok(texts[:2000])["input_ids"]]
    return {"parameters": n, "tokenizer_pieces": len(tok), "build_s": time.perf_counter() - t,
            "init_device": device, "mean_tokens": sum(lengths) / len(lengths),
            "min_tokens": min(lengths), "max_tokens": max(lengths),
            "distinct_lengths": len(set(lengths))}


def matmul_rate() -> list[float]:
    """bf16 8192³ products, 10 per timing, best of 5 (GPU only)."""
    import torch

    n, reps = 8192, 10
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        rates.append(reps * 2 * n ** 3 / (time.perf_counter() - t))
    return rates


def sdpa_probe(batch: int, heads: int, head_dim: int) -> dict[str, list[dict]]:
    """SDPA forward + backward with a causal bool mask (as transformers passes for a padded
    batch) per backend at new lengths: the first call (cuDNN builds a plan per new shape) and
    the best of the next two, in ms; a backend that refuses the inputs says why."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, list[dict]] = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        rows = []
        for length in (256, 263, 300, 301, 448):
            q, k, v = (torch.randn(batch, heads, length, head_dim, device="cuda",
                                   dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            mask = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()
            times = []
            try:
                with sdpa_kernel(backend):
                    for _ in range(3):
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
                        torch.cuda.synchronize()
                        times.append(1e3 * (time.perf_counter() - t))
                rows.append({"length": length, "first_ms": times[0], "then_ms": min(times[1:])})
            except RuntimeError as exc:  # no kernel of this backend for these inputs
                rows.append({"length": length, "error": str(exc).strip().splitlines()[0][:200]})
        out[name] = rows
    return out


def prepare(cfg: dict, out: str) -> None:
    info = probe()
    Path(out).write_text(json.dumps(info))  # the probe survives a failing build
    info["base"] = build_base(cfg)
    if info["cuda"]:
        info["matmul_flops"] = matmul_rate()
        b = cfg["build"]
        info["sdpa"] = sdpa_probe(16, b["num_attention_heads"],
                                  b["hidden_size"] // b["num_attention_heads"])
    Path(out).write_text(json.dumps(info))


# --------------------------------------------------------------------------- tp
def set_cudnn(on: bool) -> None:
    import torch

    torch.backends.cuda.enable_cudnn_sdp(on)


def window_recorder(cfg: dict) -> type:
    """throughput.Recorder plus the cuDNN schedule and per-window CUDA peaks."""
    import torch

    flags, marks = cfg["flags"], set(cfg["marks"])

    class WindowRecorder(TP.Recorder):
        def __init__(self, total_steps: int, warmup: int = 0):
            super().__init__(total_steps, warmup)
            self.used: list[bool] = []
            self.peaks: dict[int, float] = {}
            set_cudnn(flags[0])

        def before_training(self) -> None:
            super().before_training()
            set_cudnn(flags[0])

        def step(self, *args, **kwargs) -> None:
            super().step(*args, **kwargs)
            done = len(self.steps)
            self.used.append(torch.backends.cuda.cudnn_sdp_enabled())
            if done in marks and TP._cuda():
                self.peaks[done] = torch.cuda.max_memory_allocated() / 2 ** 20
                torch.cuda.reset_peak_memory_stats()
            if done < len(flags):
                set_cudnn(flags[done])

        def dump(self, path: str, extra: dict) -> None:
            super().dump(path, {**extra, "cudnn_used": self.used, "window_peaks_mb": self.peaks,
                                "versions": {d: version(d) for d in DISTS}})

    return WindowRecorder


def pad_collator(multiple: int) -> None:
    """PEFT + Trainer's DataCollatorForSeq2Seq with ``pad_to_multiple_of``."""
    import transformers

    base = transformers.DataCollatorForSeq2Seq

    class Padded(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, pad_to_multiple_of=multiple, **kwargs)

    transformers.DataCollatorForSeq2Seq = Padded


def wait_go(go: str | None, timeout: float = 1800) -> None:
    if not go:
        return
    parent, start = os.getppid(), time.time()
    while not Path(go).exists():
        if os.getppid() != parent or time.time() - start > timeout:
            sys.exit("no go signal: the suite stopped")
        time.sleep(0.05)


def tp(config: str, out: str) -> None:
    cfg = json.loads(Path(config).read_text())
    if cfg.get("fail"):
        raise RuntimeError("forced failure (gpu_suite.py --fail)")
    import deepspeed  # noqa: F401  imports only (CPU) before the go signal
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from pace_llm import train  # noqa: F401

    wait_go(cfg.get("go"))
    cfg = json.loads(Path(config).read_text())  # written anew at go time
    TP.LOG_EVERY = cfg["log_every"]
    TP.Recorder = window_recorder(cfg)
    argv = TP.pace_argv
    TP.pace_argv = lambda c, mode: argv(c, mode) + c.get("pace_extra", [])
    if cfg["who"] == "peft":
        if cfg["pad"] > 1:
            pad_collator(cfg["pad"])
        TP.worker_peft(cfg, False, out)
    else:
        TP.worker_pace(cfg, cfg["who"], out)
    sys.exit("the run ended before its last step was recorded")


if __name__ == "__main__":
    which, config, result = sys.argv[1:4]
    if which == "prepare":
        prepare(json.loads(Path(config).read_text()), result)
    else:
        tp(config, result)
