"""Shared fixtures: tiny seeded models of each family, built from a config (no hub)."""

from __future__ import annotations

import atexit
import os
import shutil
import site
import tempfile

# Nothing a test runs may read or write the user's home: HOME, the XDG folders, every Hugging
# Face cache, the task cache and matplotlib's config point into one temporary folder, set here
# at import (before huggingface_hub, datasets or a test module reads them; tests/test_bad_inputs
# copies this environment at its import) and removed when the session ends. Forked children
# and subprocesses inherit it.
HOME = tempfile.mkdtemp(prefix="pace_llm-tests-home-")
atexit.register(shutil.rmtree, HOME, ignore_errors=True)
os.environ.setdefault("PYTHONUSERBASE", site.getuserbase())  # a --user install stays visible
for _key, _sub in {"HOME": "", "XDG_CACHE_HOME": ".cache", "XDG_CONFIG_HOME": ".config",
                   "XDG_DATA_HOME": ".local/share", "XDG_STATE_HOME": ".local/state",
                   "HF_HOME": ".cache/huggingface", "PACE_LLM_CACHE": ".cache/pace_llm",
                   "MPLCONFIGDIR": ".config/matplotlib", "TORCH_HOME": ".cache/torch"}.items():
    os.environ[_key] = os.path.join(HOME, _sub)
for _key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE",
             "HF_TOKEN", "HF_TOKEN_PATH", "NETRC", "WANDB_API_KEY", "WANDB_MODE",
             "WANDB_IDENTITY_TOKEN_FILE", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_key, None)  # set by the user: they would point outside, or log a test in

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# no test reaches the hub (there is none here); set before huggingface_hub reads it at import,
# so children forked from this process (tests/launch.py) are offline too
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

DATA = Path(__file__).resolve().parent / "fixtures"  # small samples; see fixtures/SOURCES.md

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**SMALL, **overrides})
    return LlamaForCausalLM(cfg).float().eval()


def runs(tok, example: dict) -> list[tuple[bool, str]]:
    """(supervised, decoded text) for each maximal run of a causal-LM example's labels."""
    out, cur, sup = [], [], None
    for token, label in zip(example["input_ids"], example["labels"]):
        if sup is not None and (label != -100) != sup:
            out.append((sup, tok.decode(cur)))
            cur = []
        sup = label != -100
        cur.append(token)
    return out + [(sup, tok.decode(cur))]


def noisy_llama(checkpointing: bool) -> tuple[torch.nn.Module, list[int]]:
    """A tiny Llama in training mode with noisy LoRA (σ 1, B ≠ 0, so the noise reaches the
    output), gradient checkpointing on or off, and a list that counts block 0's q_proj
    forwards (a recompute shows as a second call)."""
    from pace_llm import LoraArgs, PaceArgs, inject_noisy_lora
    from pace_llm.lora import lora_layers

    model = tiny_llama(seed=3)
    inject_noisy_lora(model, LoraArgs(r=4), PaceArgs(sigma=1.0))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.1)
    calls: list[int] = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, calls


@pytest.fixture
def llama():
    return tiny_llama()


def data_lines(path: Path, header: bool = False) -> list[str]:
    """The data rows of a fixture file as text lines: non-empty lines, less a header line.

    Tests that count rows or sum labels compute the expected value from the fixture file, so the
    samples can be re-cut (fixtures/SOURCES.md) without touching the tests.
    """
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return lines[1:] if header else lines


@pytest.fixture
def data_dir() -> Path:
    return DATA


def save_fixture_tokenizer(out: Path):
    """The fixture's sentencepiece BPE tokenizer (512 pieces) saved in ``out`` as a hub model's."""
    import shutil

    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / "tokenizers" / "llama2c_tinystories_bpe512_bytefallback.model",
                out / "tokenizer.model")
    tok = AutoTokenizer.from_pretrained(out)
    tok.save_pretrained(out)
    (out / "tokenizer.model").unlink()
    return tok


def save_tiny_base(out: Path, seed: int = 0, **overrides) -> Path:
    """A tiny Llama and a real sentencepiece BPE tokenizer (512 pieces), saved like a hub model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = save_fixture_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**SMALL, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                         "eos_token_id": tok.eos_token_id, "max_position_embeddings": 512,
                         **overrides})
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("tiny_base"))
