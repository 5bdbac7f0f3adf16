"""The record of one training run: what pace_llm/setup.py built, read by the trainer, the
evaluator, checkpoints and the run's results (a plain record; no behaviour)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pace_llm.schema import Recipe

if TYPE_CHECKING:
    from pace_llm.data.batches import BatchOrder
    from pace_llm.data.examples import TaskData
    from pace_llm.objective import FastHistory
    from pace_llm.stepper import Stepper


@dataclass
class Run:
    """Everything a training run is made of."""

    recipe: Recipe
    out: Path
    """The run directory (train.output_dir)."""
    precision: str
    """bf16, fp16 or fp32: train.precision resolved for this machine."""
    engine: dict[str, Any]
    """What runs: engine.json (pace_llm/stepper.py ``describe``)."""
    tokenizer: Any
    task: TaskData
    model: nn.Module
    """The transformers model with NoisyLoRALinear layers (inside the objective)."""
    adapted: list[str]
    """The adapted layers' names."""
    stepper: Stepper
    """The engine around the PaceObjective (pace_llm/stepper.py)."""
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    """The training batch (padding, labels) of a list of examples."""
    pad_multiple: int
    """Batches are padded to a multiple of it: data.pad_to_multiple_of, or 8 on a GPU and 1 on
    a CPU."""
    batches: BatchOrder
    """The order of global batches."""
    max_steps: int
    history: FastHistory | None
    """pace.mode fast: last epoch's outputs."""
    served_name: str
    """What the adapter records as its base: a hub id as given, a local directory absolute."""
    chat_template: str | None = None
    """The chat template the data was rendered with (exported beside the adapter and with the
    merged model's tokenizer); None: no chat layout was trained."""

    @property
    def causal(self) -> bool:
        return self.task.kind == "causal_lm"
