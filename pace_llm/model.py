"""Tokenizer and base-model loading: hub ids and local directories, causal LM or classifier.

Under ZeRO-3 the weights are partitioned while loading (transformers reads the DeepSpeed config
kept alive in ``HfDeepSpeedConfig``), so no rank ever holds the whole model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pace_llm.config import Recipe
from pace_llm.dsconfig import zero_stage
from pace_llm.dtypes import resolve
from pace_llm.errors import UserError
from pace_llm.families import head_names

log = logging.getLogger(__name__)



def _hub_kwargs(recipe: Recipe) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.revision:
        kw["revision"] = recipe.model.revision
    return kw


def load_tokenizer(name_or_path: str, recipe: Recipe):
    """The base model's tokenizer, with a pad token that does not grow the vocabulary."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **_hub_kwargs(recipe))
    except OSError as exc:
        raise UserError(f"model.name_or_path: cannot load a tokenizer from {name_or_path!r}: "
                        f"{exc}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token_id is None:
        raise UserError(f"the tokenizer of {name_or_path!r} has no pad, eos or unk token to pad with")
    return tok


def weight_dtype(recipe: Recipe, precision: str) -> torch.dtype:
    """model.dtype, or the training precision's dtype when auto."""
    return resolve(recipe.model.dtype, precision)


def load_model(name_or_path: str, recipe: Recipe, *, causal: bool, num_labels: int | None,
               pad_token_id: int, dtype: torch.dtype, ds_config: dict | None) -> nn.Module:
    """The frozen base model (causal LM or sequence classifier), partitioned under ZeRO-3."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kw: dict[str, Any] = dict(_hub_kwargs(recipe), dtype=dtype)
    if recipe.model.attn_implementation:
        kw["attn_implementation"] = recipe.model.attn_implementation
    keep_alive = _zero3_loading(ds_config)  # noqa: F841  (must live until the model is built)
    if causal:
        cls = AutoModelForCausalLM
    else:
        cls = AutoModelForSequenceClassification
        kw.update(num_labels=num_labels, pad_token_id=pad_token_id)
        if num_labels == 1:
            kw["problem_type"] = "regression"
    if recipe.quant.bits in (4, 8):
        from pace_llm.quant import load_quantized

        model = load_quantized(cls, name_or_path, recipe.quant, dtype,
                               zero_stage(ds_config) if ds_config else 0, **kw)
    else:
        try:
            model = cls.from_pretrained(name_or_path, **kw)
        except OSError as exc:
            raise UserError(f"model.name_or_path: cannot load {name_or_path!r}: {exc}") from None
    if causal and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def classifier_head(model: nn.Module) -> list[str]:
    """Names of the task head that trains alongside the adapters (empty for causal LMs)."""
    heads = head_names(getattr(model.config, "model_type", None))
    return [n for n, _ in model.named_children() if n in heads]


def _zero3_loading(ds_config: dict | None):
    if not ds_config or zero_stage(ds_config) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def base_model_dir(recipe: Recipe, output_dir: Path) -> str:
    """Where the base model is read from: model.name_or_path, or the offline-built base."""
    if recipe.model.build is not None:
        return str(output_dir / "base_model")
    return recipe.model.name_or_path
