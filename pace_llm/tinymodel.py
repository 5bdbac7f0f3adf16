"""The offline base model: a sentencepiece tokenizer trained on the task's text and a random-init
transformers model built from a config dict (``model.build``). No hub access is needed.

The tokenizer is Llama-style BPE (byte fallback, digits split one per token, identity
normalisation, unk/bos/eos = 0/1/2, BOS added to every encoding); its pad token is ``<unk>``,
so the vocabulary does not grow. It is saved with ``save_pretrained`` (``tokenizer.json``),
so reloading needs neither protobuf nor sentencepiece. Everything is deterministic given the
seed.
"""

from __future__ import annotations

import difflib
import io
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from pace_llm.errors import UserError, first_line

log = logging.getLogger(__name__)

DEFAULT_VOCAB = 512
MIN_VOCAB = 300  # 3 specials + 256 byte pieces + a few merges


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = DEFAULT_VOCAB) -> Any:
    """Train a sentencepiece BPE tokenizer on ``texts``, save it (HF format) in ``out_dir``.

    ``vocab_size`` is an upper bound: a small corpus yields fewer pieces. Returns the loaded
    transformers tokenizer (BOS added, pad = unk).
    """
    import sentencepiece as spm

    if vocab_size < MIN_VOCAB:
        raise UserError(f"model.build.vocab_size: {vocab_size} is too small for a byte-fallback "
                        f"tokenizer; use >= {MIN_VOCAB} (e.g. 512)")
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    if not lines:
        raise UserError("model.build: the task has no text to train a tokenizer on")
    log.info("model.build: training a BPE tokenizer (at most %d pieces) on %d lines of the "
             "task's text", vocab_size, len(lines))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True, split_digits=True,
        character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2)
    tok = tokenizer_from_sentencepiece(model.getvalue(), out_dir)
    log.info("trained a %d-piece BPE tokenizer on %d lines -> %s", len(tok), len(lines), out_dir)
    return tok


def tokenizer_from_sentencepiece(model: bytes | Path, out_dir: Path) -> Any:
    """A sentencepiece ``.model`` (bytes or file) as a transformers tokenizer saved in ``out_dir``.

    Loaded as ``tokenizer.model`` with ``AutoTokenizer`` (needs protobuf once), BOS added to
    every encoding, pad = unk, then saved with ``save_pretrained`` and reloaded from there.
    """
    from transformers import AutoTokenizer

    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(data)
        tok = AutoTokenizer.from_pretrained(tmp, add_bos_token=True)
    if tok.unk_token is None:
        raise UserError("the sentencepiece model has no unk piece to pad with")
    tok.pad_token = tok.unk_token
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def build_base(build: dict[str, Any], texts: list[str], out_dir: Path, seed: int = 0) -> Path:
    """Train a tokenizer on ``texts`` and save it with a random-init model built from ``build``.

    ``build`` is a transformers config dict with ``model_type`` (e.g. ``llama``) and sizes; its
    ``vocab_size`` (default 512) bounds the tokenizer, and the model gets the tokenizer's real
    size and special-token ids. Returns ``out_dir``, loadable with ``from_pretrained``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    problem = build_problem(build)
    if problem:
        raise UserError(problem)
    out_dir = Path(out_dir)
    tok = train_tokenizer(texts, out_dir, int(build.get("vocab_size", DEFAULT_VOCAB)))
    kwargs = {**build, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
              "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    try:
        config = AutoConfig.for_model(**kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(f"model.build: {exc}") from None
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, RuntimeError) as exc:  # sizes that do not fit together
        raise UserError(f"model.build: cannot build a {build['model_type']} from "
                        f"{_short_dict(build)}: {first_line(exc)}") from None
    model.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built a random-init %s with %d parameters -> %s", build["model_type"], n_params,
             out_dir)
    return out_dir


def build_problem(build: Any) -> str | None:
    """What is wrong with a ``model.build`` dict, found without building anything (None = ok):
    it needs a model_type that transformers can build as a causal LM."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    examples = ", ".join(EXAMPLE_TYPES)
    if not isinstance(build, dict) or "model_type" not in build:
        return ("model.build needs a model_type (e.g. llama) plus sizes such as "
                "hidden_size, num_hidden_layers, num_attention_heads")
    kind = build["model_type"]
    causal = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if not isinstance(kind, str) or kind not in CONFIG_MAPPING_NAMES:
        near = difflib.get_close_matches(str(kind), causal, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return (f"model.build: model_type {kind!r} is not a transformers model type{hint} "
                f"({len(causal)} causal-LM types, e.g. {examples})")
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return (f"model.build: model_type {kind!r} has no causal-LM class, and the offline base "
                f"is built as a causal LM; use one that has (e.g. {examples})")
    return None


EXAMPLE_TYPES = ("llama", "qwen2", "mistral", "phi3")


def _short_dict(d: dict[str, Any], limit: int = 120) -> str:
    text = repr(d)
    return text if len(text) <= limit else text[:limit - 4] + "...}"
