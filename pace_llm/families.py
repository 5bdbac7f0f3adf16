"""Model families: everything pace_llm knows about an architecture, one table entry each.

An entry names the transformers ``model_type`` values it covers and gives

- ``attn`` / ``mlp``: the block-relative linear names the ``lora.targets`` presets adapt;
- ``heads``: top-level task-head modules that train beside the adapters (sequence
  classification) and are exported in PEFT's ``modules_to_save`` form;
- ``full_precision``: modules never quantized under QLoRA (heads, lm_head, poolers);
- ``embeddings``: vocabulary modules (an adapter there is one vLLM cannot serve);
- ``shapes(sizes)``: ``(out_features, in_features)`` of each adaptable linear from the model
  config's sizes, which the vLLM contract check compares an adapter's tensors against.

Adding a family is one entry in :data:`FAMILIES` (a test registers one and trains, exports and
checks it). Any other model still trains with an explicit ``lora.targets`` list; for it the
head, full-precision and embedding names of all families together apply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Shape = tuple[int, int]  # (out_features, in_features)


@dataclass(frozen=True)
class Sizes:
    """The config sizes the shape formulas read (head_dim and kv heads resolved)."""

    hidden: int
    intermediate: int
    q: int   # num_attention_heads x head_dim
    kv: int  # num_key_value_heads x head_dim

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Sizes | None:
        hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
        if not isinstance(hidden, int) or not isinstance(heads, int):
            return None
        head_dim = cfg.get("head_dim") or hidden // heads
        kv_heads = cfg.get("num_key_value_heads") or heads
        return cls(hidden=hidden, intermediate=cfg.get("intermediate_size") or 4 * hidden,
                   q=heads * head_dim, kv=kv_heads * head_dim)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    attn: tuple[str, ...]
    mlp: tuple[str, ...]
    shapes: Callable[[Sizes], dict[str, Shape]]
    heads: tuple[str, ...] = ()
    full_precision: tuple[str, ...] = ()
    embeddings: tuple[str, ...] = ()

    def preset(self, parts: tuple[str, ...]) -> list[str]:
        """The target names of the preset parts ("attn", "mlp")."""
        return [name for part in parts for name in getattr(self, part)]

    def shape(self, rel_name: str, sizes: Sizes) -> Shape | None:
        """(out, in) of a block-relative linear name: the longest table name it ends with."""
        table = self.shapes(sizes)
        hits = [k for k in table if rel_name == k or rel_name.endswith("." + k)]
        return table[max(hits, key=len)] if hits else None


def _decoder_shapes(s: Sizes) -> dict[str, Shape]:
    return {"q_proj": (s.q, s.hidden), "k_proj": (s.kv, s.hidden), "v_proj": (s.kv, s.hidden),
            "o_proj": (s.hidden, s.q), "gate_proj": (s.intermediate, s.hidden),
            "up_proj": (s.intermediate, s.hidden), "down_proj": (s.hidden, s.intermediate)}


def _phi3_shapes(s: Sizes) -> dict[str, Shape]:
    return {"qkv_proj": (s.q + 2 * s.kv, s.hidden), "o_proj": (s.hidden, s.q),
            "gate_up_proj": (2 * s.intermediate, s.hidden),
            "down_proj": (s.hidden, s.intermediate)}


def _encoder_shapes(s: Sizes) -> dict[str, Shape]:
    return {"attention.self.query": (s.q, s.hidden), "attention.self.key": (s.kv, s.hidden),
            "attention.self.value": (s.kv, s.hidden),
            "attention.output.dense": (s.hidden, s.hidden),
            "intermediate.dense": (s.intermediate, s.hidden),
            "output.dense": (s.hidden, s.intermediate)}


_DECODER_HEADS = ("score",)
_DECODER_FULL = ("lm_head", "score")
_DECODER_EMBEDDINGS = ("embed_tokens", "lm_head")

FAMILIES: dict[str, Family] = {
    "llama-style": Family(
        "llama-style",
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
        attn=("q_proj", "k_proj", "v_proj", "o_proj"), mlp=("gate_proj", "up_proj", "down_proj"),
        shapes=_decoder_shapes, heads=_DECODER_HEADS, full_precision=_DECODER_FULL,
        embeddings=_DECODER_EMBEDDINGS),
    "phi3": Family(
        "phi3", ("phi3",), attn=("qkv_proj", "o_proj"), mlp=("gate_up_proj", "down_proj"),
        shapes=_phi3_shapes, heads=_DECODER_HEADS, full_precision=_DECODER_FULL,
        embeddings=_DECODER_EMBEDDINGS),
    "bert-style": Family(
        "bert-style", ("bert", "roberta", "xlm-roberta"),
        attn=("attention.self.query", "attention.self.key", "attention.self.value",
              "attention.output.dense"),
        mlp=("intermediate.dense", "output.dense"), shapes=_encoder_shapes,
        heads=("classifier",), full_precision=("classifier", "pooler", "qa_outputs"),
        embeddings=("word_embeddings",)),
}
"""Family name -> entry. Keys are free names; ``model_types`` decides which models match."""

PRESETS: dict[str, tuple[str, ...]] = {"attn": ("attn",), "mlp": ("mlp",),
                                       "attn+mlp": ("attn", "mlp")}
"""lora.targets presets that read a family's table; ``all-linear`` needs no table."""
PRESET_NAMES = (*PRESETS, "all-linear")
_OTHER_EMBEDDINGS = ("wte", "embed_out", "embed_in")  # GPT-2 / GPT-NeoX vocabularies


def family_of(model_type: str | None) -> Family | None:
    """The entry covering ``model_type``, or None."""
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def model_types() -> list[str]:
    """Every model_type with an entry (for messages)."""
    return sorted(t for f in FAMILIES.values() for t in f.model_types)


def _union(attr: str, model_type: str | None) -> tuple[str, ...]:
    family = family_of(model_type)
    if family is not None:
        return getattr(family, attr)
    seen: dict[str, None] = {}
    for f in FAMILIES.values():
        seen.update(dict.fromkeys(getattr(f, attr)))
    return tuple(seen)


def head_names(model_type: str | None) -> tuple[str, ...]:
    """Task-head module names for this model type (all families' for an unknown one)."""
    return _union("heads", model_type)


def full_precision_names(model_type: str | None) -> tuple[str, ...]:
    """Modules kept out of quantization for this model type (all families' if unknown)."""
    return _union("full_precision", model_type)


def embedding_names() -> tuple[str, ...]:
    """Every vocabulary module name any family (or GPT-2/NeoX) uses."""
    return tuple(dict.fromkeys(_union("embeddings", None) + _OTHER_EMBEDDINGS))


def expected_shape(rel_name: str, cfg: Mapping[str, Any]) -> Shape | None:
    """(out_features, in_features) of a block-relative linear name for a model config, or None.

    Uses the config's family when it has one, else the first family whose table knows the
    name. Mixture-of-experts layers (their own sizes) are not covered.
    """
    sizes = Sizes.from_config(cfg)
    if sizes is None or "expert" in rel_name:
        return None
    family = family_of(cfg.get("model_type"))
    candidates = [family] if family is not None else list(FAMILIES.values())
    return next((s for f in candidates if (s := f.shape(rel_name, sizes)) is not None), None)
