"""pace_llm: PACE (noisy LoRA + consistency regularisation) fine-tuning on DeepSpeed."""

from pace_llm.config import (DataArgs, EvalArgs, ExportArgs, LoraArgs, ModelArgs, PaceArgs,
                             QuantArgs, Recipe, TrainArgs, load_recipe)
from pace_llm.errors import UserError
from pace_llm.inject import inject_noisy_lora
from pace_llm.lora import NoisyLoRALinear, adapters_disabled, shared_views

__all__ = ["DataArgs", "EvalArgs", "ExportArgs", "LoraArgs", "ModelArgs", "NoisyLoRALinear",
           "PaceArgs", "QuantArgs", "Recipe", "TrainArgs", "UserError", "adapters_disabled",
           "inject_noisy_lora", "load_recipe", "shared_views"]
