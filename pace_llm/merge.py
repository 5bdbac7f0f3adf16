"""Merged export: fold every adapter into its base weight and write a plain HF model directory.

    merged weight  W = W0 + s·BA        (W0 dequantized first when the base is 4/8-bit)

:func:`merge_and_save` merges a live model (a run's final model, possibly under ZeRO-3);
:func:`merge_adapter_dir` is ``pace-llm export --merge``: it loads the base as the run loaded
it, puts the PEFT adapter on it (:func:`load_peft_adapter`) and merges. A QLoRA run's base is
loaded quantized, so the adapter is folded into the dequantized weights it was trained against.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pace_llm.atomic import atomic_dir, refuse_nonempty
from pace_llm.distributed import gathered, on_rank0, unwrap
from pace_llm.dtypes import FLOAT_DTYPES
from pace_llm.errors import UserError
from pace_llm.lora import NoisyLoRALinear, lora_layers
from pace_llm.model import note_own_code, remote_code_error
from pace_llm.peft_format import (PREFIX, TEMPLATE_FILE, adapted_modules, lora_key,
                                  read_adapter, read_chat_template)
from pace_llm import quant as Q
from pace_llm.quant import is_quantized_linear

if TYPE_CHECKING:
    from pace_llm.schema import Recipe


# --------------------------------------------------------------------------------------------
# Merging a live model
# --------------------------------------------------------------------------------------------

def dequantized(module: nn.Module) -> nn.Module:
    """A plain nn.Linear for a quantized (bitsandbytes) linear: the quantized-base hook."""
    if type(module) is nn.Linear:
        return module
    return Q.dequantize_linear(module)  # looked up at call time (tests replace it)


@torch.no_grad()
def merged_linear(name: str, layer: NoisyLoRALinear, dtype: torch.dtype) -> nn.Linear:
    """A new CPU nn.Linear holding W0 + s·BA (call with the layer's params gathered)."""
    base = dequantized(layer.base)
    weight = base.weight.detach().to("cpu", torch.float32)
    if not layer.merged:
        weight = weight + layer.delta_weight().cpu()
    if not torch.isfinite(weight).all():
        raise UserError(f"NaN/inf in the merged weight of {name}; refusing to write the model")
    out = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                    device="cpu", dtype=dtype)
    out.weight.copy_(weight)
    if base.bias is not None:
        out.bias.copy_(base.bias.detach().cpu())
    return out


def full_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A CPU state dict, gathered module by module; tied parameters appear once."""
    sd: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        params = list(module.parameters(recurse=False))
        with gathered(params):
            for key, p in module._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                t = p.detach().to("cpu")
                sd[prefix + key] = (t.to(dtype) if t.is_floating_point() else t).clone()
        for key, b in module._buffers.items():
            if b is not None and key not in module._non_persistent_buffers_set:
                sd[prefix + key] = b.detach().to("cpu").clone()
    return sd


def _base_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point() and not p.requires_grad:
            return p.dtype
    return torch.float32


def _save_hf_dir(model: nn.Module, tmp: Path, sd: dict[str, torch.Tensor], dtype: torch.dtype,
                 tokenizer: Any) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the merged weights are plain floats
    config.dtype = dtype
    config.save_pretrained(tmp)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(tmp)
    split = split_torch_state_dict_into_shards(sd, max_shard_size="5GB")
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: sd[k].contiguous() for k in keys}, str(tmp / filename),
                  metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                 "weight_map": split.tensor_to_filename}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def merge_and_save(model: nn.Module, out_dir: str | Path, *, tokenizer: Any = None,
                   dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write a standard HF model directory with every adapter folded into its base weight.

    NoisyLoRALinear layers are swapped for plain nn.Linear (W0 + s·BA), and quantized linears
    without an adapter for their dequantized copies, while the state dict is taken, so the keys
    are the original model's; the live model is restored afterwards. Under ZeRO-3 call on every
    rank (parameters are gathered module by module); rank 0 writes.

    Args:
        model: a model after inject_noisy_lora (possibly DeepSpeed-wrapped).
        out_dir: target directory (config.json, model*.safetensors, tokenizer files).
        tokenizer: saved beside the weights when given.
        dtype: dtype of the written weights; None = the base weights' dtype.
        overwrite: replace a non-empty out_dir.
    """
    model = unwrap(model)
    layers = list(lora_layers(model))
    if not layers:
        raise UserError("the model has no NoisyLoRALinear layers: nothing to merge")
    dtype = dtype or _base_dtype(model)
    on_rank0(lambda: refuse_nonempty(out_dir, overwrite))
    originals: dict[str, nn.Module] = {}
    try:
        for name, layer in layers:
            with gathered(list(layer.parameters())):
                merged = merged_linear(name, layer, dtype)
            originals[name] = layer
            model.set_submodule(name, merged)
        quantized = [(n, m) for n, m in model.named_modules()
                     if is_quantized_linear(m)]  # linears left without an adapter
        for name, module in quantized:
            with gathered(list(module.parameters())):
                plain = dequantized(module).to(dtype)
            originals[name] = module
            model.set_submodule(name, plain)
        sd = full_state_dict(model, dtype)
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)

    def write() -> None:
        with atomic_dir(out_dir, overwrite, what="merged model") as tmp:
            _save_hf_dir(model, tmp, sd, dtype, tokenizer)

    on_rank0(write)
    return Path(out_dir)


# --------------------------------------------------------------------------------------------
# Merging a PEFT adapter directory (pace-llm export --merge)
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> list[str]:
    """Put a PEFT LoRA adapter onto a plain base as NoisyLoRALinear layers (σ = 0).

    Head tensors (modules_to_save) are copied into the model. Returns the adapted names.
    """
    config, tensors = read_adapter(adapter_dir)
    bad = [f"{k}={config.get(k)!r}" for k, ok in (("peft_type", "LORA"), ("bias", "none"))
           if config.get(k, ok) != ok] + (["use_dora=true"] if config.get("use_dora") else [])
    if bad:
        raise UserError(f"{adapter_dir}: {', '.join(bad)} — only plain LoRA adapters load here")
    r, alpha, rslora = config["r"], config["lora_alpha"], bool(config.get("use_rslora"))
    names = adapted_modules(tensors)
    for name in names:
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{adapter_dir} adapts {name}, which the base model does not have "
                            "(adapter for another architecture?)") from None
        layer = NoisyLoRALinear(base, r=r, alpha=alpha, rslora=rslora)
        for ab in ("A", "B"):
            t = tensors[lora_key(name, ab)]
            target = getattr(layer, f"lora_{ab}")
            if t.shape != target.shape:
                raise UserError(f"{adapter_dir}: {name}.lora_{ab} has shape {list(t.shape)}, the "
                                f"base model needs {list(target.shape)} (r={r})")
            target.copy_(t)
        model.set_submodule(name, layer)
    heads = {k[len(PREFIX):]: t for k, t in tensors.items() if ".lora_" not in k}
    state = model.state_dict()
    for key, t in heads.items():
        if key not in state or state[key].shape != t.shape:
            raise UserError(f"{adapter_dir}: head tensor {key} {list(t.shape)} does not fit the "
                            "base model (wrong num_labels or architecture?)")
        state[key].copy_(t)
    return names


def saved_dtype(base: str | None) -> torch.dtype | None:
    """The dtype a local base checkpoint was saved in (auto for --merge); None if unknown."""
    path = Path(base or "") / "config.json"
    if not base or not path.is_file():
        return None
    config = json.loads(path.read_text())
    return FLOAT_DTYPES.get(config.get("dtype") or config.get("torch_dtype") or "")


EXPORT_CODE_FLAG = "--trust-remote-code"
"""What an export command line says to run the base model's own code."""


def load_base(adapter_dir: Path, base: str | None, recipe: Recipe | None,
              trust_remote_code: bool = False, flag: str = EXPORT_CODE_FLAG
              ) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None): the base for --merge, as the run's recipe loaded it.

    A QLoRA run's base is loaded 4/8-bit, so the merge folds the adapter into the (dequantized)
    weights it was trained against; any other base is loaded in fp32. A SEQ_CLS adapter's
    classifier config (num_labels, id2label, ...) comes from its pace_config.json. The base's
    own code runs only with ``trust_remote_code`` (the command line's ``flag``): the recipe's
    value is data read from a run directory, never a permission.
    """
    import transformers

    config, _ = read_adapter(adapter_dir)
    if not base:
        raise UserError(f"{adapter_dir}/adapter_config.json names no base model; pass --base DIR")
    kwargs: dict[str, Any] = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if recipe is not None:
        kwargs["revision"] = recipe.model.revision
    note_own_code(base, trust_remote_code, flag)
    notes_path = adapter_dir / "pace_config.json"
    notes = json.loads(notes_path.read_text()) if notes_path.is_file() else {}
    if config.get("task_type") == "SEQ_CLS":
        auto = transformers.AutoModelForSequenceClassification
        extra = {k: v for k, v in (notes.get("model_config") or {}).items() if v is not None}
        if "id2label" in extra:
            extra["id2label"] = {int(k): v for k, v in extra["id2label"].items()}
        kwargs.update(extra)
    else:
        auto = transformers.AutoModelForCausalLM
    bits = Q.quant_bits(recipe.quant) if recipe is not None else None
    try:
        if bits is not None:  # the weights the adapter was trained on: dequantized at the merge
            model = Q.load_quantized(auto, base, recipe.quant, torch.float32, zero_stage=0,
                                   **kwargs)
        else:
            model = auto.from_pretrained(base, **kwargs)
    except OSError as exc:
        raise UserError(f"cannot load the base model {base!r}: {exc}") from None
    except ValueError as exc:
        if (refusal := remote_code_error(base, exc, flag)) is not None:
            raise refusal from None
        raise
    if bits is not None:
        print(f"base loaded {bits}-bit as the run trained it; the merged weights are the "
              "dequantized base plus the adapter", file=sys.stderr)
    return model.eval(), _tokenizer(adapter_dir, base, trust_remote_code)


def _tokenizer(adapter_dir: Path, base: str, trust_remote_code: bool) -> Any:
    """The base's tokenizer with the adapter's training chat template (chat_template.jinja), so
    that the merged model is prompted as the run trained; None (a warning) if the base has no
    tokenizer. Its own code runs only with ``trust_remote_code`` (see :func:`load_base`)."""
    import transformers

    template = read_chat_template(adapter_dir)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        extra = (f"; serve it with --chat-template {adapter_dir / TEMPLATE_FILE}"
                 if template is not None else "")
        print(f"warning: no tokenizer loaded from {base} ({exc}); the merged directory has "
              f"none{extra}", file=sys.stderr)
        return None
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def merge_adapter_dir(adapter_dir: Path, out_dir: str | Path, *, base: str | None,
                      recipe: Recipe | None = None, dtype: torch.dtype | None = None,
                      overwrite: bool = False, trust_remote_code: bool = False,
                      flag: str = EXPORT_CODE_FLAG) -> Path:
    """Merge a PEFT adapter directory into its base and write the HF model to out_dir.

    Args:
        adapter_dir: the PEFT adapter directory.
        out_dir: target directory, written atomically.
        base: base model directory or hub id.
        recipe: the run's recipe (quantization, revision), if any.
        dtype: dtype of the written weights; None = the dtype the base was saved in, else fp32.
        overwrite: replace a non-empty out_dir.
        trust_remote_code: run the base model's own code: only what this command's line says
            (``flag``), never a value read from a run directory.
    """
    refuse_nonempty(out_dir, overwrite)
    model, tokenizer = load_base(adapter_dir, base, recipe, trust_remote_code, flag)
    load_peft_adapter(model, adapter_dir)
    return merge_and_save(model, out_dir, tokenizer=tokenizer, dtype=dtype or saved_dtype(base),
                          overwrite=overwrite)
