"""pace_llm: PACE (noisy LoRA + consistency regularisation) fine-tuning on DeepSpeed.

The public pieces: the recipe schema and its parser, the layer and its injection, the PACE
step plan and objective, and the model-family table. A run is ``with
pace_llm.setup.started(recipe) as trainer: trainer.train()`` (what ``pace-llm train`` does,
with ``results.finish`` after the last step).
"""

from pace_llm.config import load_recipe
from pace_llm.errors import UserError
from pace_llm.families import FAMILIES, Family
from pace_llm.inject import inject_noisy_lora
from pace_llm.lora import NoisyLoRALinear, adapters_disabled, shared_views
from pace_llm.objective import PaceObjective, StepPlan, step_plan
from pace_llm.schema import (DataArgs, EvalArgs, ExportArgs, LoraArgs, ModelArgs, PaceArgs,
                             QuantArgs, Recipe, TrainArgs)

__all__ = ["FAMILIES", "DataArgs", "EvalArgs", "ExportArgs", "Family", "LoraArgs", "ModelArgs",
           "NoisyLoRALinear", "PaceArgs", "PaceObjective", "QuantArgs", "Recipe", "StepPlan",
           "TrainArgs", "UserError", "adapters_disabled", "inject_noisy_lora", "load_recipe",
           "shared_views", "step_plan"]
