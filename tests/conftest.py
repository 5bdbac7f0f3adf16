"""Shared fixtures: tiny seeded models of each family, built from a config (no hub)."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**SMALL, **overrides})
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"../shared/data not found at {DATA}; tests need the shared data beside the repo")
    return DATA
