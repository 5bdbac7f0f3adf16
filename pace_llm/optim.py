"""The adapter's optimizer and learning-rate schedule, built from the recipe's train section.

DeepSpeed gets both from us (a DeepSpeed JSON with its own "optimizer"/"scheduler" is refused:
one source of truth). The optimizer can skip its next step: a window with a non-finite loss
is not applied, whatever ZeRO wrapper calls ``step()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pace_llm.dsconfig import offloads_optimizer, zero_stage
from pace_llm.schema import TrainArgs


class SkipNextStep:
    """Optimizer mixin: the next ``step()`` can be skipped (a non-finite loss), whatever ZeRO
    wrapper calls it."""

    skip_next = False

    def step(self, *args, **kwargs):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(*args, **kwargs)


class GuardedAdamW(SkipNextStep, torch.optim.AdamW):
    """torch AdamW with SkipNextStep."""


def build_optimizer(params: list[nn.Parameter], train: TrainArgs, ds_config: dict[str, Any],
                    flat: bool = False, world_size: int = 1) -> torch.optim.Optimizer:
    """AdamW over the adapter: the flat path's FlatAdamW (pace_llm/flat_optim.py; clips by
    train.max_grad_norm itself), DeepSpeed's CPU Adam when the config offloads the optimizer,
    else torch AdamW that DeepSpeed's wrappers step."""
    if flat:
        from pace_llm.flat_optim import FlatAdamW

        return FlatAdamW(params, lr=train.lr, weight_decay=train.weight_decay,
                         max_grad_norm=train.max_grad_norm, world_size=world_size,
                         partition=zero_stage(ds_config) in (1, 2))
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        guarded = type("GuardedCPUAdam", (SkipNextStep, DeepSpeedCPUAdam), {})
        return guarded(params, lr=train.lr, weight_decay=train.weight_decay, adamw_mode=True)
    return GuardedAdamW(params, lr=train.lr, weight_decay=train.weight_decay)


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
