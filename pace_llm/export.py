"""Export a PACE-trained model: a PEFT-format adapter vLLM can serve, or a merged HF model.

At inference a PACE adapter is a plain LoRA (the noise is training-only), so the export is
PEFT's on-disk format, written through one explicit key table:

    model module P (a NoisyLoRALinear)   ->  base_model.model.P.lora_A.weight   [r, d_in]
                                              base_model.model.P.lora_B.weight   [d_out, r]
    head module H parameter p (SEQ_CLS)  ->  base_model.model.H.p               (modules_to_save)

Under DeepSpeed ZeRO-3 only the adapter and head parameters are gathered; every rank takes
part in the gather and rank 0 writes. Writes go to a temporary directory that is renamed into
place, so a crash never leaves half an adapter. The CLI (``python -m pace_llm.export``) is at
the bottom of this file.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pace_llm.errors import UserError
from pace_llm.inject import block_relative
from pace_llm.lora import NoisyLoRALinear, lora_layers
from pace_llm.vllm_contract import (
    PREFIX,
    check_vllm_contract,
    contract_violations,
    peft_target_match,
    read_adapter,
)

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_QUANT_LINEARS = ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4")  # bitsandbytes
_PEFT_LINEARS = ("Conv1D", *_QUANT_LINEARS)


# --------------------------------------------------------------------------------------------
# Distributed plumbing: unwrap, gather, rank 0 writes, errors reach every rank
# --------------------------------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a DeepSpeedEngine / DDP wrapper (or the model itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def gathered(params: Sequence[nn.Parameter]):
    """Context in which ZeRO-3-partitioned params hold their full data (read-only)."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _on_rank0(fn: Callable[[], None]) -> None:
    """Run fn on rank 0; a UserError there is raised on every rank (no rank left waiting)."""
    error = None
    if _rank() == 0:
        try:
            fn()
        except UserError as exc:
            error = str(exc)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)


def refuse_nonempty(out_dir: str | Path, overwrite: bool) -> None:
    """UserError if out_dir holds anything and overwrite is off."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} exists and is not empty; choose another directory or pass "
                        "overwrite=True (CLI: --overwrite) to replace it")


@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces out_dir when the block ends without error."""
    out = Path(out_dir)
    refuse_nonempty(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# --------------------------------------------------------------------------------------------
# Adapter export
# --------------------------------------------------------------------------------------------

def _peft_visible_linears(model: nn.Module, adapted: set[str]) -> list[str]:
    """Names of the modules PEFT could wrap when it loads the adapter onto the plain base."""
    names = []
    for name, module in model.named_modules():
        if any(name.startswith(a + ".") for a in adapted):
            continue  # the .base inside a NoisyLoRALinear does not exist in the plain base
        kind = type(module).__name__
        if isinstance(module, (nn.Linear, NoisyLoRALinear)) or kind in _PEFT_LINEARS:
            names.append(name)
    return names


def peft_targets(model: nn.Module, adapted: Sequence[str]) -> tuple[list[str], list[str]]:
    """(target_modules, exclude_modules) for which PEFT wraps exactly the adapted modules.

    Each module is named by its last component (``q_proj``) when that selects only adapted
    modules under PEFT's suffix rule, else by its block-relative name (``output.dense``).
    Non-adapted modules a name still selects (``attention.output.dense`` for ``output.dense``)
    go to exclude_modules.
    """
    done = set(adapted)
    linears = _peft_visible_linears(model, done)
    targets: list[str] = []
    for name in adapted:
        rel = block_relative(name)[1]
        options = (rel.rsplit(".", 1)[-1], rel)
        pick = next((c for c in options
                     if all(n in done for n in linears if peft_target_match(n, [c]))), rel)
        if pick not in targets:
            targets.append(pick)
    excludes = []
    for n in linears:
        if n not in done and peft_target_match(n, targets):
            rel = block_relative(n)[1]
            short = rel if not any(peft_target_match(a, [rel]) for a in done) else n
            if short not in excludes:
                excludes.append(short)
    return targets, excludes


def _uniform(layers: list[tuple[str, NoisyLoRALinear]]) -> NoisyLoRALinear:
    first = layers[0][1]
    odd = [n for n, m in layers if (m.r, m.alpha, m.rslora) != (first.r, first.alpha, first.rslora)]
    if odd:
        raise UserError(f"adapters {odd[:3]} have another r/alpha/rslora than {layers[0][0]} "
                        f"(r={first.r}, alpha={first.alpha}); vLLM applies one scaling to all "
                        "modules, so export needs one r and alpha")
    return first


def adapter_tensors(model: nn.Module, head_modules: Sequence[str] = (),
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The PEFT key table: every lora_A/lora_B and head tensor, gathered, on CPU, in dtype."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        with gathered(layer.adapter_parameters()):
            out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().to("cpu", dtype).clone()
            out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().to("cpu", dtype).clone()
    for head in head_modules:
        try:
            module = model.get_submodule(head)
        except AttributeError:
            raise UserError(f"head module {head!r} is not in the model; its top-level modules: "
                            f"{', '.join(n for n, _ in model.named_children())}") from None
        with gathered(list(module.parameters())):
            for key, t in module.state_dict().items():
                t = t.detach().to("cpu")
                out[f"{PREFIX}{head}.{key}"] = (t.to(dtype) if t.is_floating_point() else t).clone()
    return out


def adapter_config(layer: NoisyLoRALinear, targets: list[str], excludes: list[str], *,
                   base_model_name_or_path: str, task_type: str,
                   head_modules: Sequence[str]) -> dict[str, Any]:
    """adapter_config.json as PEFT's save_pretrained writes it (the keys PEFT has long read)."""
    config = {
        "alpha_pattern": {}, "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": layer.alpha, "lora_dropout": layer.dropout, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": list(head_modules) or None,
        "peft_type": "LORA", "r": layer.r, "rank_pattern": {}, "revision": None,
        "target_modules": targets, "task_type": task_type, "use_dora": False,
        "use_rslora": layer.rslora,
    }
    if excludes:  # PEFT >= 0.14 reads it; written only when a target name needs narrowing
        config["exclude_modules"] = excludes
    return dict(sorted(config.items()))


def _pace_notes(model: nn.Module, layers: list[tuple[str, NoisyLoRALinear]], task_type: str,
                pace_info: dict[str, Any] | None) -> dict[str, Any]:
    info = dict(pace_info or {})
    pace = info.get("pace") if isinstance(info.get("pace"), dict) else {}
    notes: dict[str, Any] = {
        "note": "PACE noise and the consistency loss are training-only: at inference this "
                "adapter is a plain LoRA (adapter_config.json).",
        "sigma": pace.get("sigma"), "consistency_weight": pace.get("consistency_weight"),
        "mode": pace.get("mode"), "sigma_schedule": pace.get("sigma_schedule"),
        "layer_sigma": {name: layer.sigma for name, layer in layers},
    }
    cfg = getattr(model, "config", None)
    if task_type == "SEQ_CLS" and cfg is not None:
        keys = ("num_labels", "problem_type", "pad_token_id", "id2label", "label2id")
        notes["model_config"] = {k: getattr(cfg, k, None) for k in keys}
    notes["recipe"] = info
    return notes


def write_adapter_dir(out_dir: str | Path, config: dict[str, Any],
                      tensors: dict[str, torch.Tensor], pace_notes: dict[str, Any] | None, *,
                      overwrite: bool = False, check_vllm: bool = False,
                      base_config: Any = None) -> Path:
    """Write the three files atomically; for CAUSAL_LM check the written copy against vLLM."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir, overwrite) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if pace_notes is not None:
            (tmp / "pace_config.json").write_text(json.dumps(pace_notes, indent=2, default=str)
                                                  + "\n")
        if check_vllm:
            check_vllm_contract(tmp, base_config=base_config)
    return Path(out_dir)


def export_adapter(model: nn.Module, out_dir: str | Path, *, base_model_name_or_path: str,
                   task_type: str, dtype: torch.dtype, head_modules: Sequence[str] = (),
                   pace_info: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the model's adapters as a PEFT LoRA directory (plus pace_config.json).

    Call on every rank of a ZeRO-3 run (the adapter params are gathered); rank 0 writes.

    Args:
        model: a model after inject_noisy_lora, possibly inside a DeepSpeedEngine.
        out_dir: target directory, written atomically.
        base_model_name_or_path: recorded for PEFT/vLLM (hub id or local dir).
        task_type: CAUSAL_LM, or SEQ_CLS for a classifier whose head is saved whole.
        dtype: dtype of the written tensors (bf16/fp16 for serving, fp32 for parity tests).
        head_modules: trainable head modules saved in PEFT's modules_to_save form (SEQ_CLS).
        pace_info: recipe dict recorded in pace_config.json (σ, λ, mode, schedule, ...).
        overwrite: replace a non-empty out_dir.

    Raises:
        UserError: no adapters, every lora_B zero, bad task_type/head, out_dir not empty, or
            (CAUSAL_LM) the written adapter breaks vLLM's contract.
    """
    if task_type not in TASK_TYPES:
        raise UserError(f"task_type {task_type!r} is not supported; use one of {TASK_TYPES}")
    if task_type == "CAUSAL_LM" and head_modules:
        raise UserError(f"head_modules {list(head_modules)} with task_type CAUSAL_LM: vLLM "
                        "cannot serve modules_to_save; a causal LM exports adapters only")
    if dtype not in DTYPES.values():
        raise UserError(f"export dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
    model = unwrap(model)
    layers = list(lora_layers(model))
    if not layers:
        raise UserError("the model has no NoisyLoRALinear layers: refusing to write an empty "
                        "adapter (was inject_noisy_lora called on this model?)")
    first = _uniform(layers)
    _on_rank0(lambda: refuse_nonempty(out_dir, overwrite))
    tensors = adapter_tensors(model, head_modules, dtype)
    if all(not t.any() for k, t in tensors.items() if k.endswith(".lora_B.weight")):
        raise UserError(f"every lora_B of the {len(layers)} adapted layers is zero: the adapter "
                        "is a no-op (export before any training step, or ZeRO-3 shards not "
                        "gathered); refusing to write it")
    targets, excludes = peft_targets(model, [n for n, _ in layers])
    config = adapter_config(first, targets, excludes, task_type=task_type,
                            base_model_name_or_path=base_model_name_or_path,
                            head_modules=head_modules)
    base_config = getattr(model, "config", None)
    if task_type == "CAUSAL_LM":
        problems = contract_violations(config, tensors, base_config)
        if problems:
            raise UserError("the adapter would break vLLM's contract:\n"
                            + "\n".join(f"  - {p}" for p in problems))
    notes = _pace_notes(model, layers, task_type, pace_info)
    _on_rank0(lambda: write_adapter_dir(out_dir, config, tensors, notes, overwrite=overwrite,
                                        check_vllm=task_type == "CAUSAL_LM",
                                        base_config=base_config))
    return Path(out_dir)


# --------------------------------------------------------------------------------------------
# Merged export
# --------------------------------------------------------------------------------------------

def dequantized(module: nn.Module) -> nn.Module:
    """A plain nn.Linear for a quantized (bitsandbytes) linear: the quantized-base hook."""
    if type(module) is nn.Linear:
        return module
    from pace_llm.quant import dequantize_linear  # owned by quant.py; imported only when needed

    return dequantize_linear(module)


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


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


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

    NoisyLoRALinear layers are swapped for plain nn.Linear (W0 + s·BA) while the state dict is
    taken, so the keys are the original model's; the live model is restored afterwards.
    Under ZeRO-3 call on every rank (parameters are gathered module by module); rank 0 writes.

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
    _on_rank0(lambda: refuse_nonempty(out_dir, overwrite))
    originals: dict[str, nn.Module] = {}
    try:
        for name, layer in layers:
            with gathered(list(layer.parameters())):
                merged = merged_linear(name, layer, dtype)
            originals[name] = _swap(model, name, merged)
        quantized = [(n, m) for n, m in model.named_modules()
                     if type(m).__name__ in _QUANT_LINEARS]  # linears left without an adapter
        for name, module in quantized:
            with gathered(list(module.parameters())):
                plain = dequantized(module).to(dtype)
            originals[name] = _swap(model, name, plain)
        sd = full_state_dict(model, dtype)
    finally:
        for name, layer in originals.items():
            _swap(model, name, layer)

    def write() -> None:
        with atomic_dir(out_dir, overwrite) as tmp:
            _save_hf_dir(model, tmp, sd, dtype, tokenizer)

    _on_rank0(write)
    return Path(out_dir)


# --------------------------------------------------------------------------------------------
# Loading a PEFT adapter back onto a plain base (for --merge)
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
    names = sorted({k[len(PREFIX):-len(".lora_A.weight")] for k in tensors
                    if k.endswith(".lora_A.weight")})
    for name in names:
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{adapter_dir} adapts {name}, which the base model does not have "
                            "(adapter for another architecture?)") from None
        layer = NoisyLoRALinear(base, r=r, alpha=alpha, rslora=rslora)
        for ab in ("A", "B"):
            t = tensors[f"{PREFIX}{name}.lora_{ab}.weight"]
            target = getattr(layer, f"lora_{ab}")
            if t.shape != target.shape:
                raise UserError(f"{adapter_dir}: {name}.lora_{ab} has shape {list(t.shape)}, the "
                                f"base model needs {list(target.shape)} (r={r})")
            target.copy_(t)
        _swap(model, name, layer)
    heads = {k[len(PREFIX):]: t for k, t in tensors.items() if ".lora_" not in k}
    state = model.state_dict()
    for key, t in heads.items():
        if key not in state or state[key].shape != t.shape:
            raise UserError(f"{adapter_dir}: head tensor {key} {list(t.shape)} does not fit the "
                            "base model (wrong num_labels or architecture?)")
        state[key].copy_(t)
    return names


# --------------------------------------------------------------------------------------------
# CLI: python -m pace_llm.export --run DIR [--step N] --out DIR [--merge] [--check vllm]
# --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pace-llm export",
        description="Re-export, merge or check a run's PEFT adapter. --out DIR writes the adapter "
                    "(cast to --dtype); with --merge, DIR gets a merged HF model instead.")
    src = p.add_argument_group("source (one of)")
    src.add_argument("--run", help="a training output_dir (uses <run>/adapter)")
    src.add_argument("--adapter", help="a PEFT adapter directory")
    p.add_argument("--step", type=int, help="use <run>/checkpoints/step-N/adapter")
    p.add_argument("--out", help="output directory")
    p.add_argument("--merge", action="store_true", help="write a merged HF model to --out")
    p.add_argument("--check", choices=["vllm"], help="check the adapter against vLLM's contract")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="the vLLM server's --max-lora-rank to check against (default: any)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default=None,
                   help="dtype written; auto/default = the recipe's export.dtype, else as stored")
    p.add_argument("--base", help="base model directory (default: adapter_config's "
                                  "base_model_name_or_path, then <run>/base_model)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _run_recipe(run: Path) -> Any:
    from pace_llm.config import load_recipe

    path = run / "recipe.yaml"
    if not path.is_file():
        raise UserError(f"{run} is not a run directory: {path} is missing")
    # paths saved in the recipe (deepspeed config, resume) are irrelevant to export
    return load_recipe(["--recipe", str(path), "--deepspeed", "null", "--train.resume", "null"])


def _source_adapter(args: argparse.Namespace) -> Path:
    if bool(args.run) == bool(args.adapter):
        raise UserError("give exactly one source: --run <output_dir> or --adapter <dir>")
    if args.adapter:
        if args.step is not None:
            raise UserError("--step goes with --run, not --adapter")
        return Path(args.adapter)
    run = Path(args.run)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    if args.step is None:
        return run / "adapter"
    src = run / "checkpoints" / f"step-{args.step}" / "adapter"
    if not src.is_dir():
        steps = sorted(int(d.name[5:]) for d in (run / "checkpoints").glob("step-*")
                       if d.name[5:].isdigit() and (d / "adapter").is_dir())
        raise UserError(f"{src} does not exist; checkpoints with an adapter in {run}: "
                        f"{', '.join(map(str, steps)) or 'none'}")
    return src


def _export_dtype(args: argparse.Namespace, recipe: Any) -> torch.dtype | None:
    name = args.dtype or (recipe.export.dtype if recipe is not None else "auto")
    if name == "auto" and recipe is not None:
        name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(
            recipe.train.precision, "auto")
    return DTYPES.get(name)


def _base_dir(args: argparse.Namespace, config: dict[str, Any]) -> str | None:
    candidates = [args.base, config.get("base_model_name_or_path"),
                  str(Path(args.run) / "base_model") if args.run else None]
    for c in candidates:
        if c and (Path(c) / "config.json").is_file():
            return c
    return args.base or config.get("base_model_name_or_path")


def _reexport(src: Path, out: str, dtype: torch.dtype | None, base: str | None,
              overwrite: bool) -> None:
    config, tensors = read_adapter(src)
    if dtype is not None:
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    notes_path = src / "pace_config.json"
    notes = json.loads(notes_path.read_text()) if notes_path.is_file() else None
    local = base if base and (Path(base) / "config.json").is_file() else None
    write_adapter_dir(out, config, tensors, notes, overwrite=overwrite,
                      check_vllm=config.get("task_type") == "CAUSAL_LM", base_config=local)
    print(f"adapter written to {out}")


def _saved_dtype(base: str | None) -> torch.dtype | None:
    """The dtype a local base checkpoint was saved in (auto for --merge); None if unknown."""
    path = Path(base or "") / "config.json"
    if not base or not path.is_file():
        return None
    config = json.loads(path.read_text())
    return DTYPES.get(config.get("dtype") or config.get("torch_dtype") or "")


def _load_base(src: Path, base: str | None, recipe: Any) -> tuple[nn.Module, Any]:
    """The base for --merge: as the run's recipe loaded it (4/8-bit for a QLoRA run, so the merge
    folds the adapter into the weights it was trained against), else in fp32."""
    import transformers

    from pace_llm.quant import load_quantized, quant_bits

    config, _ = read_adapter(src)
    if not base:
        raise UserError(f"{src}/adapter_config.json names no base model; pass --base DIR")
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if recipe is not None:
        kwargs.update(trust_remote_code=recipe.model.trust_remote_code,
                      revision=recipe.model.revision)
    notes_path = src / "pace_config.json"
    notes = json.loads(notes_path.read_text()) if notes_path.is_file() else {}
    if config.get("task_type") == "SEQ_CLS":
        auto = transformers.AutoModelForSequenceClassification
        extra = {k: v for k, v in (notes.get("model_config") or {}).items() if v is not None}
        if "id2label" in extra:
            extra["id2label"] = {int(k): v for k, v in extra["id2label"].items()}
        kwargs.update(extra)
    else:
        auto = transformers.AutoModelForCausalLM
    quantized = recipe is not None and quant_bits(recipe.quant) is not None
    try:
        if quantized:  # the weights the adapter was trained on: dequantized at the merge
            model = load_quantized(auto, base, recipe.quant, torch.float32, zero_stage=0,
                                   **kwargs)
        else:
            model = auto.from_pretrained(base, **kwargs)
    except OSError as exc:
        raise UserError(f"cannot load the base model {base!r}: {exc}") from None
    if quantized:
        print(f"base loaded {quant_bits(recipe.quant)}-bit as the run trained it; the merged "
              "weights are the dequantized base plus the adapter", file=sys.stderr)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as exc:
        print(f"warning: no tokenizer loaded from {base} ({exc}); the merged directory has none",
              file=sys.stderr)
        tokenizer = None
    return model.eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code (2 with one message on stderr for bad input)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage error
        return int(exc.code or 0)
    try:
        src = _source_adapter(args)
        if args.merge and not args.out:
            raise UserError("--merge needs --out DIR for the merged model")
        if not args.out and not args.check:
            raise UserError("nothing to do: give --out DIR (with --merge for a merged model) "
                            "and/or --check vllm")
        recipe = _run_recipe(Path(args.run)) if args.run else None
        config, _ = read_adapter(src)
        base = _base_dir(args, config)
        if args.check == "vllm":
            local = base if base and (Path(base) / "config.json").is_file() else None
            print("\n".join(check_vllm_contract(src, local, max_lora_rank=args.max_lora_rank)))
        if args.out and not args.merge:
            _reexport(src, args.out, _export_dtype(args, recipe), base, args.overwrite)
        if args.merge:
            refuse_nonempty(args.out, args.overwrite)
            model, tokenizer = _load_base(src, base, recipe)
            load_peft_adapter(model, src)
            dtype = _export_dtype(args, recipe) or _saved_dtype(base)
            merge_and_save(model, args.out, tokenizer=tokenizer, dtype=dtype,
                           overwrite=args.overwrite)
            print(f"merged model written to {args.out}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
