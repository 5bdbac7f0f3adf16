"""Training throughput and memory: pace_llm (off / full / lazy) against HF PEFT + transformers
``Trainer`` on one workload, side by side in one run.

    OMP_NUM_THREADS=1 python bench/throughput.py [--steps 20] [--repeats 2] [--write-results]

Threads: give every contender the same OMP_NUM_THREADS (inherited). On a machine whose cores are
shared with other jobs, use fewer threads than free cores: with OMP_NUM_THREADS equal to the core
count and another busy process, every parallel region waits for a descheduled thread and a step
of this workload took 5x longer, uncorrelated with its token count (measured: pace_llm off 6.95
s/step at 2 threads vs 1.39 s at 1 thread on 2 shared cores), which drowns the comparison.

Workload (the same for every contender):
    data        GSM8K train rows (``--data``: the hub dataset id, default ``openai/gsm8k``, or a
                local train.jsonl / directory, read by pace_llm's gsm8k task reader; the first
                ``--limit`` rows), tokenized once by pace_llm's gsm8k task (paper prompt, prompt
                tokens unsupervised, EOS appended, rows over ``--max-length`` dropped). The HF
                contenders train on exactly these token ids / labels.
    tokenizer   sentencepiece BPE trained by this script on the GSM8K train text, ``--vocab``
                pieces (pace_llm.tinymodel.train_tokenizer, via build_base).
    model       random-init Llama, fp32, sizes from the flags (defaults below), untied lm_head.
    adapters    LoRA r 16, alpha 32, dropout 0, on q/k/v/o/gate/up/down ("attn+mlp").
    training    micro-batch ``--micro-batch``, no accumulation, AdamW lr 2e-4 constant, grad
                clip 1.0, ``--warmup`` + ``--steps`` + 1 optimizer steps, logging every 10 steps,
                no evaluation, no checkpoints, one process, fp32, CPU.

GPU (``--device cuda --dtype bf16``): the same workload on one GPU: the base is saved and loaded
in bf16, pace_llm trains with ``train.precision bf16`` (DeepSpeed bf16: bf16 weights and
activations, fp32 master adapter weights in the optimizer), PEFT + Trainer as the PEFT docs do
it (base loaded in bf16, ``bf16=True``, adapters kept in fp32 by PEFT's autocast_adapter_dtype).
Each recorded step ends with ``torch.cuda.synchronize()`` for every contender, so the window
measures finished GPU work. Memory is the CUDA allocator's peak (``max_memory_allocated``, reset
before the first step, so "train" is the peak over the steps; "peak" over the whole process).
MFU is reported against the card's dense bf16 peak (``--peak-tflops``, default 989 = H100/H200
SXM datasheet) and against an 8192³ bf16 torch.mm measured in the same run. Contender ``q``
(GPU only): pace_llm ``off`` on a 4-bit NF4 double-quant base (bf16 compute) = QLoRA.

Contenders, each in its own fresh subprocess (so peak RSS is its own), interleaved and repeated
``--repeats`` times (repeat 1 in the order below, repeat 2 reversed, ...):
    a    pace_llm ``pace.mode off`` (DeepSpeed engine, ``--ds``, default ZeRO-0): the run ``python pace_llm/train.py
         --recipe <workdir>/recipe.yaml --pace.mode off`` does, with in-loop evaluation disabled,
         observed through the trainer's ``on_step_start`` / ``on_step_end`` hooks.
    b    HF PEFT + Trainer as the docs set up causal-LM SFT: ``get_peft_model(model,
         LoraConfig(r=16, lora_alpha=32, target_modules=[...], task_type="CAUSAL_LM"))``,
         ``DataCollatorForSeq2Seq`` (pads input_ids, labels with -100), ``TrainingArguments``
         with the same batch / lr / steps, ``dataloader_num_workers=0``, no eval, fp32, default
         optimizer (adamw_torch_fused).
    b-grouped  the same with ``train_sampling_strategy="group_by_length"`` (transformers 5's
         name for ``group_by_length=True``).
    c    pace_llm ``pace.mode full`` (σ 0.5, λ 0.02: doubled micro-batch every step).
    d    pace_llm ``pace.mode lazy`` (``lazy_interval 2``: every 2nd step pairs half the
         micro-batch, the others run one noisy view).

Measured per contender:
    tokens/s    non-padding training tokens (sum of the attention mask over the examples the
                steps consumed, each dataset token once; a lazy paired step consumes half a
                micro-batch) divided by the wall time from the end of warmup step ``--warmup``
                to the end of step ``--warmup + --steps``. Model load, setup and the warmup
                steps are outside the window; the window includes data collation and every
                per-step overhead of the loop (logging steps included: 2 of 20 steps log).
                The last step (``--warmup + --steps + 1``) is outside the window: pace_llm runs
                its clean-gradient-norm pass on the final step whatever the logging interval.
    step s      window wall time / ``--steps``.
    peak RSS    the process's RSS high-water mark (VmHWM) over its whole life (imports, load,
                training), and "train Δ": VmHWM during the training steps (reset just before
                the first step via /proc/self/clear_refs) minus the RSS at that moment.
    MFU         model FLOP/s achieved in the window over this CPU's fp32 matmul FLOP/s, measured
                in the same run (torch.mm of two 2048x2048 fp32 matrices, best of 5, in a fresh
                subprocess before and after the contenders; the larger is the peak).

Model FLOPs (the useful work; the same formula for every contender), per optimizer step:

    F = views · [ T · (4·N_frozen + 6·N_adapter) + S · 4·H·V ]

    T          non-padding tokens trained in the step (as above)
    S          supervised next-token positions (labels ≠ -100 after the shift)
    N_frozen   parameters of the frozen linear layers inside the blocks (q,k,v,o,gate,up,down):
               forward 2·N + input-gradient backward 2·N per token (no weight gradients)
    N_adapter  LoRA parameters: forward 2·N + input-gradient 2·N + weight-gradient 2·N
    H·V        lm_head: forward 2·H·V + input-gradient 2·H·V, only at supervised positions
               (pace_llm computes logits only there; PEFT computes them at every position,
               padding included, which is extra work it does, not useful work)
    views      2 for a PACE-paired step (the doubled batch), else 1

Attention score/value products, norms, activations, embeddings and the optimizer are not
counted (a few % of F at these lengths), so MFU is a slight underestimate.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cpu"  # set from --device in the parent; workers read PACE_BENCH_DEVICE
DEFAULT_DATA = "openai/gsm8k"  # hub id; --data also takes a local train.jsonl or directory
HEADING = "## Throughput (bench/throughput.py)"
CONTENDERS = ["a", "b", "b-grouped", "c", "d"]  # and "q" (QLoRA, GPU)
DESCRIBE = {"a": "pace_llm off", "b": "PEFT+Trainer", "b-grouped": "PEFT+Trainer grouped",
            "c": "pace_llm full", "d": "pace_llm lazy/2", "q": "pace_llm off, 4-bit base"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 16, 32
SIGMA, LAMBDA = 0.5, 0.02
LOG_EVERY = 10
SEED = 42


# --------------------------------------------------------------------------- memory helpers
def _status(key: str) -> float:
    """A /proc/self/status field in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Recorder:
    """Per-step timestamps and token counts; memory marks around the training phase."""

    def __init__(self, total_steps: int, warmup: int = 0):
        self.total, self.warmup = total_steps, warmup
        self.profiler = None
        self.steps: list[dict] = []
        self.mem: dict[str, float] = {}
        self.t_start = time.perf_counter()

    def before_training(self) -> None:
        if _cuda():
            import torch

            _sync()
            self.mem["gpu_load_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
            torch.cuda.reset_peak_memory_stats()
        self.mem["load_hwm_mb"] = _status("VmHWM")
        self.mem["rss_before_train_mb"] = _status("VmRSS")
        self.setup_s = time.perf_counter() - self.t_start
        _reset_hwm()

    def step(self, tokens: int, supervised: int, padded: int, views: int, engine_s=None,
             loss=None) -> None:
        _sync()
        self.steps.append({"end": time.perf_counter(), "tokens": tokens, "supervised": supervised,
                           "padded": padded, "views": views, "engine_s": engine_s, "loss": loss})
        self._profile(len(self.steps))

    def _profile(self, done: int) -> None:
        """With PACE_BENCH_PROFILE=<file>: torch.profiler over the 3 steps after warmup (those
        steps' timings then include the profiler's overhead: a separate run from the figures)."""
        out = os.environ.get("PACE_BENCH_PROFILE")
        if not out:
            return
        import torch

        if done == self.warmup:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if _cuda():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=acts)
            self.profiler.start()
        elif done == self.warmup + 3 and self.profiler is not None:
            self.profiler.stop()
            avg = self.profiler.key_averages()
            dev = "cuda_time_total" if _cuda() else "self_cpu_time_total"
            Path(out).write_text(
                f"3 steps after warmup; {len(self.steps[-3:])} steps took "
                f"{self.steps[-1]['end'] - self.steps[-4]['end']:.3f} s\n\n"
                + avg.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60)
                + "\n\n" + avg.table(sort_by=dev, row_limit=30, max_name_column_width=60))

    def dump(self, path: str, extra: dict) -> None:
        self.mem["train_hwm_mb"] = _status("VmHWM")
        if _cuda():
            import torch

            self.mem["gpu_train_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        self.mem["rss_end_mb"] = _status("VmRSS")
        Path(path).write_text(json.dumps({"steps": self.steps, "mem": self.mem,
                                          "setup_s": self.setup_s, **extra}))


def _cuda() -> bool:
    return os.environ.get("PACE_BENCH_DEVICE") == "cuda"


def _sync() -> None:
    """Wait for queued GPU work (timings measure finished work); a no-op on CPU."""
    if _cuda():
        import torch

        torch.cuda.synchronize()


# --------------------------------------------------------------------------- workers
def worker_build(cfg: dict) -> None:
    """Train the tokenizer on the GSM8K train text and save the random-init Llama."""
    import logging

    from pace_llm.schema import DataArgs
    from pace_llm.tasks import gsm8k
    from pace_llm.tinymodel import build_base

    logging.basicConfig(level=logging.INFO)
    texts = list(gsm8k.texts(DataArgs(task="gsm8k", path=cfg["data"])))
    build_base(cfg["build"], texts, Path(cfg["base"]), seed=0)
    if cfg["dtype"] == "bf16":  # saved as hub checkpoints are: bf16 safetensors
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg["base"], dtype=torch.float32)
        model.to(torch.bfloat16).save_pretrained(cfg["base"])


def worker_matmul(out: str) -> None:
    import torch

    if _cuda():  # 8192³ bf16 on the GPU, 10 products per timing
        n, reps = 8192, 10
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    else:
        n, reps = 2048, 1
        a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3 if _cuda() else 1):
        a @ b
    rates = []
    for _ in range(5):
        _sync()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync()
        rates.append(reps * 2 * n ** 3 / (time.perf_counter() - t))
    Path(out).write_text(json.dumps({"flops": rates, "threads": torch.get_num_threads()}))


def worker_pace(cfg: dict, mode: str, out: str) -> None:
    """pace_llm's own story (train.started -> trainer.train), observed through the trainer's
    step hooks; evaluation disabled (eval.at_start false, eval.every 0)."""
    from pace_llm import setup as S
    from pace_llm.config import load_recipe
    from pace_llm.data.collate import padded_width
    from pace_llm.data.examples import IGNORE

    rec = Recorder(cfg["total_steps"], cfg["warmup"])
    recipe = load_recipe(pace_argv(cfg, mode))

    def start(trainer, global_batch):
        if not trainer.step:
            rec.before_training()

    def end(trainer, global_batch, stats):
        micro = trainer.micro_batches(global_batch, trainer.plan(trainer.step - 1))
        ex = [[trainer.run.task.train[i] for i in m] for m in micro]
        tokens = sum(len(e["input_ids"]) for m in ex for e in m)
        sup = sum(sum(1 for y in e["labels"][1:] if y != IGNORE) for m in ex for e in m)
        padded = sum(len(m) * padded_width(max(len(e["input_ids"]) for e in m),
                                           trainer.run.pad_multiple) for m in ex)
        assert int(stats["tokens"]) == tokens, (stats["tokens"], tokens)
        loss = float(stats["task_loss"])  # a device tensor: the Recorder syncs each step anyway
        rec.step(tokens, sup, padded, stats["views"], stats["time"], loss)
        if trainer.step == cfg["total_steps"]:  # the last step: record and leave
            rec.dump(out, {"n_train": len(trainer.run.task.train)})
            sys.stdout.flush()
            os._exit(0)

    with S.started(recipe) as trainer:
        trainer.on_step_start.append(start)
        trainer.on_step_end.append(end)
        trainer.train()


def worker_peft(cfg: dict, grouped: bool, out: str) -> None:
    """HF PEFT + transformers Trainer, set up as the PEFT / transformers docs do for SFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq,
                              Trainer, TrainerCallback, TrainingArguments)

    from pace_llm.schema import DataArgs
    from pace_llm.data.build import build_task

    rec = Recorder(cfg["total_steps"], cfg["warmup"])
    tok = AutoTokenizer.from_pretrained(cfg["base"])
    data = DataArgs(task="gsm8k", path=cfg["data"], max_length=cfg["max_length"],
                    on_too_long="drop", limit=cfg["limit"])
    rows = build_task(data, tok).train  # the very examples pace_llm trains on
    train = [{"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]),
              "labels": r["labels"]} for r in rows]  # a map-style dataset (datasets not needed)
    bf16 = cfg["dtype"] == "bf16"
    model = AutoModelForCausalLM.from_pretrained(
        cfg["base"], dtype=torch.bfloat16 if bf16 else torch.float32)
    if _cuda():
        model.to("cuda")
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             target_modules=TARGETS, bias="none",
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=cfg["workdir"] + f"/peft_{'grouped' if grouped else 'random'}",
        per_device_train_batch_size=cfg["micro_batch"], gradient_accumulation_steps=1,
        max_steps=cfg["total_steps"], learning_rate=cfg["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=LOG_EVERY,
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=not _cuda(),
        bf16=bf16,
        dataloader_num_workers=0, seed=SEED, disable_tqdm=True,
        train_sampling_strategy="group_by_length" if grouped else "random")

    class Counting(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask, labels = inputs["attention_mask"], inputs["labels"]
            self._counts = (int(mask.sum()), int((labels[:, 1:] != -100).sum()), mask.numel())
            return super().training_step(model, inputs, num_items_in_batch)

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            rec.before_training()

        def on_step_end(self, args, state, control, **kw):
            tokens, sup, padded = trainer._counts
            rec.step(tokens, sup, padded, 1)

    trainer = Counting(model=model, args=args, train_dataset=train,
                       data_collator=DataCollatorForSeq2Seq(tok, padding=True,
                                                            label_pad_token_id=-100),
                       processing_class=tok, callbacks=[Timing()])
    result = trainer.train()
    rec.dump(out, {"n_train": len(rows), "train_loss": result.training_loss})
    sys.stdout.flush()
    os._exit(0)


def pace_argv(cfg: dict, mode: str) -> list[str]:
    quant = mode == "q"  # QLoRA: mode off on a 4-bit base
    argv = ["--recipe", cfg["recipe"], "--pace.mode", "off" if quant else mode,
            "--train.output_dir", f"{cfg['workdir']}/pace_{mode}", "--train.overwrite", "true"]
    return argv + (["--quant.bits", "4"] if quant else [])


def write_recipe(cfg: dict) -> None:
    import textwrap

    Path(cfg["recipe"]).write_text(textwrap.dedent(f"""\
        # written by bench/throughput.py
        model:
          name_or_path: {cfg['base']}
          dtype: {'bfloat16' if cfg['dtype'] == 'bf16' else 'float32'}
        lora:
          r: {LORA_R}
          alpha: {LORA_ALPHA}
          dropout: 0.0
          targets: attn+mlp
        pace:
          mode: "off"
          sigma: {SIGMA}
          consistency_weight: {LAMBDA}
          lazy_interval: 2
        data:
          task: gsm8k
          path: {cfg['data']}
          max_length: {cfg['max_length']}
          on_too_long: drop
          limit: {cfg['limit']}
        train:
          max_steps: {cfg['total_steps']}
          micro_batch_size: {cfg['micro_batch']}
          grad_accum: 1
          lr: {cfg['lr']}
          schedule: constant
          warmup_steps: 0
          weight_decay: 0.0
          max_grad_norm: 1.0
          precision: {cfg['dtype']}
          seed: {SEED}
          log_every: {LOG_EVERY}
        eval:
          every: 0
          at_start: false
          limit: 1
          batch_size: 1
          max_new_tokens: 1
        deepspeed: {REPO / 'ds_configs' / cfg['ds']}
        """))


# --------------------------------------------------------------------------- parent
def data_path(value: str) -> str:
    """--data as the children's data.path: an existing local path made absolute (the children
    run elsewhere), anything else (a hub id) passed through to pace_llm's reader as given."""
    local = Path(value).expanduser()
    return str(local.resolve()) if local.exists() else value


def run_child(args: list[str], log: Path, timeout: float) -> tuple[int, float, float]:
    """Run this script as a worker; returns (returncode, wall s, ru_maxrss MB)."""
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, __file__, *args], stdout=f, stderr=subprocess.STDOUT,
                             cwd=REPO, env=os.environ | {"PACE_BENCH_DEVICE": DEVICE})
        deadline = t + timeout
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                pid, status, usage = os.wait4(p.pid, 0)
                break
            time.sleep(0.2)
    rc = os.waitstatus_to_exitcode(status)
    p.returncode = rc
    return rc, time.perf_counter() - t, usage.ru_maxrss / 1024


def model_counts(build: dict) -> dict[str, int]:
    h, i, layers = build["hidden_size"], build["intermediate_size"], build["num_hidden_layers"]
    heads, kv = build["num_attention_heads"], build["num_key_value_heads"]
    hd = h // heads
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd),
              "o_proj": (heads * hd, h), "gate_proj": (h, i), "up_proj": (h, i),
              "down_proj": (i, h)}
    frozen = layers * sum(a * b for a, b in shapes.values())
    adapter = layers * sum(LORA_R * (a + b) for a, b in shapes.values())
    return {"frozen_linear": frozen, "adapter": adapter, "hidden": h}


def summarize(res: dict, cfg: dict, counts: dict, vocab: int) -> dict:
    w, n = cfg["warmup"], cfg["steps"]
    steps = res["steps"]
    window = steps[w:w + n]
    wall = window[-1]["end"] - steps[w - 1]["end"]
    tokens = sum(s["tokens"] for s in window)
    padded = sum(s["padded"] for s in window)
    per_tok = 4 * counts["frozen_linear"] + 6 * counts["adapter"]
    flops = sum(s["views"] * (s["tokens"] * per_tok + s["supervised"] * 4 * counts["hidden"] * vocab)
                for s in window)
    durations = [b["end"] - a["end"] for a, b in zip(steps[w - 1:w + n - 1], window)]
    numbered = list(zip(range(w + 1, w + n + 1), durations, window))
    logging = [(d, s["tokens"]) for k, d, s in numbered if k % LOG_EVERY == 0]
    plain = [(d, s["tokens"]) for k, d, s in numbered if k % LOG_EVERY]
    mem = res["mem"]
    gpu = ({"gpu_peak_mb": max(mem["gpu_load_peak_mb"], mem["gpu_train_peak_mb"]),
            "gpu_train_peak_mb": mem["gpu_train_peak_mb"]} if "gpu_train_peak_mb" in mem else {})
    return {**gpu,"tokens_per_s": tokens / wall, "step_s": wall / n, "tokens": tokens,
            "padding_frac": 1 - tokens / padded if padded else 0.0,
            "flops_per_s": flops / wall,
            "median_step_s": statistics.median(durations),
            "plain_s": sum(d for d, _ in plain), "plain_tokens": sum(t for _, t in plain),
            "logging_s": sum(d for d, _ in logging), "logging_tokens": sum(t for _, t in logging),
            "peak_rss_mb": max(mem["load_hwm_mb"], mem["train_hwm_mb"]),
            "train_delta_mb": mem["train_hwm_mb"] - mem["rss_before_train_mb"],
            "rss_before_train_mb": mem["rss_before_train_mb"], "setup_s": res["setup_s"],
            "last_step_s": steps[-1]["end"] - steps[-2]["end"]}


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split()[1]
    return (f"{cpu}, {os.cpu_count()} cores visible, {int(mem) / 2 ** 20:.0f} GiB RAM, "
            f"Python {platform.python_version()}")


def gpu_name() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], check=False, capture_output=True,
                         text=True)
    return out.stdout.strip() or "an unnamed GPU"


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in
                     ("torch", "transformers", "peft", "deepspeed", "accelerate", "sentencepiece"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=["build", "matmul", "pace", "peft"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--data", default=DEFAULT_DATA,
                    help="GSM8K: a hub dataset id (default %(default)s) or a local train.jsonl "
                         "or directory (pace_llm's data.path)")
    ap.add_argument("--limit", type=int, default=2000, help="GSM8K train rows used")
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="measured steps per contender")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--workdir", default="/tmp/pace_llm_throughput",
                    help="base model, recipe, run dirs, logs (outside the repo)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per contender process")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--ds", default="zero0.json", help="pace_llm's DeepSpeed JSON in ds_configs/")
    ap.add_argument("--profile", action="store_true",
                    help="profile 3 steps per contender into <workdir>/profile_<c>.txt (timings "
                         "of such a run include the profiler: not for the figures)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="base checkpoint dtype and training precision (bf16 on a GPU)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the GPU's dense bf16 datasheet peak, for MFU (H100/H200 SXM: 989)")
    ap.add_argument("--write-results", action="store_true",
                    help=f"append the figures to bench/RESULTS.md under '{HEADING}'")
    a = ap.parse_args()

    global DEVICE
    DEVICE = a.device
    if a.worker:
        cfg = json.loads(Path(a.config).read_text())
        if a.worker == "build":
            worker_build(cfg)
        elif a.worker == "matmul":
            worker_matmul(a.out)
        elif a.worker == "pace":
            worker_pace(cfg, a.mode, a.out)
        else:
            worker_peft(cfg, a.mode == "grouped", a.out)
        return

    build = {"model_type": "llama", "hidden_size": a.hidden, "intermediate_size": a.intermediate,
             "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
             "num_key_value_heads": a.kv_heads or a.heads, "max_position_embeddings": max(1024, a.max_length),
             "vocab_size": a.vocab, "tie_word_embeddings": False}
    key = hashlib.sha1(json.dumps([build, a.dtype], sort_keys=True).encode()).hexdigest()[:10]
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = {"data": data_path(a.data), "limit": a.limit, "build": build,
           "base": str(work / f"base-{key}"), "recipe": str(work / "recipe.yaml"),
           "workdir": str(work), "micro_batch": a.micro_batch, "max_length": a.max_length,
           "lr": a.lr, "warmup": a.warmup, "steps": a.steps, "dtype": a.dtype, "ds": a.ds,
           "total_steps": a.warmup + a.steps + 1}
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    write_recipe(cfg)
    command = "OMP_NUM_THREADS={} python bench/throughput.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "<unset>"), " ".join(sys.argv[1:]))
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load_start = os.getloadavg()
    started = time.perf_counter()

    if not (Path(cfg["base"]) / "config.json").is_file():
        print(f"building tokenizer + base model in {cfg['base']} ...", flush=True)
        rc, wall, _ = run_child(["--worker", "build", "--config", str(cfg_path)],
                                work / "build.log", a.timeout)
        if rc:
            sys.exit(f"base build failed (rc {rc}); see {work / 'build.log'}")
        print(f"  built in {wall:.0f} s", flush=True)
    base_cfg = json.loads((Path(cfg["base"]) / "config.json").read_text())
    vocab = base_cfg["vocab_size"]
    counts = model_counts(build)
    total_params = counts["frozen_linear"] + 2 * a.hidden * vocab + (2 * a.layers + 1) * a.hidden

    def matmul(tag: str) -> list[float]:
        out = work / f"matmul_{tag}.json"
        rc, _, _ = run_child(["--worker", "matmul", "--out", str(out), "--config", str(cfg_path)],
                             work / f"matmul_{tag}.log", a.timeout)
        if rc:
            sys.exit(f"matmul probe failed; see {work / f'matmul_{tag}.log'}")
        return json.loads(out.read_text())["flops"]

    mm = matmul("before")
    contenders = a.contenders.split(",")
    results: dict[str, list[dict]] = {c: [] for c in contenders}
    for r in range(a.repeats):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for c in order:
            out = work / f"result_{c}_{r}.json"
            out.unlink(missing_ok=True)
            if c.startswith("b"):
                wargs = ["--worker", "peft", "--mode", "grouped" if c == "b-grouped" else "random"]
            else:
                wargs = ["--worker", "pace", "--mode",
                         {"a": "off", "c": "full", "d": "lazy", "q": "q"}[c]]
            log = work / f"log_{c}_{r}.txt"
            if a.profile:
                os.environ["PACE_BENCH_PROFILE"] = str(work / f"profile_{c}.txt")
            rc, wall, maxrss = run_child([*wargs, "--out", str(out), "--config", str(cfg_path)],
                                         log, a.timeout)
            if rc or not out.is_file():
                sys.exit(f"contender {c} (repeat {r + 1}) failed, rc {rc}; see {log}")
            s = summarize(json.loads(out.read_text()), cfg, counts, vocab)
            s["process_wall_s"], s["ru_maxrss_mb"] = wall, maxrss
            results[c].append(s)
            gpu = f"GPU peak {s['gpu_peak_mb']:6.0f} MB  " if "gpu_peak_mb" in s else ""
            print(f"[repeat {r + 1}] {c:9s} {DESCRIBE[c]:22s} {s['tokens_per_s']:7.1f} tok/s  "
                  f"step {s['step_s']:6.3f} s  peak RSS {s['peak_rss_mb']:6.0f} MB  {gpu}"
                  f"(process {wall:.0f} s)", flush=True)
    mm += matmul("after")
    peak = max(mm)
    load_end = os.getloadavg()
    elapsed = time.perf_counter() - started

    report = render(a, cfg, results, counts, vocab, total_params, mm, peak, command, date,
                    load_start, load_end, elapsed)
    print("\n" + report)
    if a.write_results:
        append_results(report)
        print(f"appended to {REPO / 'bench' / 'RESULTS.md'}")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def render(a, cfg, results, counts, vocab, total_params, mm, peak, command, date, load_start,
           load_end, elapsed) -> str:
    def agg(c, k):
        return _mean([s[k] for s in results[c]])

    def per_repeat_ratio(x, y, k):
        return [sx[k] / sy[k] for sx, sy in zip(results[x], results[y])]

    gpu = a.device == "cuda"
    L = []
    L.append(f"### Run of {date}{' (GPU)' if gpu else ''}\n")
    L.append(f"Command: `{command}` (from the repository root). Date: {date}. Machine: "
             f"{machine()}; load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at "
             f"the end (the cores are shared with other jobs). {versions()}. Whole run "
             f"{elapsed / 60:.1f} min.\n")
    L.append(f"Workload: GSM8K train rows 1-{cfg['limit']} (paper prompt, rows over "
             f"{cfg['max_length']} tokens dropped), sentencepiece BPE tokenizer of {vocab} pieces "
             f"trained on the GSM8K train text; random-init Llama hidden {a.hidden}, {a.layers} "
             f"layers, {a.heads} heads, intermediate {a.intermediate}, untied lm_head, "
             f"{total_params / 1e6:.1f}M parameters ({counts['frozen_linear'] / 1e6:.1f}M in "
             f"block linears); {a.dtype} on {gpu_name() if gpu else 'the CPU'}; LoRA r {LORA_R} alpha {LORA_ALPHA} on "
             f"q/k/v/o/gate/up/down ({counts['adapter'] / 1e6:.2f}M adapter parameters); "
             f"micro-batch {a.micro_batch}, no accumulation, AdamW lr {a.lr} constant; "
             f"{a.warmup} warmup + {a.steps} measured + 1 final optimizer steps per contender "
             f"(logging every {LOG_EVERY}), {a.repeats} repeats, each contender a fresh process, "
             f"order alternating per repeat. PACE: σ {SIGMA}, λ {LAMBDA}, lazy interval 2. "
             + (f"bf16 matmul (8192³, 10 per timing, best of 5): {min(mm) / 1e12:.0f}-"
                f"{peak / 1e12:.0f} TFLOP/s; datasheet dense bf16 peak {a.peak_tflops:.0f} TFLOP/s. "
                if gpu else
                f"fp32 matmul (2048², best of 5): {min(mm) / 1e9:.1f}-{peak / 1e9:.1f} GFLOP/s; "
                f"peak used {peak / 1e9:.1f}. ") + "MB = 2^20 bytes.\n")
    if gpu:
        L.append("| contender | tokens/s | step s | median step s | padding | GPU peak MB | GPU "
                 "train peak MB | peak RSS MB | model TFLOP/s | MFU (datasheet) | MFU (measured mm) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    else:
        L.append("| contender | tokens/s | step s | median step s | padding | peak RSS MB | train Δ "
                 "MB | model GFLOP/s | MFU |")
        L.append("|---|---|---|---|---|---|---|---|---|")

    def row(label, get, bold=False):
        b = "**" if bold else ""
        head = (f"| {label} | {b}{get('tokens_per_s'):.1f}{b} | {b}{get('step_s'):.3f}{b} | "
                f"{get('median_step_s'):.3f} | {100 * get('padding_frac'):.1f}% | ")
        if gpu:
            return head + (f"{b}{get('gpu_peak_mb'):.0f}{b} | {get('gpu_train_peak_mb'):.0f} | "
                           f"{get('peak_rss_mb'):.0f} | {get('flops_per_s') / 1e12:.1f} | "
                           f"{100 * get('flops_per_s') / (a.peak_tflops * 1e12):.1f}% | "
                           f"{100 * get('flops_per_s') / peak:.1f}% |")
        return head + (f"{b}{get('peak_rss_mb'):.0f}{b} | {get('train_delta_mb'):.0f} | "
                       f"{get('flops_per_s') / 1e9:.1f} | {100 * get('flops_per_s') / peak:.1f}% |")

    for c in results:
        for r, s in enumerate(results[c]):
            L.append(row(f"({c}) {DESCRIBE[c]}, repeat {r + 1}", s.__getitem__))
        L.append(row(f"**({c}) mean**", lambda k, c=c: agg(c, k), bold=True))
    L.append("")
    L.append("MFU uses the useful-FLOP formula of the script's docstring for every contender "
             "(PACE-paired steps doubled); PEFT also computes logits at unsupervised and padding "
             "positions, which is not counted. Padding = padded positions not in the attention "
             "mask, as a share of all positions run.\n")

    rows = []

    def ratio(name, x, y, k, target, better):
        if x not in results or y not in results:
            return
        per = per_repeat_ratio(x, y, k)
        mean = agg(x, k) / agg(y, k)
        ok = mean >= target if better == ">=" else mean <= target
        rows.append(f"| {name} | {mean:.2f} | {', '.join(f'{p:.2f}' for p in per)} | "
                    f"{better} {target} | {'met' if ok else 'missed'} |")

    # issue #14's targets: on a GPU off >= 1.3x PEFT and full/off <= 1.8 (host-bound steps
    # made lean); on a CPU, compute-bound, off >= 1.0x grouped PEFT and full/off <= 2.05
    # (a doubled batch is 2x the FLOPs)
    ratio("(a)/(b) tokens/s", "a", "b", "tokens_per_s", 1.3, ">=")
    ratio("(a)/(b-grouped) tokens/s", "a", "b-grouped", "tokens_per_s", 1.3 if gpu else 1.0, ">=")
    ratio("(c)/(a) step time", "c", "a", "step_s", 1.8 if gpu else 2.05, "<=")
    ratio("(d)/(a) step time", "d", "a", "step_s", 1.1, "<=")
    if gpu:
        ratio("(c)/(a) GPU peak memory", "c", "a", "gpu_peak_mb", 1.7, "<=")
        ratio("(c)/(a) GPU peak during training", "c", "a", "gpu_train_peak_mb", 1.7, "<=")
        ratio("(q)/(a) GPU peak memory (QLoRA / LoRA)", "q", "a", "gpu_peak_mb", 0.4, "<=")
    else:
        ratio("(c)/(a) peak RSS (whole process)", "c", "a", "peak_rss_mb", 1.7, "<=")
        ratio("(c)/(a) training Δ RSS", "c", "a", "train_delta_mb", 1.7, "<=")
    L.append("| ratio | of the means | per repeat | target | |")
    L.append("|---|---|---|---|---|")
    L += rows
    L.append("")
    extra = []
    for c in ("a", "c", "d"):
        if c in results and agg(c, "plain_tokens") and agg(c, "logging_tokens"):
            extra.append(f"({c}) {1000 * agg(c, 'plain_s') / agg(c, 'plain_tokens'):.2f} ms/token "
                         f"on non-logging steps vs "
                         f"{1000 * agg(c, 'logging_s') / agg(c, 'logging_tokens'):.2f} on logging steps")
    if extra:
        L.append("pace_llm time per non-padding token, non-logging vs logging steps of the window "
                 "(a logging step adds the clean-gradient-norm forward/backward): "
                 + "; ".join(extra) + ".")
        if "c" in results and "a" in results and agg("a", "plain_s"):
            L.append(f"(c)/(a) time on the same non-logging steps (identical batches): "
                     f"{agg('c', 'plain_s') / agg('a', 'plain_s'):.2f}.")
        L.append("")
    return "\n".join(L)


def append_results(report: str, heading: str = HEADING) -> None:
    """Append a report to bench/RESULTS.md under its heading (a new section at the end)."""
    path = REPO / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Measured figures\n"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{report}\n"
    else:
        start = text.index(heading) + len(heading)
        nxt = text.find("\n## ", start)
        end = len(text) if nxt < 0 else nxt + 1
        section = text[:end].rstrip("\n") + f"\n\n{report}\n"
        text = section + ("\n" + text[end:] if nxt >= 0 else "")
    path.write_text(text)


if __name__ == "__main__":
    main()
