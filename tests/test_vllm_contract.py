"""The offline vLLM adapter-contract check: rejects every bad adapter with a message naming the
problem, accepts every adapter the project writes (all presets, rsLoRA, every family)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL, tiny_llama
from safetensors.torch import load_file, save_file

from pace_llm.errors import UserError
from pace_llm.export import export_adapter
from pace_llm.families import expected_shape
from pace_llm.inject import inject_noisy_lora
from pace_llm.lora import lora_layers
from pace_llm.schema import LoraArgs, PaceArgs
from pace_llm.vllm_contract import check_vllm_contract, contract_violations, required_max_lora_rank

P = "base_model.model.model.layers.0."


def trained(model, r=8, targets="attn+mlp", rslora=False, seed=1):
    """Inject adapters and give every lora_B random non-zero values (a 'trained' adapter)."""
    inject_noisy_lora(model, LoraArgs(r=r, alpha=2 * r, targets=targets, rslora=rslora),
                      PaceArgs(mode="full", sigma=0.5))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("good") / "adapter"
    export_adapter(trained(tiny_llama()), d, base_model_name_or_path="tiny", task_type="CAUSAL_LM",
                   dtype=torch.bfloat16)
    return d


def _read(d: Path):
    return json.loads((d / "adapter_config.json").read_text()), load_file(str(d / "adapter_model.safetensors"))


def _write(d: Path, config, tensors) -> Path:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "adapter_model.safetensors"))
    return d


def _rank4(c, t):
    for k in list(t):
        t[k] = t[k][:4] if k.endswith("lora_A.weight") else t[k][:, :4]


def _rank(n):
    """Config r = n and tensors of rank n (zero-padded), so only the rank itself is at issue."""
    def mutate(c, t):
        c["r"] = n
        for k in list(t):
            a = k.endswith("lora_A.weight")
            pad = torch.zeros((n - 8, t[k].shape[1]) if a else (t[k].shape[0], n - 8), dtype=t[k].dtype)
            t[k] = torch.cat([t[k], pad], dim=0 if a else 1)
    return mutate


def _bigger_hidden(c, t):  # unchanged adapter, checked against a hidden-128 base config
    pass


def _rename_one_module(c, t):
    for k in [k for k in t if ".layers.0.self_attn.q_proj." in k]:
        t[k.replace(".weight", ".default.weight")] = t.pop(k)


BAD = [  # (case, mutate(config, tensors), max_lora_rank, base config, expected text)
    ("rank 48 on a default server", _rank(48), 16, None,
     ("r = 48 is greater than max_lora_rank 16 (vLLM: 'LoRA rank 48 is greater than max_lora_rank "
      "16'); serve with --max-lora-rank 64")),
    ("rank above 512", _rank(600), None, None,
     "r = 600 is above vLLM's largest --max-lora-rank (512"),
    ("DoRA", lambda c, t: c.update(use_dora=True), None, None, "use_dora: true — vLLM does not support DoRA"),
    ("DoRA magnitude tensor",
     lambda c, t: t.update({P + "self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}), None, None,
     "are not LoRA weights"),
    ("bias", lambda c, t: c.update(bias="all"), None, None, "bias = 'all': vLLM accepts only bias 'none'"),
    ("modules_to_save on CAUSAL_LM", lambda c, t: c.update(modules_to_save=["lm_head"]), None, None,
     "modules_to_save = ['lm_head']: vLLM serves no fully-saved modules"),
    ("embedding tensors",
     lambda c, t: t.update({"base_model.model.model.embed_tokens.weight": torch.zeros(128, 64)}),
     None, None, "embedding/lm_head tensors base_model.model.model.embed_tokens.weight"),
    ("lm_head tensors",
     lambda c, t: t.update({"base_model.model.lm_head.weight": torch.zeros(128, 64)}),
     None, None, "embedding/lm_head tensors base_model.model.lm_head.weight"),
    ("config r != tensor rank", _rank4, None, None, "tensor rank differs from config r = 8"),
    ("target without tensors", lambda c, t: c["target_modules"].append("fc_out"), None, None,
     "target_modules ['fc_out'] have no lora_A/lora_B tensors"),
    ("tensors for an unlisted target", lambda c, t: c["target_modules"].remove("o_proj"), None, None,
     ("modules model.layers.0.self_attn.o_proj, model.layers.1.self_attn.o_proj have tensors but "
      "match no entry of target_modules")),
    ("shapes for another hidden size", _bigger_hidden, None, {**SMALL, "hidden_size": 128},
     "tensor shapes do not fit the base model (hidden_size 128"),
    ("more layers than the base", lambda c, t: None, None, {**SMALL, "num_hidden_layers": 1},
     "modules model.layers.1.mlp.down_proj"),
    ("all-linear in config", lambda c, t: c.update(target_modules="all-linear"), None, None,
     "target_modules = 'all-linear': must be an explicit, non-empty list"),
    ("adapter-name segment", _rename_one_module, None, None,
     "carry an adapter-name segment ('.default.')"),
    ("B all zero", lambda c, t: t.update({k: torch.zeros_like(v) for k, v in t.items()
                                          if k.endswith("lora_B.weight")}), None, None,
     "every lora_B is all-zero: the adapter is a no-op"),
    ("NaN", lambda c, t: t[P + "self_attn.q_proj.lora_A.weight"].fill_(float("nan")), None, None,
     "NaN/inf values in model.layers.0.self_attn.q_proj.lora_A"),
    ("missing required field", lambda c, t: c.pop("lora_alpha"), None, None,
     "lacks required field(s) lora_alpha"),
    ("rank_pattern", lambda c, t: c.update(rank_pattern={"q_proj": 4}), None, None,
     "rank_pattern = {'q_proj': 4}: per-module ranks/alphas"),
    ("SEQ_CLS task", lambda c, t: c.update(task_type="SEQ_CLS"), None, None,
     "task_type 'SEQ_CLS': vLLM serves generation adapters (CAUSAL_LM)"),
    ("PiSSA init", lambda c, t: c.update(init_lora_weights="pissa"), None, None,
     "init_lora_weights = 'pissa': vLLM rejects"),
]


@pytest.mark.parametrize("case,mutate,max_rank,base,expected", BAD, ids=[b[0] for b in BAD])
def test_rejects_bad_adapter(good, tmp_path, case, mutate, max_rank, base, expected):
    config, tensors = _read(good)
    mutate(config, tensors)
    d = _write(tmp_path / "bad", config, tensors)
    with pytest.raises(UserError) as err:
        check_vllm_contract(d, base_config=base, max_lora_rank=max_rank)
    assert expected in str(err.value)
    assert "breaks vLLM's adapter contract (1 problem(s))" in str(err.value)


def test_one_error_lists_every_violation(good, tmp_path):
    config, tensors = _read(good)
    config.update(use_dora=True, bias="lora_only", modules_to_save=["score"])
    _rank4(config, tensors)
    with pytest.raises(UserError) as err:
        check_vllm_contract(_write(tmp_path / "bad", config, tensors))
    text = str(err.value)
    assert "(4 problem(s))" in text and text.count("\n  - ") == 4
    for needle in ("DoRA", "bias = 'lora_only'", "modules_to_save = ['score']", "tensor rank differs"):
        assert needle in text


def test_missing_files_and_dirs(good, tmp_path):
    with pytest.raises(UserError, match="adapter directory .* does not exist"):
        check_vllm_contract(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="adapter_model.safetensors missing"):
        check_vllm_contract(tmp_path / "half")
    (tmp_path / "half" / "adapter_model.safetensors").write_bytes(b"garbage!" * 4)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        check_vllm_contract(tmp_path / "half")
    with pytest.raises(UserError, match="--max-lora-rank 48 is not a value vLLM accepts"):
        check_vllm_contract(good, max_lora_rank=48)


def test_required_max_lora_rank():
    got = {r: required_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 48, 300, 320, 512, 513)}
    assert got == {1: 1, 2: 8, 8: 8, 9: 16, 16: 16, 48: 64, 300: 320, 320: 320, 512: 512, 513: None}


def test_expected_shapes():
    phi3 = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2}
    assert expected_shape("self_attn.qkv_proj", phi3) == (64 + 2 * 32, 64)
    assert expected_shape("mlp.gate_up_proj", phi3) == (256, 64)
    gemma = {**phi3, "num_key_value_heads": 1, "head_dim": 256}
    assert expected_shape("self_attn.q_proj", gemma) == (1024, 64)
    assert expected_shape("self_attn.o_proj", gemma) == (64, 1024)
    assert expected_shape("self_attn.v_proj", gemma) == (256, 64)
    bert = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4}
    assert expected_shape("attention.output.dense", bert) == (64, 64)
    assert expected_shape("output.dense", bert) == (64, 256)
    assert expected_shape("intermediate.dense", bert) == (256, 64)
    assert expected_shape("mlp.experts.3.gate_proj", phi3) is None


def _family(name: str):
    import transformers

    cfgs = {"phi3": ("Phi3Config", "Phi3ForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
            "gemma": ("GemmaConfig", "GemmaForCausalLM")}
    cfg_cls, model_cls = (getattr(transformers, n) for n in cfgs[name])
    torch.manual_seed(0)
    extra = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    return model_cls(cfg_cls(**SMALL, **extra)).float()


ACCEPT = [("llama", "attn", False, 8), ("llama", "mlp", False, 8), ("llama", "attn+mlp", True, 8),
          ("llama", "all-linear", False, 16), ("llama", ["q_proj", "v_proj"], True, 48),
          ("phi3", "attn+mlp", False, 8), ("qwen2", "attn+mlp", True, 8),
          ("qwen3", "attn+mlp", False, 8), ("mistral", "attn+mlp", False, 32),
          ("gemma", "attn+mlp", True, 8)]


@pytest.mark.parametrize("family,targets,rslora,r", ACCEPT,
                         ids=[f"{a[0]}-{a[1]}-rslora{a[2]}-r{a[3]}" for a in ACCEPT])
def test_accepts_every_project_adapter(tmp_path, family, targets, rslora, r):
    model = tiny_llama() if family == "llama" else _family(family)
    model = trained(model, r=r, targets=targets, rslora=rslora)
    d = export_adapter(model, tmp_path / "a", base_model_name_or_path="base", task_type="CAUSAL_LM",
                       dtype=torch.bfloat16)
    model.config.save_pretrained(tmp_path / "base")
    report = check_vllm_contract(d, base_config=model.config.to_dict())
    assert report[0].startswith("vLLM contract: OK")
    assert f"--max-lora-rank {required_max_lora_rank(r)} " in report[-1]
    if r > 16:
        assert f"(r={r} needs --max-lora-rank {required_max_lora_rank(r)}; vLLM's default is 16)" in report[-1]
    assert "shapes checked against the given base config" in report[3]
    assert ("(rsLoRA)" in report[1]) == rslora
    config, tensors = _read(d)
    assert contract_violations(config, tensors, model.config, max_lora_rank=required_max_lora_rank(r)) == []


def test_shape_check_uses_local_base_dir(good, tmp_path):
    """base_config=None: the adapter's base_model_name_or_path, when it is a local model dir."""
    from transformers import LlamaConfig

    config, tensors = _read(good)
    LlamaConfig(**{**SMALL, "hidden_size": 128}).save_pretrained(tmp_path / "base")
    config["base_model_name_or_path"] = str(tmp_path / "base")
    d = _write(tmp_path / "a", config, tensors)
    with pytest.raises(UserError, match=r"tensor shapes do not fit the base model \(hidden_size 128"):
        check_vllm_contract(d)
    config["base_model_name_or_path"] = "some/hub-id"
    report = check_vllm_contract(_write(tmp_path / "b", config, tensors))
    assert "shapes NOT checked" in report[3]
