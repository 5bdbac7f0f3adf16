"""Put NoisyLoRALinear layers into a model: target presets, one matching rule, σ per block.

Matching rule (one rule, no substrings): a module's *block-relative name* is its name after the
numbered block it sits in (``model.layers.3.self_attn.q_proj`` → ``self_attn.q_proj``). A
target matches a linear layer when it equals that block-relative name, or — for a one-word
target like ``q_proj`` — equals its last component. So ``output.dense`` (BERT's MLP output)
does not match ``attention.output.dense``. Only layers inside numbered blocks are eligible:
lm_head, embeddings, poolers and classification heads are never patched.

σ schedule (docs/PACE.md §2): with L blocks indexed l = 0..L−1 from the embedding side,
``σ_l = σ·(L−l)/L`` (linear_decay) or ``σ`` (constant); ``σ_l = 0`` for l < skip_first_blocks
and for pace.mode = off.
"""

from __future__ import annotations

import logging
import re

from torch import nn

from pace_llm.errors import UserError
from pace_llm.families import PRESETS, family_of, model_types
from pace_llm.lora import NoisyLoRALinear, ViewSharedDropout
from pace_llm.quant import is_quantized_linear
from pace_llm.schema import LoraArgs, PaceArgs

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<idx>\d+)\.(?P<rel>.+)$")

# config attributes that hold attention-probability dropout, set to 0 under PACE
_ATTN_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def block_relative(name: str) -> tuple[int | None, str]:
    """Split ``model.layers.3.self_attn.q_proj`` into (3, ``self_attn.q_proj``)."""
    m = _BLOCK.match(name)
    if m is None:
        return None, name
    return int(m.group("idx")), m.group("rel")


def target_suffixes(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Expand a preset name into the family's suffixes; a list is returned as given."""
    if not isinstance(targets, str):
        return list(targets)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if targets == "all-linear":
        return sorted({rel for _, rel in _candidate_linears(model).values()})
    family = family_of(model_type)
    if family is None:
        raise UserError(f"lora.targets: no preset for model type {model_type!r} (presets exist for "
                        f"{', '.join(model_types())}); give an explicit list from its linear "
                        f"layers: {', '.join(linear_suffixes(model))}")
    if targets not in PRESETS:
        raise UserError(f"lora.targets: unknown preset {targets!r}; allowed: attn, mlp, attn+mlp, "
                        "all-linear, or a list of module-name suffixes")
    return family.preset(PRESETS[targets])


def _candidate_linears(model: nn.Module) -> dict[str, tuple[int, str]]:
    """name -> (block index, block-relative name) for every nn.Linear inside a numbered block."""
    out = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear or is_quantized_linear(module):
            idx, rel = block_relative(name)
            if idx is not None:
                out[name] = (idx, rel)
    return out


def linear_suffixes(model: nn.Module) -> list[str]:
    """The distinct block-relative names of the model's patchable linear layers."""
    return sorted({rel for _, rel in _candidate_linears(model).values()})


def _matches(rel: str, target: str) -> bool:
    return rel == target or ("." not in target and rel.rsplit(".", 1)[-1] == target)


def num_blocks(model: nn.Module, candidates: dict[str, tuple[int, str]]) -> int:
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        return n
    return max(idx for idx, _ in candidates.values()) + 1


def block_sigma(pace: PaceArgs, block: int, n_blocks: int) -> float:
    """σ_l for block l of L (docs/PACE.md §2)."""
    if pace.mode == "off" or block < pace.skip_first_blocks:
        return 0.0
    if pace.sigma_schedule == "constant":
        return pace.sigma
    return pace.sigma * (n_blocks - block) / n_blocks


def inject_noisy_lora(model: nn.Module, lora: LoraArgs, pace: PaceArgs,
                      trainable_head: list[str] | None = None) -> list[str]:
    """Replace every targeted linear layer with a NoisyLoRALinear; freeze everything else.

    Args:
        model: a transformers model (or any module with numbered blocks).
        lora: rank, alpha, dropout, targets, rslora.
        pace: mode and σ schedule (σ is 0 everywhere for mode = off).
        trainable_head: names of top-level modules (e.g. a classifier ``score``) that stay
            trainable alongside the adapters.

    Returns:
        The names of the replaced modules, in model order.

    Raises:
        UserError: a requested target matched no linear layer (the message lists the model's
            linear-layer suffixes).
    """
    candidates = _candidate_linears(model)
    if not candidates:
        raise UserError(no_linears_message(model))
    targets = target_suffixes(model, lora.targets)
    unmatched = [t for t in targets if not any(_matches(rel, t) for _, rel in candidates.values())]
    if unmatched:
        raise UserError(f"lora.targets: {', '.join(unmatched)} matched no linear layer of this "
                        f"model; its linear layers are: {', '.join(linear_suffixes(model))}")
    n_blocks = num_blocks(model, candidates)
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = []
    for name, (idx, rel) in candidates.items():
        if not any(_matches(rel, t) for t in targets):
            continue
        layer = NoisyLoRALinear(model.get_submodule(name), r=lora.r, alpha=lora.alpha,
                                dropout=lora.dropout, sigma=block_sigma(pace, idx, n_blocks),
                                rslora=lora.rslora)
        model.set_submodule(name, layer)
        replaced.append(name)
    for head in trainable_head or []:
        for p in model.get_submodule(head).parameters():
            p.requires_grad_(True)
    if not replaced:  # every target matched nothing that is patchable
        raise UserError(f"lora.targets: {lora.targets!r} adapted no layer of this model; its "
                        f"linear layers are: {', '.join(linear_suffixes(model))}")
    if pace.mode != "off":
        _share_base_dropout(model)
    return replaced


def no_linears_message(model: nn.Module) -> str:
    """Why a model has nothing to adapt: the weight-carrying module types its blocks hold."""
    kinds: dict[str, int] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        shape = getattr(weight, "ds_shape", None) or getattr(weight, "shape", ())  # ZeRO-3: ds_
        if block_relative(name)[0] is not None and len(shape) == 2:
            kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
    found = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "none"
    gpt2 = ("GPT-2's Conv1D layers are not supported; " if "Conv1D" in kinds else "")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return (f"lora.targets: the {model_type or type(model).__name__} model has no nn.Linear "
            f"layer inside its numbered blocks to adapt (2-D weight modules found: {found}). "
            f"{gpt2}use a model whose blocks use nn.Linear (e.g. Llama, Qwen2, Mistral, Phi-3, "
            "BERT/RoBERTa)")


def _share_base_dropout(model: nn.Module) -> None:
    """Make the base model's dropout identical across PACE views (docs/PACE.md §1).

    nn.Dropout modules become ViewSharedDropout; attention-probability dropout, which fused
    attention draws internally, is set to 0 with a notice.
    """
    config = getattr(model, "config", None)
    for key in _ATTN_DROPOUT_KEYS:
        if config is not None and getattr(config, key, 0.0):
            log.warning("PACE: %s=%s set to 0 so the two views see the same attention",
                        key, getattr(config, key))
            setattr(config, key, 0.0)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout and "Attention" in type(module).__name__ and child.p:
                log.warning("PACE: attention-probability dropout %s.%s (p=%s) set to 0",
                            name, child_name, child.p)
                child.p = 0.0
            if type(child) is nn.Dropout:
                shared = ViewSharedDropout(child.p, child.inplace)
                shared.train(child.training)
                setattr(module, child_name, shared)
    for module in model.modules():  # attention modules that cache the probability as a float
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = 0.0


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter, in model order (adapters plus any trainable head)."""
    return [p for p in model.parameters() if p.requires_grad]
