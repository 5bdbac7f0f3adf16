"""Process-group setup for every launcher (deepspeed, torchrun, plain python) and small collectives."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from pace_llm.errors import UserError

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join (or, without a launcher, create) the process group.

    A plain ``python pace_llm/train.py`` gets the rendezvous variables of a one-process group.
    On the CPU accelerator DeepSpeed's shm comm op is switched off: it costs a ~2-minute JIT
    compile on first use and gloo does the same job for us.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False)
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank())
    else:
        threads = threads_per_rank(os.environ, len(os.sched_getaffinity(0)))
        if threads is not None:
            torch.set_num_threads(threads)


def threads_per_rank(env: Mapping[str, str], cores: int) -> int | None:
    """CPU ranks share the node's cores: cores ÷ local ranks, unless the user set
    OMP_NUM_THREADS (torchrun sets 1 for several ranks; the deepspeed launcher sets nothing, and
    each rank would otherwise take every core). None = leave torch's choice."""
    if "OMP_NUM_THREADS" in env:
        return None
    local = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1)
    return max(1, cores // max(1, local))


def shutdown(clean: bool) -> None:
    """Leave the process group before the interpreter exits: after a barrier when every rank
    finished the run (clean), at once after an error. Left to interpreter teardown, the group's
    threads can abort a rank that finished ("terminate called without an active exception",
    SIGABRT) and leave its peers waiting at the launcher's exit barrier."""
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, local_rank())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Reduce a few host scalars across ranks in one collective (fp64, on the comm device); on
    one rank the values themselves (no tensor, no copy)."""
    if not dist.is_initialized() or world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum a device tensor across ranks in place (no host read); on one rank ``t`` itself."""
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t)
    return t


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj``, in rank order (a collective over ``group``, default: all ranks)."""
    if not dist.is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank."""
    if not dist.is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return device()
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# ZeRO-3 gathers and rank-0 work (export, merge, the trainable state, trackers)
# --------------------------------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a DeepSpeedEngine / DDP wrapper (or the model itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def gathered(params: Iterable[nn.Parameter]) -> AbstractContextManager[Any]:
    """Context in which ZeRO-3-partitioned params hold their full data (read-only).

    Every rank must enter it (it is a collective); params that ZeRO does not own are skipped.
    """
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def on_rank0(fn: Callable[[], T]) -> T | None:
    """fn() on rank 0, its result returned there (None on the other ranks); a UserError there is
    raised on every rank (no rank left waiting)."""
    error, result = None, None
    if rank() == 0:
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error is not None:
        raise UserError(error)
    return result
