"""The stepping seam: the trainer's one interface to the engine that turns losses into adapter
updates, which engine runs, and the record of what ran.

    stepper.forward(**inputs) -> outputs        the objective's forward (inputs on stepper.device)
    stepper.backward(loss)                      one micro-batch; a step's gradient is the mean
                                                over the window's micro-batches and the ranks
    stepper.step(bad) -> (grad_norm, skipped)   the optimizer step at the window's end (skipped
                                                where ``bad``); device values, read at logging
    stepper.save(dir) / stepper.load(dir)       its part of a checkpoint (every rank calls)
    stepper.whole_weights()                     context: every weight whole and local (eval)
    stepper.optimizer / stepper.scheduler       one AdamW param group; the lr schedule

The two engines:

- ``flat`` (pace_llm/flat_engine.py): ZeRO-0/1/2 in bf16 or fp32 without CPU offload, every
  trainable param of one dtype and device. torch.distributed only; DeepSpeed is not initialised
  (at these stages it would partition nothing of the frozen base).
- ``deepspeed`` (pace_llm/ds_engine.py): ZeRO-3 (the frozen base partitioned), fp16 (loss
  scaling), CPU offload of the optimizer, or ``train.optimizer_path: deepspeed``.

``train.optimizer_path`` auto takes flat wherever it fits, flat refuses a run where it does not
(at parse time), deepspeed always takes DeepSpeed's engine (the rule: ``dsconfig.engine_for``).
Each run writes what ran to ``engine.json`` (:func:`describe`) and says it in its start line
(:func:`summary`); ``ds_config.json`` is the config DeepSpeed received, written only when it
was initialised.
"""

from __future__ import annotations

import importlib.metadata
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pace_llm.ds_engine import DeepSpeedStepper, check_version
from pace_llm.dsconfig import offloads_optimizer, zero_stage
from pace_llm.flat_engine import FlatStepper, sharded_bytes
from pace_llm.schema import Recipe


class Stepper(Protocol):
    """What the trainer, the evaluator and checkpoints use of an engine (module docstring)."""

    module: nn.Module
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def train(self) -> None: ...

    def forward(self, **inputs: Any) -> dict[str, torch.Tensor]: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, bad: torch.Tensor) -> tuple[Any, Any]: ...

    def whole_weights(self) -> AbstractContextManager[Any]: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...

    def steps_taken(self) -> int:
        """Optimizer steps the engine's state has taken (after ``load``: the checkpoint's)."""
        ...


def build_stepper(engine: str, objective: nn.Module, params: list[nn.Parameter],
                  recipe: Recipe, ds_config: dict[str, Any], max_steps: int,
                  device: torch.device, world: int) -> Stepper:
    """The chosen engine around the objective, with AdamW over ``params`` and the schedule."""
    if engine == "flat":
        return FlatStepper(objective, params, recipe.train, max_steps, device, world,
                           shard=zero_stage(ds_config) in (1, 2))
    return DeepSpeedStepper(objective, params, recipe.train, ds_config, max_steps)


def require_deepspeed(engine: str, ds_config: dict[str, Any], precision: str) -> None:
    """DeepSpeed's engine relies on internals of the versions it was tested with: refuse
    another installed version before anything is loaded."""
    if engine != "deepspeed":
        return
    why = f"ZeRO-{zero_stage(ds_config)}, {precision}" + (
        ", CPU offload" if offloads_optimizer(ds_config) else "")
    check_version(_version("deepspeed"), why)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe(engine: str, recipe: Recipe, ds_config: dict[str, Any], precision: str,
             world: int, params: list[nn.Parameter]) -> dict[str, Any]:
    """engine.json: which engine ran, what DeepSpeed received (None: not initialised), the
    adapter optimizer (sharding, dtypes, bytes per rank) and the versions."""
    stage = zero_stage(ds_config)
    elements = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    requested = {"deepspeed": recipe.deepspeed, "zero_stage": stage, "precision": precision,
                 "optimizer_path": recipe.train.optimizer_path}
    versions = {name: _version(name) for name in ("pace-llm", "torch", "deepspeed",
                                                  "transformers")}
    if engine == "flat":
        shard = stage in (1, 2) and world > 1
        optimizer = {"name": "FlatAdamW (torch AdamW, fused)", "elements": elements,
                     "param_dtype": dtypes[0], "master_dtype": "float32",
                     "state_sharded_over": world if shard else 1,
                     "gradient": "fp32, whole on every rank",
                     "bytes_per_rank": sharded_bytes(elements, world, shard)}
        return {"engine": "flat", "deepspeed_initialized": False, "deepspeed_config": None,
                "requested": requested, "adapter_optimizer": optimizer, "world_size": world,
                "versions": versions}
    name = "DeepSpeedCPUAdam" if offloads_optimizer(ds_config) else "torch AdamW"
    optimizer = {"name": f"{name} inside DeepSpeed's ZeRO-{stage} optimizer",
                 "elements": elements, "param_dtype": ", ".join(dtypes)}
    return {"engine": "deepspeed", "deepspeed_initialized": True, "deepspeed_config": ds_config,
            "requested": requested, "adapter_optimizer": optimizer, "world_size": world,
            "versions": versions}


def summary(record: dict[str, Any]) -> str:
    """The start line's account of what runs (from :func:`describe`)."""
    req, opt, v = record["requested"], record["adapter_optimizer"], record["versions"]
    ds = f"deepspeed {v['deepspeed']}"
    if record["engine"] == "flat":
        shards = opt["state_sharded_over"]
        state = (f"AdamW state sharded over {shards} ranks, gradient whole on each" if shards > 1
                 else "AdamW state on every rank")
        return (f"engine flat (torch.distributed; DeepSpeed not initialized) for ZeRO-"
                f"{req['zero_stage']}: {state}; {req['precision']}; torch {v['torch']}, {ds}")
    return (f"engine DeepSpeed (ZeRO-{req['zero_stage']}, {req['precision']}, the config in "
            f"ds_config.json); {opt['name']}; torch {v['torch']}, {ds}")
