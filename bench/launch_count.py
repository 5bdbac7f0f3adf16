"""Kernel launches and host syncs per optimizer step, by source: pace_llm (``pace.mode off`` /
``full``, DeepSpeed ZeRO-0/1/2) against HF PEFT + transformers ``Trainer``, on one workload, bf16
and fp32, counted on the CPU as the proxy for CUDA kernel launches (issue #14 item 1).

    OMP_NUM_THREADS=1 python bench/launch_count.py [--data DIR] [--write-results]   # ~10 min
    OMP_NUM_THREADS=1 python bench/launch_count.py --dry-run      # 2 layers, 1 step each, < 1 min

Workload: bench/throughput.py's, imported from it, not copied: its base builder (a sentencepiece
BPE tokenizer of ``--vocab`` pieces trained on the GSM8K train text, a random-init Llama saved in
the run's dtype), its pace_llm recipe (``write_recipe`` / ``pace_argv``: LoRA r 16 alpha 32 on
q/k/v/o/gate/up/down, σ 0.5, λ 0.02, AdamW lr 2e-4 constant, clip 1.0, no evaluation) and its
PEFT + Trainer contender (``worker_peft``: ``bf16=True`` or fp32, adamw_torch_fused), run
unchanged: its ``Recorder`` is replaced by this script's counter and its logging interval is
raised past the run (throughput.LOG_EVERY). Default model: 20 layers, hidden 256, 4 heads,
intermediate 512, 512-piece vocabulary = 280 adapter tensors; micro-batch 4, no accumulation,
one process. ``--data``: the hub id (default) or a local GSM8K train.jsonl / directory; the dry
run uses the repository's 100-row test fixture. Each contender and configuration runs in a fresh
subprocess, one after another, on the CPU also on a GPU machine (``CUDA_VISIBLE_DEVICES=''``,
``DS_ACCELERATOR=cpu``): the dry run is the GPU suite's proof that the counter starts.

Window: torch.profiler (``ProfilerActivity.CPU``, ``with_stack=True``) from the end of optimizer
step ``--skip`` (default 2: the first steps build caches and optimizer state) to the end of step
``--skip + --steps``, started and stopped in the trainer's step-end hook (pace_llm's
``on_step_end``, the Trainer's ``on_step_end`` callback via throughput's Recorder). The window
holds exactly ``--steps`` whole loop iterations: data collation, forward, backward, reduction,
optimizer, scheduler, the loop's bookkeeping (pace_llm's stop-signal check, the Trainer's
callbacks). Figures are per optimizer step (window / steps).

What counts as a launch: a *top-level* op (an ``aten::`` or ``c10d::`` op not called from inside
another aten op; inside an autograd node of the backward pass the node's ops are top-level) whose
subtree does work. Ops that only make views, read metadata or allocate (``view``, ``t``,
``reshape`` without a copy, ``detach``, ``empty``, ``to`` / ``contiguous`` returning their input,
...: NO_KERNEL below) are not launches. One top-level op is one launch however many ops it runs
inside: ``aten::linear`` (addmm), ``aten::cross_entropy_loss`` (log_softmax + nll_loss: two
kernels on a GPU), ``aten::index`` with a bool mask (nonzero + index), a ``_foreach_*`` /
``_fused_*`` op (the CPU runs it tensor by tensor; CUDA runs one multi-tensor kernel per chunk of
tensors), ``c10d::allreduce_`` (one NCCL kernel). An op that re-dispatches itself is not
counted itself, its children are the top-level ops: autocast (PEFT's bf16) runs ``aten::linear``
as casts of its inputs (kernels on a GPU too) plus the inner ``aten::linear``; a few CPU ops call
their own out= variant (one launch either way). Where the CPU run differs from a GPU run:
  - torch optimizers with ``foreach=None`` take the multi-tensor path as on CUDA (patched here:
    the CPU default is a per-tensor loop); nothing else is patched.
  - host-side work of a GPU run is reported apart ("host", not in any figure): batch collation
    and the token counts of the collated CPU batch (pace_llm/data/, pace_llm/trainer.py
    ``_tokens``/``_collate``, pace_llm/objective.py ``doubled``, transformers' collators and
    tokenizer padding, the Trainer's ``_get_num_items_in_batch`` comprehensions,
    torch/utils/data) and torch optimizers' ``_get_value`` (non-capturable, non-fused step
    counters are CPU tensors).
  - host→device copies are no-ops on a CPU: a ``Tensor.to(...)`` / ``torch.tensor(...)`` call
    that does no work at a site that moves host data to the device (pace_llm's ``_forward``
    batch move and ``distributed.all_reduce`` scalars, the Trainer's ``_prepare_input`` and
    ``_get_num_items_in_batch``) counts as one launch (glue, "h2d").
``--dump`` writes every top-level op with its category and Python stack to
``<workdir>/ops_<config>.tsv``.

Host syncs (ops that make the host wait for the device on a GPU): ``aten::_local_scalar_dense``
(``.item()``, ``float()``/``int()``/``bool()`` of a tensor, ``aten::is_nonzero``), ``aten::nonzero``
(also inside boolean-mask indexing ``aten::index`` and its backward ``index_put_``),
``aten::masked_select``, ``aten::unique*``, and the Python calls ``Tensor.tolist()``, ``.cpu()``,
``.numpy()`` (on a CPU they run no aten op; the profiler's Python tracer records the call). Each
is counted once (a ``nonzero`` inside a ``masked_select`` is one sync); reads inside a
``_fused_*`` / ``_foreach_*`` op are the CPU kernel's own (CUDA's read the device) and do not
count; reads of host-side tensors (above) are listed as "not counted".

Attribution, per top-level op (and per sync): walk from the op up through its callers (the
profiler's event tree: Python frames, autograd nodes, record_function ranges); the innermost
caller that a rule below names decides. Frames no rule names (torch internals, builtins, the
standard library) are passed through.
    forward        transformers (models, masking, sdpa integration; not trainer*/loss/data),
                   peft/ outside peft/tuners; and everything inside a LoRA layer's *base* layer
                   (the frozen W0 x: a ``record_function`` range this script opens around the
                   base layer of every pace_llm NoisyLoRALinear and PEFT LoRA layer)
    LoRA           pace_llm/lora.py; peft/tuners/ (PEFT's LoRA layers: A, B, scaling, add, casts)
    noise          pace_llm/noise.py (the one draw per forward: a normal_ per row, z = 1 + σ·ε,
                   the cast); pace_llm/lora.py ``NoisyLoRALinear.noise`` (a layer's own draw
                   outside a noise block) and the first aten op after a ``noise()`` call in
                   ``forward`` (the multiply by z). The shared z is applied by the adapter add
                   (``addcmul``): LoRA
    objective      pace_llm/objective.py (supervised-position gather, lm_head on those rows,
                   cross-entropy, consistency); transformers/loss (PEFT's loss)
    backward       inside an autograd node (``autograd::engine::evaluate_function``) with no
                   named frame below it (the backward pass, AccumulateGrad included);
                   torch/autograd (the loss gradient seed)
    reduction      deepspeed/comm, torch/distributed, and DeepSpeed functions that move
                   gradients into / out of reduction buckets (names with reduce, ipg, bucket,
                   average_tensor, copy_grads_in_partition); DeepSpeed's gradient hooks run
                   inside the backward pass and count here, not as backward
    overflow       DeepSpeed functions named *overflow*, *inf_or_nan*, *nan_or_inf*, *has_inf*,
                   *invalid* (is_invalid_grad_norm)
    norm           DeepSpeed functions with "norm" in the name (not "clip"); torch.norm
                   (torch/functional.py) anywhere, also inside a clip function; torch/nn/utils/
                   clip_grad.py outside clip_grads_with_norm_; pace_llm/trainer.py
                   _grad_norm_before_step; pace_llm/flat_optim.py _global_norm
    clip           DeepSpeed functions with "clip" in the name; torch/nn/utils/clip_grad.py
                   clip_grads_with_norm_; pace_llm/flat_optim.py _clip_scale
    optimizer      torch/optim (the step, the scheduler); pace_llm/flat_optim.py (the flat
                   path: gradient folds, skip flag, fused step, copy back); everything else in DeepSpeed's
                   runtime/fp16, runtime/bf16_optimizer, runtime/zero (the wrapper: fp32
                   master copies, flattening, the copy back to the bf16 weights, loss scaling)
    glue           everything else: pace_llm's trainer and distributed helpers (its scalar
                   all_reduce of the loss statistics), DeepSpeed's engine bookkeeping,
                   transformers' Trainer loop, accelerate, h2d copies
    bench          ops issued by this script or bench/throughput.py themselves (throughput's
                   Trainer subclass counts tokens with two ``int(tensor.sum())``): excluded
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import throughput as TP  # bench/throughput.py: the workload's builders

TP.LOG_EVERY = 10 ** 6  # read by write_recipe and worker_peft: no logging step in the run

HEADING = "## Launches and host syncs per step (bench/launch_count.py)"
CATEGORIES = ["forward", "LoRA", "noise", "objective", "backward", "reduction", "overflow", "norm",
              "clip", "optimizer", "glue"]
DESCRIBE = {"off": "pace_llm off", "full": "pace_llm full", "peft": "PEFT + Trainer"}
BASE_MARK = "pace_bench::base_layer"
STEP_MARK = "pace_bench::step_end"

# ops that make views, read metadata or allocate: no kernel on a GPU
NO_KERNEL = {
    "aten::" + n for n in (
        "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_",
        "resize_as_", "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided",
        "as_strided_", "t", "transpose", "transpose_", "permute", "expand", "expand_as",
        "unsqueeze", "unsqueeze_", "squeeze", "squeeze_", "slice", "select", "narrow", "split",
        "split_with_sizes", "unbind", "chunk", "unflatten", "flatten", "view_as", "detach",
        "detach_", "alias", "lift_fresh", "lift", "to", "contiguous", "resolve_conj",
        "resolve_neg", "_has_compatible_shallow_copy_type", "set_", "requires_grad_",
        "retain_grad", "size", "stride", "dim", "numel", "is_same_size", "result_type",
        "can_cast", "promote_types", "diagonal", "movedim", "swapaxes", "unfold", "record_stream",
        "_version", "output_nr", "is_leaf", "_is_view", "data", "is_floating_point",
        "is_complex", "sym_size", "sym_stride", "sym_numel", "_nested_tensor_size",
        "view_as_real", "view_as_complex", "_conj", "conj", "_neg_view", "align_tensors",
        "broadcast_tensors", "split_with_sizes_copy", "numpy_T", "matrix_H", "mT", "T",
        "_unsafe_split", "unsafe_split", "unsafe_chunk", "_autocast_to_reduced_precision",
        "_autocast_to_full_precision")}
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique",
            "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive"}
SYNC_CALLS = re.compile(r"^<built-in method (tolist|cpu|numpy) of Tensor object")
FRAME = re.compile(r"^(?P<path>.+)\((?P<line>\d+)\): (?P<func>.+)$")
REDUCE_FN = re.compile(r"reduce|ipg|bucket|average_tensor|copy_grads_in_partition")


# --------------------------------------------------------------------------- attribution
def short_path(path: str) -> str:
    """A frame's file relative to site-packages or the repository (bench/ files are recorded
    relative to their folder, the first entry of sys.path)."""
    for mark in ("site-packages/", "dist-packages/"):
        if mark in path:
            return path.split(mark, 1)[1]
    if "/" not in path and (BENCH / path).is_file():
        return "bench/" + path
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


# host-side code of a GPU run: the batch is collated and counted on the CPU before it is moved
HOST = {"pace_llm/data/": None, "pace_llm/trainer.py": {"_tokens", "_collate"},
        "pace_llm/objective.py": {"doubled"},
        "transformers/trainer.py": {"_get_num_items_in_batch/<genexpr>",
                                    "_get_num_items_in_batch/<listcomp>"},
        "transformers/tokenization_utils_base.py": None, "transformers/data/": None,
        "torch/utils/data/": None,
        "torch/optim/optimizer.py": {"_get_value"}}  # non-capturable step counters: CPU tensors
# sites that copy host data to the device on a GPU (`.to(device)` of the batch, torch.tensor on
# the device): a CPU no-op there counts as one launch
H2D = {"pace_llm/trainer.py:_forward", "pace_llm/distributed.py:all_reduce",
       "transformers/trainer.py:_prepare_input", "transformers/trainer.py:_get_num_items_in_batch"}
H2D_CALLS = re.compile(r"^<built-in method (to|tensor) of ")


# frame_rule's last word: the first of these prefixes of the path decides, whatever the function
PREFIX_RULES = (("pace_llm/noise.py", "noise"), ("pace_llm/objective.py", "objective"),
                ("pace_llm/", "glue"), ("peft/tuners/", "LoRA"), ("peft/", "forward"),
                ("transformers/loss/", "objective"), ("transformers/trainer", "glue"),
                ("transformers/", "forward"), ("accelerate/", "glue"),
                ("torch/optim/", "optimizer"), ("torch/distributed/", "reduction"))


def frame_rule(path: str, func: str) -> str | None:
    """The category a Python frame decides, or None (the frame is passed through). ``func`` is
    the function, or ``outer/<genexpr>`` for a comprehension."""
    if path.startswith("bench/"):
        return "bench"
    for prefix, funcs in HOST.items():
        if path.startswith(prefix) and (funcs is None or func in funcs
                                        or func.split("/")[0] in funcs):
            return "host"
    if path == "pace_llm/lora.py":
        return "noise" if func == "noise" else "LoRA"
    if path == "pace_llm/trainer.py" and func == "_grad_norm_before_step":
        return "norm"
    if path == "pace_llm/flat_optim.py":  # the flat path's norm, clip scale, step and folds
        return {"_global_norm": "norm", "_clip_scale": "clip"}.get(func, "optimizer")
    if path.startswith("torch/nn/utils/clip_grad.py"):
        return "clip" if "clip_grads_with_norm" in func else "norm"
    if path == "torch/functional.py" and func == "norm":
        return "norm"  # torch.norm inside a clip function
    if path.startswith("torch/autograd/") and not path.startswith("torch/autograd/profiler"):
        return "backward"  # the gradient seed (ones_like) of loss.backward()
    if path.startswith("deepspeed/"):
        return deepspeed_rule(path, func)
    return next((category for prefix, category in PREFIX_RULES if path.startswith(prefix)), None)


def deepspeed_rule(path: str, func: str) -> str | None:
    name = func.lower()
    if path.startswith("deepspeed/comm/"):
        return "reduction"
    if re.search(r"overflow|inf_or_nan|nan_or_inf|has_inf|invalid", name):
        return "overflow"
    if "clip" in name:
        return "clip"
    if "norm" in name:
        return "norm"
    if REDUCE_FN.search(name):
        return "reduction"
    if re.match(r"deepspeed/runtime/(fp16|bf16_optimizer|zero|base_optimizer)", path):
        return "optimizer"
    if path.startswith("deepspeed/"):
        return "glue"
    return None


def parse_frame(name: str, outer: tuple[str, str] | None) -> tuple[str, str] | None:
    """(path, function) of a Python-frame event; a comprehension is named outer/<genexpr>."""
    if name.startswith("<"):
        return None
    m = FRAME.match(name)
    if not m:
        return None
    path, func = short_path(m["path"]), m["func"]
    if func.startswith("<") and outer is not None and outer[0] == path:
        func = outer[1].split("/")[0] + "/" + func
    return path, func


def is_op(name: str) -> bool:
    return name.startswith(("aten::", "c10d::"))


def analyze(events, steps: int, dump=None) -> dict:
    """Launches and syncs per category (per step) from a profiler's event list."""
    launches = collections.Counter()
    syncs = collections.Counter()
    sites = collections.Counter()
    by_op = collections.Counter()
    other = collections.Counter()  # host ops, host reads, bench ops, h2d copies

    def subtree(e):
        stack = [e]
        while stack:
            x = stack.pop()
            yield x
            stack.extend(x.cpu_children)

    def works(e) -> bool:
        return any(is_op(x.name) and x.name not in NO_KERNEL for x in subtree(e))

    def site(frames) -> str:
        return f"{frames[-1][0]}:{frames[-1][1]}" if frames else "?"

    def sync_ops(op):
        """Sync ops in op's subtree, each once, none inside a CPU multi-tensor kernel."""
        found, stack = [], [(op, False)]
        while stack:
            x, inside = stack.pop()
            if x.name in SYNC_OPS and not inside:
                found.append(x.name)
            fused = x.name.startswith(("aten::_foreach_", "aten::_fused_"))
            stack.extend((c, inside or fused or x.name in SYNC_OPS) for c in x.cpu_children)
        return found

    def add_sync(cat, where, what):
        if cat == "host":
            other["host reads"] += 1
        elif cat == "bench":
            other["bench reads"] += 1
        else:
            syncs[cat] += 1
        sites[(cat, where, what)] += 1

    ends = sorted(e.time_range.start for e in events if e.name == STEP_MARK)
    per_step = collections.Counter()  # launches per step of the window (a check: all equal)

    def step_of(e) -> int:
        return sum(1 for t in ends if t < e.time_range.start)

    roots = sorted((e for e in events if e.cpu_parent is None), key=lambda e: e.time_range.start)
    # (event, category decided so far, named frames so far, category of the autograd node)
    stack = [(r, "glue", ()) for r in reversed(roots)]
    while stack:
        e, cat, frames = stack.pop()
        name = e.name
        if is_op(name) and any(c.name == name for c in e.cpu_children):
            # autocast: the op re-dispatches itself after casting its inputs (aten::to children,
            # kernels on a GPU too): its children are the top-level ops
            other["autocast wrappers"] += 1
            if dump is not None:
                dump.write(f"{cat}\t{name} (wrapper)\t0\t"
                           + " < ".join(f"{p}:{f}" for p, f in reversed(frames))[:800] + "\n")
            stack.extend((c, cat, frames) for c in
                         sorted(e.cpu_children, key=lambda c: c.time_range.start, reverse=True))
            continue
        if is_op(name):
            work = works(e)
            for s in sync_ops(e):
                add_sync(cat, site(frames), s)
            if cat in ("bench", "host"):
                other[f"{cat} ops"] += work
            elif work:
                launches[cat] += 1
                by_op[(cat, name)] += 1
                per_step[step_of(e)] += 1
            if dump is not None:
                dump.write(f"{cat}\t{name}\t{int(work)}\t"
                           + " < ".join(f"{p}:{f}" for p, f in reversed(frames))[:800] + "\n")
            continue
        call = SYNC_CALLS.match(name)
        if call:
            add_sync(cat, site(frames), call[1] + "()")
        if H2D_CALLS.match(name) and site(frames).split("/<")[0] in H2D and not works(e):
            launches["glue"] += 1
            per_step[step_of(e)] += 1
            other["h2d copies"] += 1
            by_op[("glue", "h2d copy")] += 1
            if dump is not None:
                dump.write(f"glue\th2d {name[:40]}\t1\t{site(frames)}\n")
        here = cat
        sub = frames
        if name.startswith("autograd::engine::evaluate_function"):
            here = "backward"
            sub = frames + (("autograd", name.split(": ", 1)[-1]),)  # names the sync site
        elif name == BASE_MARK:
            here = "forward"
        frame = parse_frame(name, frames[-1] if frames else None)
        if frame is not None:
            sub = frames + (frame,)
            rule = frame_rule(*frame)
            here = rule or cat
        kids = sorted(e.cpu_children, key=lambda c: c.time_range.start)
        items = []
        after_noise = False
        lora_forward = frame == ("pace_llm/lora.py", "forward")
        for c in kids:
            kc = here
            if lora_forward:
                if c.name.endswith(": noise") and "pace_llm/lora.py" in c.name:
                    after_noise = True
                elif is_op(c.name) and after_noise:
                    kc, after_noise = "noise", False  # delta * z
            items.append((c, kc, sub))
        stack.extend(reversed(items))

    return {"launches": {c: launches[c] / steps for c in CATEGORIES},
            "syncs": {c: syncs[c] / steps for c in CATEGORIES},
            "total": sum(launches[c] for c in CATEGORIES) / steps,
            "total_syncs": sum(syncs[c] for c in CATEGORIES) / steps,
            "other": {k: v / steps for k, v in other.items()},
            "per_step": [per_step[i] for i in range(steps)],
            "sync_sites": sorted(([c, s, op, n / steps] for (c, s, op), n in sites.items()),
                                 key=lambda x: -x[3]),
            "top_ops": [[c, op, n / steps] for (c, op), n in by_op.most_common(60)]}


# --------------------------------------------------------------------------- workers
class Counter:
    """Starts torch.profiler at the end of step ``skip``, stops it at the end of step
    ``skip + steps``, writes the analysis and ends the process."""

    def __init__(self, cfg: dict, out: str):
        self.skip, self.steps, self.out = cfg["skip"], cfg["steps"], out
        self.dump = cfg.get("dump")
        self.prof = None
        self.t0 = None

    def step_done(self, done: int) -> None:
        import torch

        if self.prof is not None and self.skip < done < self.skip + self.steps:
            with torch.profiler.record_function(STEP_MARK):
                pass
        if done == self.skip:
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True)
            self.prof.start()
            self.t0 = time.perf_counter()
        elif done == self.skip + self.steps and self.prof is not None:
            self.prof.stop()
            window = time.perf_counter() - self.t0
            t = time.perf_counter()
            events = self.prof.events()
            if self.dump:
                with open(self.dump, "w") as f:
                    res = analyze(events, self.steps, f)
            else:
                res = analyze(events, self.steps)
            res["window_s"] = window
            res["analysis_s"] = time.perf_counter() - t
            Path(self.out).write_text(json.dumps(res))
            sys.stdout.flush()
            os._exit(0)


def mark_base_layers(bases) -> int:
    """A record_function range around every base layer's forward (the frozen W0 x)."""
    from torch.autograd.profiler import record_function

    n = 0
    for m in bases:
        def pre(mod, args):
            mod._pace_bench_range = record_function(BASE_MARK)
            mod._pace_bench_range.__enter__()

        def post(mod, args, output):
            mod._pace_bench_range.__exit__(None, None, None)

        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)
        n += 1
    return n


def gpu_defaults() -> None:
    """torch optimizers with foreach=None take the multi-tensor path, as on CUDA."""
    import torch.optim.optimizer as O

    devices = O._get_foreach_kernels_supported_devices
    O._get_foreach_kernels_supported_devices = lambda: [*devices(), "cpu"]


def worker_pace(cfg: dict, mode: str, out: str) -> None:
    """pace_llm's own story (train.started -> trainer.train) with throughput.py's recipe."""
    from pace_llm import setup as S
    from pace_llm.config import load_recipe
    from pace_llm.lora import lora_layers

    gpu_defaults()
    counter = Counter(cfg, out)
    recipe = load_recipe(TP.pace_argv(cfg, mode))
    with S.started(recipe) as trainer:
        n = mark_base_layers(m.base for _, m in lora_layers(trainer.stepper.module))
        print(f"[launch_count] {n} adapted layers, {2 * n} adapter tensors", flush=True)
        trainer.on_step_end.append(lambda tr, batch, stats: counter.step_done(tr.step))
        trainer.train()
    sys.exit("the run ended before the counting window did")


def worker_peft(cfg: dict, out: str) -> None:
    """throughput.py's PEFT + Trainer contender, unchanged, observed through its Recorder."""
    import peft

    gpu_defaults()
    counter = Counter(cfg, out)

    class Recorder:  # throughput.Recorder's interface: a step-end call per optimizer step
        def __init__(self, total_steps: int, warmup: int = 0):
            self.done = 0

        def before_training(self) -> None:
            pass

        def step(self, *args, **kwargs) -> None:
            self.done += 1
            counter.step_done(self.done)

        def dump(self, path: str, extra: dict) -> None:
            sys.exit("the run ended before the counting window did")

    get_peft_model = peft.get_peft_model

    def marked(model, config, *args, **kwargs):
        from peft.tuners.lora import LoraLayer

        model = get_peft_model(model, config, *args, **kwargs)
        n = mark_base_layers(m.base_layer for m in model.modules() if isinstance(m, LoraLayer))
        print(f"[launch_count] {n} adapted layers", flush=True)
        return model

    peft.get_peft_model = marked
    TP.Recorder = Recorder
    TP.worker_peft(cfg, grouped=False, out=out)


# --------------------------------------------------------------------------- parent
# the count is a CPU measurement on any machine: on a GPU node too, every contender runs on the CPU
CPU_ONLY = {"PACE_BENCH_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}

def run_worker(args: list[str], log: Path, timeout: float) -> tuple[int, float]:
    t = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run([sys.executable, __file__, *args], check=False, stdout=f,
                                stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout,
                                env=os.environ | CPU_ONLY).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t


def fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x - round(x)) < 0.05 else f"{x:,.1f}"


def cell(launch: float, sync: float) -> str:
    return fmt(launch) + (f" ({fmt(sync)})" if sync else "")


def render(a, rows: list[tuple[str, str, str, dict]], command: str, date: str, elapsed: float,
           base_info: dict) -> str:
    L = [f"### Run of {date}{' (dry run)' if a.dry_run else ''}\n"]
    L.append(f"Command: `{command}` (from the repository root). Date: {date}. Machine: "
             f"{TP.machine()}; load average {os.getloadavg()[0]:.1f} at the end. "
             f"{TP.versions()}. Whole run {elapsed / 60:.1f} min.\n")
    L.append(f"Workload: bench/throughput.py's (GSM8K train rows 1-{a.limit}, rows over "
             f"{a.max_length} tokens dropped, sentencepiece BPE of {base_info['vocab']} pieces "
             f"trained on the GSM8K train text); random-init Llama hidden {a.hidden}, {a.layers} "
             f"layers, {a.heads} heads, intermediate {a.intermediate}; LoRA r {TP.LORA_R} on "
             f"q/k/v/o/gate/up/down ({14 * a.layers} adapter tensors); micro-batch "
             f"{a.micro_batch}, no accumulation, one process; PACE σ {TP.SIGMA}, λ {TP.LAMBDA}. "
             f"Counted on the CPU with torch.profiler over steps {a.skip + 1}-"
             f"{a.skip + a.steps} (the first {a.skip} skipped, no logging step), per optimizer "
             f"step; the rules are in the script's docstring. pace_llm: DeepSpeed "
             f"ds_configs/zeroN.json, `train.precision` bf16 or fp32; PEFT + Trainer: "
             f"`bf16=True` (autocast, fp32 adapters) or fp32, adamw_torch_fused.\n")
    L.append("Launches per optimizer step by source, host syncs in parentheses:\n")
    L.append("| dtype | ZeRO | contender | " + " | ".join(CATEGORIES) + " | **total** | "
             "**syncs** |")
    L.append("|---|---|---|" + "---|" * (len(CATEGORIES) + 2))
    for dtype, zero, who, r in rows:
        L.append(f"| {dtype} | {zero} | {DESCRIBE[who]} | "
                 + " | ".join(cell(r["launches"][c], r["syncs"][c]) for c in CATEGORIES)
                 + f" | **{fmt(r['total'])}** | **{fmt(r['total_syncs'])}** |")
    uneven = [f"{d} ZeRO {z} {DESCRIBE[w]}: {r['per_step']}" for d, z, w, r in rows
              if len(set(r["per_step"])) > 1]
    L.append("")
    L.append("Every counted step had the same launch count." if not uneven else
             "Launches per counted step differed: " + "; ".join(uneven) + ".")
    L.append("")
    get = {(d, z, w): r for d, z, w, r in rows}
    ratios = []
    for dtype, zero, who, r in rows:
        if who != "off":
            continue
        peft = get.get((dtype, "-", "peft"))
        full = get.get((dtype, zero, "full"))
        vs = (f"{r['total'] / peft['total']:.2f}" if peft else "")
        diff = (f"{full['total'] - r['total']:+,.0f} ({full['total_syncs'] - r['total_syncs']:+.0f})"
                if full else "")
        ratios.append(f"| {dtype} | {zero} | {vs} | {diff} |")
    if ratios:
        L.append("| dtype | ZeRO | pace off / PEFT (launches) | full − off: launches (syncs) |")
        L.append("|---|---|---|---|")
        L += ratios
        L.append("")
    L.append("Host syncs by site, per step (site = the innermost named frame or autograd node; "
             "`read` = aten::_local_scalar_dense: .item(), float(), bool() of a tensor). Not "
             "counted: scalar reads of tensors a GPU run keeps on the host (the collated batch "
             "before it is moved, torch optimizers' step counters) and the host-side ops of "
             "batch collation; counted as glue: host-to-device copies of the batch and of "
             "pace_llm's all_reduce scalars (`h2d`), no-ops on a CPU.\n")
    short = {"aten::_local_scalar_dense": "read", "aten::nonzero": "nonzero"}
    def sites(r: dict, host: bool) -> str:
        return "; ".join(f"{s} {short.get(op, op)} ×{fmt(n)}" for c, s, op, n in r["sync_sites"]
                         if c != "bench" and (c == "host") == host) or "none"

    for dtype, zero, who, r in rows:
        o = r["other"]
        L.append(f"- {dtype}, ZeRO {zero}, {DESCRIBE[who]}: {sites(r, False)}. Not counted: "
                 f"{sites(r, True)}; {fmt(o.get('host ops', 0))} host-side ops. h2d: "
                 f"{fmt(o.get('h2d copies', 0))}.")
    L.append("")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description="Kernel launches and host syncs per optimizer step: "
                                 "pace_llm off/full vs PEFT + Trainer, counted on the CPU")
    ap.add_argument("--worker", choices=["pace", "peft"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None,
                    help=f"GSM8K: a hub id or local train.jsonl / directory (default "
                         f"{TP.DEFAULT_DATA}; with --dry-run the repository's test fixture)")
    ap.add_argument("--limit", type=int, default=64, help="GSM8K train rows used")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--skip", type=int, default=2, help="steps before the counting window")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps counted")
    ap.add_argument("--dtypes", default=None, help="default bf16,fp32 (--dry-run: bf16)")
    ap.add_argument("--zero", default=None, help="pace_llm's ZeRO stages: default 0,1,2 "
                                                 "(--dry-run: 0)")
    ap.add_argument("--contenders", default="off,full,peft")
    ap.add_argument("--dry-run", action="store_true",
                    help="2 layers, bf16, ZeRO-0, 1 skipped + 1 counted step per contender")
    ap.add_argument("--workdir", default="/tmp/pace_llm_launch_count")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per contender process")
    ap.add_argument("--dump", action="store_true",
                    help="write every counted op with its category and stack to "
                         "<workdir>/ops_<config>.tsv")
    ap.add_argument("--write-results", action="store_true",
                    help=f"append the table to bench/RESULTS.md under '{HEADING}'")
    a = ap.parse_args()

    if a.worker:
        cfg = json.loads(Path(a.config).read_text())
        if a.worker == "pace":
            worker_pace(cfg, a.mode, a.out)
        else:
            worker_peft(cfg, a.out)
        return

    if a.dry_run:
        a.layers, a.skip, a.steps = 2, 1, 1
    a.dtypes = a.dtypes or ("bf16" if a.dry_run else "bf16,fp32")
    a.zero = a.zero or ("0" if a.dry_run else "0,1,2")
    data = a.data or (str(REPO / "tests/fixtures/gsm8k/train.jsonl") if a.dry_run
                      else TP.DEFAULT_DATA)
    command = "OMP_NUM_THREADS={} python bench/launch_count.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "<unset>"), " ".join(sys.argv[1:]))
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    started = time.perf_counter()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    build = {"model_type": "llama", "hidden_size": a.hidden, "intermediate_size": a.intermediate,
             "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
             "num_key_value_heads": a.heads, "max_position_embeddings": max(1024, a.max_length),
             "vocab_size": a.vocab, "tie_word_embeddings": False}
    total = a.skip + a.steps + 1
    rows = []
    base_info = {}
    contenders = a.contenders.split(",")
    for dtype in a.dtypes.split(","):
        key = hashlib.sha1(json.dumps([build, dtype, data], sort_keys=True).encode()).hexdigest()[:10]
        cfg = {"data": TP.data_path(data), "limit": a.limit, "build": build,
               "base": str(work / f"base-{key}"), "workdir": str(work),
               "micro_batch": a.micro_batch, "max_length": a.max_length, "lr": 2e-4,
               "warmup": a.skip, "steps": a.steps, "skip": a.skip, "dtype": dtype,
               "total_steps": total}
        cfg_path = work / f"config_{dtype}.json"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        if not (Path(cfg["base"]) / "config.json").is_file():
            print(f"building tokenizer + {dtype} base in {cfg['base']} ...", flush=True)
            rc, wall, _ = TP.run_child(["--worker", "build", "--config", str(cfg_path)],
                                       work / f"build_{dtype}.log", a.timeout)
            if rc:
                sys.exit(f"base build failed (rc {rc}); see {work / f'build_{dtype}.log'}")
        base_info["vocab"] = json.loads((Path(cfg["base"]) / "config.json").read_text())["vocab_size"]
        configs = [(z, w) for z in a.zero.split(",") for w in contenders if w != "peft"]
        if "peft" in contenders:
            configs.append(("-", "peft"))
        for zero, who in configs:
            tag = f"{dtype}_zero{zero}_{who}" if who != "peft" else f"{dtype}_{who}"
            c = dict(cfg, ds=f"zero{zero}.json" if who != "peft" else "zero0.json",
                     recipe=str(work / f"recipe_{tag}.yaml"),
                     dump=str(work / f"ops_{tag}.tsv") if a.dump else None)
            TP.write_recipe(c)
            path = work / f"config_{tag}.json"
            path.write_text(json.dumps(c, indent=1))
            out = work / f"result_{tag}.json"
            out.unlink(missing_ok=True)
            wargs = (["--worker", "pace", "--mode", who] if who != "peft"
                     else ["--worker", "peft"])
            log = work / f"log_{tag}.txt"
            rc, wall = run_worker([*wargs, "--config", str(path), "--out", str(out)], log,
                                  a.timeout)
            if rc or not out.is_file():
                sys.exit(f"{tag} failed (rc {rc}); see {log}")
            r = json.loads(out.read_text())
            rows.append((dtype, zero, who, r))
            print(f"{dtype:4s} {'ZeRO-' + zero if zero != '-' else '':6s} {DESCRIBE[who]:15s} {fmt(r['total']):>7s} launches  "
                  f"{fmt(r['total_syncs']):>5s} syncs  per step {r['per_step']}  (process "
                  f"{wall:.0f} s, window "
                  f"{r['window_s']:.1f} s, analysis {r['analysis_s']:.1f} s)", flush=True)
    report = render(a, rows, command, date, time.perf_counter() - started, base_info)
    print("\n" + report)
    if a.write_results:
        TP.append_results(report, HEADING)
        print(f"appended to {REPO / 'bench' / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
