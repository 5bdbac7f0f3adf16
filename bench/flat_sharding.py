"""Should the flat engine shard the adapter's optimizer state at ZeRO-1/2? What it saves, what
it costs (issue #19).

Saves (computed): the fp32 master and AdamW moments are 12 bytes per adapter element; sharded
over W ranks each rank keeps 12·N/W of them. The flat fp32 gradient (4 bytes per element) is
whole on every rank either way. Printed for LoRA r 16 on every linear layer (q, k, v, o, gate,
up, down) of a Llama-3-8B shape (hidden 4096, 32 layers, 8 KV heads of 128, intermediate 14336).

Costs (measured here): the time of FlatAdamW.step on ``--world`` gloo ranks for an adapter of
``--elements`` fp32 or bf16 elements, replicated (ZeRO-0: one all-reduce of the gradient) vs
sharded (ZeRO-1/2: the same all-reduce, AdamW on 1/W of the elements, one all-gather of the
params), median of ``--steps`` steps after two warm-up steps, both in one run. On a GPU node the
collectives run over NCCL at tens to hundreds of GB/s, so the CPU figures are an upper bound of
the relative cost, not a GPU measurement.

    OMP_NUM_THREADS=1 python bench/flat_sharding.py [--elements 8000000] [--world 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pace_llm.distributed import free_port  # noqa: E402
from pace_llm.flat_optim import FlatAdamW  # noqa: E402

LLAMA3_8B = {"hidden": 4096, "layers": 32, "kv": 8 * 128, "intermediate": 14336}


def lora_elements(shape: dict[str, int], r: int) -> int:
    """r·(d_in + d_out) per adapted linear, q k v o gate up down, every layer."""
    h, kv, i = shape["hidden"], shape["kv"], shape["intermediate"]
    pairs = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    return shape["layers"] * sum(r * (a + b) for a, b in pairs)


def _rank(rank: int, world: int, port: int, elements: int, steps: int, dtype: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    result = {}
    for shard in (False, True):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(elements, generator=g).to(getattr(torch, dtype)))]
        opt = FlatAdamW(params, lr=1e-4, weight_decay=0.0, max_grad_norm=1.0, world_size=world,
                        partition=shard)
        times = []
        for step in range(steps + 2):
            params[0].grad = torch.randn(elements, generator=g).to(params[0].dtype)
            dist.barrier()
            start = time.perf_counter()
            opt.step()
            float(opt.last_norm)  # the step's work is done
            if step >= 2:
                times.append(time.perf_counter() - start)
        state = opt.shard_state()
        held = sum(state[k].numel() * 4 for k in ("master", "exp_avg", "exp_avg_sq"))
        result["sharded" if shard else "replicated"] = (statistics.median(times), held)
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--elements", type=int, default=8_000_000)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    args = ap.parse_args()
    n = lora_elements(LLAMA3_8B, 16)
    print(f"LoRA r 16, all linears, Llama-3-8B shape: {n / 1e6:.1f} M adapter elements")
    for w in (1, 2, 8):
        print(f"  {w} rank(s): master+moments {12 * n / 2**20:.0f} MiB replicated, "
              f"{12 * -(-n // w) / 2**20:.0f} MiB sharded (saves {12 * (n - -(-n // w)) / 2**20:.0f}"
              f" MiB per rank); fp32 gradient {4 * n / 2**20:.0f} MiB whole either way")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, args.world, port, args.elements, args.steps,
                                             args.dtype, out)) for r in range(args.world)]
    for p in procs:
        p.start()
    result = out.get(timeout=1800)
    for p in procs:
        p.join()
    (rep, rep_bytes), (sh, sh_bytes) = result["replicated"], result["sharded"]
    print(f"measured here: {args.elements / 1e6:.1f} M {args.dtype} elements on {args.world} gloo "
          f"ranks (CPU), median of {args.steps} FlatAdamW steps")
    print(f"  replicated (ZeRO-0): {rep * 1e3:.1f} ms/step, {rep_bytes / 2**20:.0f} MiB "
          "master+moments per rank")
    print(f"  sharded (ZeRO-1/2):  {sh * 1e3:.1f} ms/step, {sh_bytes / 2**20:.0f} MiB "
          f"master+moments per rank; time ratio sharded/replicated {sh / rep:.2f}")


if __name__ == "__main__":
    main()
