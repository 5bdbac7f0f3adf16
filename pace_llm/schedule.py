"""The learning-rate schedule of the recipe's train section: built at the start, re-applied on
resume (a DeepSpeed JSON with its own "scheduler" is refused: one source of truth).

The multiplier of the peak lr at optimizer step s (0-based), with W = train.warmup_steps and T
the run's optimizer steps: (s + 1) / (W + 1) while s < W; after it 1 (constant), 1 − p (linear)
or ½·(1 + cos πp) (cosine), with p = min(1, (s − W) / (T − W)). The engine steps the schedule
after every optimizer step, a skipped (non-finite) one included.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pace_llm.schema import TrainArgs


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step s: linear warmup, then cosine/linear/constant."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainArgs,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(train.schedule, train.warmup_steps, max_steps))


def apply_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                   train: TrainArgs, max_steps: int) -> None:
    """The recipe's lr, weight decay and schedule on a restored optimizer and scheduler (they
    hold the checkpoint's): the lr of the coming step follows the new settings."""
    f = lr_lambda(train.schedule, train.warmup_steps, max_steps)
    groups = optimizer.param_groups
    scheduler.base_lrs = [train.lr] * len(groups)
    scheduler.lr_lambdas = [f] * len(groups)
    for group in groups:
        group["initial_lr"], group["weight_decay"] = train.lr, train.weight_decay
        group["lr"] = train.lr * f(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
