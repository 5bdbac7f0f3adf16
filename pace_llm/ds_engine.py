"""The DeepSpeed engine: where DeepSpeed earns its keep (ZeRO-3 partitioning of the frozen base,
CPU offload of the optimizer, fp16 loss scaling, or ``train.optimizer_path: deepspeed``).

``deepspeed.initialize`` receives the run's DeepSpeed config exactly as recorded in
``ds_config.json`` (every "auto" filled from the recipe) with our AdamW (it can skip a step whose
loss was not finite) and our lr schedule. Per micro-batch ``engine.backward`` (loss / grad_accum,
the gradient reduction of the ZeRO stage) and ``engine.step`` (at the accumulation boundary:
clipping, the optimizer, the schedule; before it only DeepSpeed's micro-step count).

Everything this module relies on beyond DeepSpeed's documented API is listed here, and the
installed version is checked against :data:`TESTED` before a run starts (:func:`check_version`):
  - checkpoint loads go through ``engine.checkpoint_engine.load``, replaced for the load by a
    ``torch.load(weights_only=True)`` that allows :func:`deepspeed_types` only;
  - ``optimizer.parameter_offload`` (ZeRO-3): its forward/backward fetch hooks are removed while
    the whole model is gathered for an evaluation pass and re-registered after it
    (``_register_deepspeed_module``);
  - the ZeRO-1/2/3 optimizer wrappers call our optimizer's ``step()`` once per optimizer step, so
    ``SkipNextStep.skip_next`` skips exactly the step asked for.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pace_llm.dsconfig import offloads_optimizer, zero_stage
from pace_llm.errors import UserError
from pace_llm.schedule import build_scheduler
from pace_llm.schema import TrainArgs

TESTED = ("0.19.8", "0.20")
"""DeepSpeed versions this module is tested with: from the first, up to (not including) the
second. pyproject.toml declares the same range."""
TAG = "ds"  # the DeepSpeed checkpoint's folder inside checkpoints/step-N/


def version_tuple(text: str) -> tuple[int, ...]:
    """(0, 19, 8) of "0.19.8" / "0.19.8+cuda" (the numeric release only)."""
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit())
        if not digits or digits != piece:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_version(installed: str, why: str) -> None:
    """Refuse a DeepSpeed outside :data:`TESTED` for a run that needs DeepSpeed's engine."""
    low, high = TESTED
    if version_tuple(low) <= version_tuple(installed) < version_tuple(high):
        return
    raise UserError(
        f"deepspeed {installed} is installed; this run needs DeepSpeed's engine ({why}), which "
        f"pace_llm has tested with deepspeed {low} to below {high} only and relies on internals "
        f"of (its checkpoint loading and ZeRO-3 fetch hooks). Install it with pip install "
        f"'deepspeed>={low},<{high}', or train at "
        "ZeRO-0/1/2 in bf16 or fp32 without CPU offload, which runs on pace_llm's flat engine "
        "(torch.distributed only, no DeepSpeed internals)")


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


def build_optimizer(params: list[nn.Parameter], train: TrainArgs,
                    ds_config: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW over the adapter: DeepSpeed's CPU Adam when the config offloads the optimizer, else
    torch AdamW that DeepSpeed's wrappers step (clipping by ``gradient_clipping``)."""
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        guarded = type("GuardedCPUAdam", (SkipNextStep, DeepSpeedCPUAdam), {})
        return guarded(params, lr=train.lr, weight_decay=train.weight_decay, adamw_mode=True)
    return GuardedAdamW(params, lr=train.lr, weight_decay=train.weight_decay)


class DeepSpeedStepper:
    """The stepping seam (pace_llm/stepper.py) over DeepSpeed's engine."""

    def __init__(self, objective: nn.Module, params: list[nn.Parameter], train: TrainArgs,
                 ds_config: dict[str, Any], max_steps: int):
        import deepspeed

        optimizer = build_optimizer(params, train, ds_config)
        scheduler = build_scheduler(optimizer, train, max_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=objective, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.optimizer = optimizer
        self.params = params  # the trainable ones, in model order (ZeRO-0's norm reads them)
        self.module: nn.Module = self.engine.module
        self.device: torch.device = self.engine.device
        self.stage = zero_stage(ds_config)

    def train(self) -> None:
        self.engine.train()

    def forward(self, **inputs: Any) -> dict[str, torch.Tensor]:
        return self.engine(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        """engine.backward; before the window's last micro-batch also engine.step(), which then
        only advances DeepSpeed's micro-step count (its accumulation boundary follows it)."""
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self, bad: torch.Tensor) -> tuple[torch.Tensor | float | None, bool]:
        """The optimizer step at the window's end; ``bad`` (the window's loss was not finite) is
        read on the host once and skips it."""
        skipped = self.optimizer.skip_next = bool(bad)
        norm = self._stage0_norm() if self.stage == 0 else None
        self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()  # ZeRO >= 1: a tensor, read at logging
        return norm, skipped

    def _stage0_norm(self) -> torch.Tensor | float:
        """ZeRO-0 keeps whole grads on the params (DeepSpeed reports no norm there): one
        multi-tensor norm per dtype/device group, accumulated in fp32; a device tensor."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        return torch.linalg.vector_norm(torch.stack(
            torch._foreach_norm(grads, 2, dtype=torch.float32)))

    @contextmanager
    def whole_weights(self) -> Iterator[None]:
        """Whole, local weights for the block (evaluation, generation): under ZeRO-3 every
        parameter is gathered once and DeepSpeed's per-module fetch hooks are removed, then
        restored afterwards; otherwise nothing to do."""
        offload = getattr(self.engine.optimizer, "parameter_offload", None)
        if offload is None:
            yield
            return
        import deepspeed

        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for p in params:
                p.ds_active_sub_modules.clear()
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield
            finally:
                offload._register_deepspeed_module(offload.module)

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: Path) -> None:
        """DeepSpeed's checkpoint of the adapter, optimizer and schedule in ``directory/ds``
        (collective; the frozen base is excluded)."""
        self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False,
                                    exclude_frozen_parameters=True)

    def steps_taken(self) -> int:
        """DeepSpeed's global step count (restored from its checkpoint files)."""
        return int(self.engine.global_steps)

    def load(self, directory: Path) -> None:
        """Restore ``directory/ds``; pickles are read weights-only (:func:`weights_only_loads`).
        Frozen base weights are not in the checkpoint; the caller checks the trainable ones
        against trainable.safetensors."""
        if not (directory / TAG).is_dir():
            raise UserError(f"checkpoint {directory} has no DeepSpeed state ({TAG}/): it was "
                            "written by the flat engine (train.optimizer_path flat, or auto at "
                            "ZeRO-0/1/2 in bf16/fp32); resume it with that recipe")
        with weights_only_loads(self.engine, directory):
            load_path, _ = self.engine.load_checkpoint(
                str(directory), tag=TAG, load_module_strict=False, load_optimizer_states=True,
                load_lr_scheduler_states=True)
        if load_path is None:
            raise UserError(f"DeepSpeed could not load the checkpoint in {directory / TAG}")


def deepspeed_types() -> list[type]:
    """The non-tensor types DeepSpeed 0.19's checkpoints hold (ZeRO 0-3, fp32/bf16/fp16): the
    allow-list of the weights-only unpickler."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads(engine: Any, path: Path) -> Iterator[None]:
    """DeepSpeed's checkpoint loads inside the block use ``torch.load(weights_only=True)``
    with :func:`deepspeed_types` allowed; anything else in a file is refused (UserError)."""
    original = engine.checkpoint_engine
    allowed = deepspeed_types()

    def load(file: str, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(file, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"checkpoint {path}: {file} holds objects other than tensors and "
                            f"DeepSpeed's own state, refused without running it ({reason[:200]})"
                            ) from None

    original.load = load  # an instance attribute over the engine's method, for the block
    try:
        yield
    finally:
        del original.load
