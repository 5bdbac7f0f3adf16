"""The flat engine: the adapter's optimizer path on torch.distributed alone, at ZeRO-0/1/2 in bf16
or fp32 without CPU offload (``train.optimizer_path`` auto or flat; pace_llm/stepper.py).

Why DeepSpeed is not initialised here: at ZeRO-0/1/2 DeepSpeed partitions nothing of the frozen
base (only ZeRO-3 does), and a LoRA adapter's gradient and optimizer state are small. Around the
flat optimizer its engine would only count micro-steps, divide the loss by grad_accum and pickle
the state, and its own ZeRO-1/2 and bf16 optimizer wrappers add per-tensor overflow checks,
norms and bucket copies (bench/launch_count.py: ~3,100 launches per step more on a 280-tensor
adapter). This module does those three things with torch; DeepSpeed is kept where it earns its
keep (pace_llm/ds_engine.py: ZeRO-3, CPU offload, fp16 loss scaling).

Per micro-batch: ``(loss / grad_accum).backward()``, then ``FlatAdamW.accumulate`` folds the
params' gradients into the flat fp32 gradient. A step's gradient is thus the mean over the
window's micro-batches and, after FlatAdamW's one all-reduce, over the ranks: DeepSpeed's
convention, so the trainer scales the loss the same way for both engines. Per optimizer step:
``FlatAdamW.step`` (norm, clip, fused AdamW, a non-finite step skipped on the device), then the
lr schedule.

What the user's ZeRO stage means here (recorded in ``engine.json`` and the start line): ZeRO-0 =
AdamW state replicated on every rank; ZeRO-1 and ZeRO-2 = the fp32 master and the AdamW moments
(12 bytes per adapter element) sharded over the ranks. ZeRO-2's gradient partitioning is not
done: the flat fp32 gradient (4 bytes per element) is whole on every rank.

Checkpoint files: ``optimizer-rank<r>.safetensors`` (rank r's shard of the master, the moments
and the step count; rank 0's alone when not sharded) and ``schedule.json`` (the param group's
settings and the lr schedule's state). Saving is no collective; loading reads safetensors and
JSON only.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pace_llm import distributed as D
from pace_llm.errors import UserError
from pace_llm.flat_optim import FlatAdamW
from pace_llm.schedule import build_scheduler
from pace_llm.schema import TrainArgs

SCHEDULE_FILE = "schedule.json"


def shard_file(rank: int) -> str:
    return f"optimizer-rank{rank}.safetensors"


class FlatStepper:
    """The stepping seam (pace_llm/stepper.py) over :class:`FlatAdamW` and torch.distributed."""

    def __init__(self, objective: nn.Module, params: list[nn.Parameter], train: TrainArgs,
                 max_steps: int, device: torch.device, world: int, shard: bool):
        objective.to(device)  # first: the params become views of a flat buffer on the device
        self.module = objective
        self.device = device
        self.grad_accum = train.grad_accum
        self.optimizer = FlatAdamW(params, lr=train.lr, weight_decay=train.weight_decay,
                                   max_grad_norm=train.max_grad_norm, world_size=world,
                                   partition=shard and world > 1)
        if world > 1:  # every rank starts from rank 0's adapter (and head)
            self.optimizer.broadcast_params()
        self.scheduler = build_scheduler(self.optimizer, train, max_steps)

    def train(self) -> None:
        self.module.train()

    def forward(self, **inputs: Any) -> dict[str, torch.Tensor]:
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()
        self.optimizer.accumulate()

    def step(self, bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The optimizer step, decided on the device: (gradient norm, skipped) as device
        tensors. A skipped step advances the schedule too."""
        self.optimizer.skip_if(bad)
        self.optimizer.step()
        self.scheduler.step()
        return self.optimizer.last_norm, self.optimizer.last_skipped

    def whole_weights(self) -> nullcontext:
        return nullcontext()  # every weight is whole on every rank

    # ------------------------------------------------------------------ checkpoints
    def _owner(self) -> int | None:
        """Whose shard this rank writes and reads (None: this rank writes none)."""
        if self.optimizer.shards > 1:
            return D.rank()
        return 0 if D.rank() == 0 else None

    def save(self, directory: Path) -> None:
        """This rank's shard (if it owns one) and, on rank 0, the schedule's state."""
        owner = self._owner()
        if owner is not None:
            save_file(self.optimizer.shard_state(), str(directory / shard_file(owner)))
        if D.rank() == 0:
            group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
            schedule = {k: v for k, v in self.scheduler.state_dict().items()
                        if k != "lr_lambdas"}
            (directory / SCHEDULE_FILE).write_text(json.dumps(
                {"shards": self.optimizer.shards, "param_group": group, "scheduler": schedule},
                indent=1))

    def steps_taken(self) -> int:
        """The schedule's step count (a skipped step advances it too)."""
        return int(self.scheduler.last_epoch)

    def load(self, directory: Path) -> None:
        """Restore the shard, the param group and the schedule written by :meth:`save`."""
        meta_file = directory / SCHEDULE_FILE
        if not meta_file.is_file():
            raise UserError(f"checkpoint {directory} has no flat-engine state ({SCHEDULE_FILE}): "
                            "it was written by DeepSpeed's engine (or by a pace_llm before the "
                            "flat engine); resume it with --train.optimizer_path deepspeed")
        meta = json.loads(meta_file.read_text())
        if meta["shards"] != self.optimizer.shards:
            raise UserError(f"checkpoint {directory} holds the optimizer state in "
                            f"{meta['shards']} shard(s), this run in {self.optimizer.shards}: "
                            "resume it with the checkpoint's DeepSpeed config")
        owner = D.rank() if self.optimizer.shards > 1 else 0
        self.optimizer.load_shard_state(load_file(str(directory / shard_file(owner))))
        group = self.optimizer.param_groups[0]
        for key, value in meta["param_group"].items():
            group[key] = tuple(value) if key == "betas" else value
        self.scheduler.load_state_dict({**meta["scheduler"],
                                        "lr_lambdas": [None] * len(self.scheduler.lr_lambdas)})


def sharded_bytes(elements: int, world: int, shard: bool) -> dict[str, int]:
    """Adapter state per rank, in bytes: the fp32 master and AdamW moments (sharded or not) and
    the flat fp32 gradient (whole)."""
    owned = -(-elements // world) if shard and world > 1 else elements
    return {"master_and_moments": 12 * owned, "gradient": 4 * elements}

