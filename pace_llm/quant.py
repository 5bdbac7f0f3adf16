"""QLoRA: the frozen base loaded 4-bit (or 8-bit) with bitsandbytes, and the rules around it.

4-bit NF4 (QLoRA, Dettmers et al. 2023) stores each weight as a 4-bit code into a fixed table
of 16 normal quantiles q_k, one absmax scale per block of 64 weights:

    W[i] ≈ absmax[block(i)] · q[code[i]]            codes packed two per byte

Double quantization stores the absmax scales themselves 8-bit (blocks of 256), saving about
0.37 bit per weight. The 4-bit layer computes ``x @ dequant(W).T`` in ``compute_dtype``; the
adapter of NoisyLoRALinear sits beside it unchanged (docs/PACE.md §1), in that same dtype. 8-bit is
LLM.int8(): ``W ≈ CB · SCB / 127`` with one scale per output row.

Norms are not linear layers, so bitsandbytes never quantizes them; lm_head and classification
heads are named in ``llm_int8_skip_modules`` and stay plain ``nn.Linear`` in the load dtype.

DeepSpeed rules (why ``storage_dtype`` exists):

- DeepSpeed casts every floating-point parameter to the training precision, and ZeRO-3 also
  partitions and all-gathers them. The packed 4-bit bytes are a parameter too: stored as uint8
  they are left alone, stored as a float dtype they must *be* the training dtype, or the cast
  would scramble the bytes. For ZeRO-3, PEFT ("DeepSpeed ZeRO-3 with QLoRA") stores them in the
  model dtype (``bnb_4bit_quant_storage`` = ``torch_dtype``), so that every parameter a module
  all-gathers has one dtype; ``storage_dtype: auto`` is uint8, or the training dtype under
  ZeRO-3. (DeepSpeed 0.19.8 also gathers a uint8 storage correctly: 2 CPU ranks gave ZeRO-2's
  losses; but its all-reduce fetch path, ``use_all_reduce_for_fetch_params``, still requires
  one dtype per bucket.)
- transformers never wraps a quantized load in ``deepspeed.zero.Init`` (modeling_utils: ZeRO-3
  init only ``if not is_quantized``), and refuses a ``device_map`` while an ``HfDeepSpeedConfig``
  with stage 3 is alive. So under ZeRO-3 each rank materialises the 4-bit base (a quarter of its
  bf16 size) on its own device, and ``deepspeed.initialize`` partitions it: DeepSpeed converts
  the parameters that are not yet ZeRO parameters with ``zero.Init(module=...)``.
- LLM.int8 keeps a second reference to its int8 weight (``Int8Params.CB``) and its row scales
  (``SCB``) outside the parameter's data: ZeRO-3 partitions the data, yet every rank still holds
  the full int8 weight (DeepSpeed 0.19.8, 2 ranks: ``weight.data`` (0,), ``weight.CB`` whole).
  8-bit is refused under ZeRO-3. GPTQ/AWQ checkpoints hold integer buffers (qweight, qzeros)
  that ZeRO-3 does not partition: refused too.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pace_llm.dtypes import DTYPES, PRECISION_DTYPES
from pace_llm.errors import UserError, bulleted
from pace_llm.families import full_precision_names
from pace_llm.schema import ModelArgs, QuantArgs, Recipe

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PreTrainedModel

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'pace-llm[quant]'"
FULL_PRECISION_MODULES = full_precision_names(None)
"""Module names (prefix or suffix, as transformers matches them) never quantized: every model
family's (pace_llm.families), since the skip list is fixed before the config is read."""
ZERO3_REFUSED_METHODS = ("gptq", "awq")


def bnb_available() -> bool:
    """True when bitsandbytes can be imported (without importing it: that takes seconds)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def quant_bits(quant: QuantArgs) -> int | None:
    """4 or 8, or None for ``bits: none`` (the recipe schema allows nothing else)."""
    return None if quant.bits == "none" else quant.bits


def prequantized_method(config: Any) -> str | None:
    """The ``quant_method`` of a model config's ``quantization_config`` (gptq, awq, ...), or None.

    ``config`` is a transformers config, its dict (``config.json``), or None.
    """
    if config is None:
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(
        config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if method is None:
        return None
    return str(getattr(method, "value", method)).lower()


def local_model_config(model: ModelArgs) -> dict[str, Any] | None:
    """The base's ``config.json`` if it is on disk (a directory or the HF cache); no network."""
    if model.build is not None or not model.name_or_path:
        return None
    path = Path(model.name_or_path) / "config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model.name_or_path, "config.json",
                                            revision=model.revision)
        except ValueError:  # not a valid repo id: nothing cached under it
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    with open(path) as f:
        return json.load(f)


def quant_problems(recipe: Recipe, zero_stage: int) -> list[str]:
    """Every problem with the recipe's quantization under this ZeRO stage (empty = fine);
    pace_llm/checks.py runs it when a command's recipe is parsed.

    ``quant.bits`` outside none/4/8 is refused by the recipe schema. The base's
    ``quantization_config`` is read from its ``config.json`` when that is on disk.
    """
    precision = PRECISION_DTYPES.get(recipe.train.precision)
    config = local_model_config(recipe.model)
    return _problems(recipe.quant, zero_stage, prequantized_method(config), precision,
                     recipe.model.name_or_path, recipe.deepspeed)


def _problems(quant: QuantArgs, zero_stage: int, method: str | None,
              train_dtype: torch.dtype | None, name: str = "the base model",
              ds_path: str | None = None) -> list[str]:
    p: list[str] = []
    bits = quant_bits(quant)
    stage = f"ZeRO-3 (deepspeed: {ds_path})" if ds_path else "ZeRO-3"
    if bits is not None and not bnb_available():
        p.append(f"quant.bits: {bits} needs bitsandbytes, which is not installed; install it "
                 f"with: {INSTALL_HINT}")
    if bits == 8 and zero_stage == 3:
        p.append(f"quant.bits: 8 is not supported with {stage}: bitsandbytes keeps the int8 "
                 "weight and its row scales outside the parameter ZeRO-3 partitions, so every "
                 "rank would still hold the whole base; use quant.bits: 4 (QLoRA works with "
                 "ZeRO-3) or a ZeRO-2 config (deepspeed: ds_configs/zero2.json)")
    storage = DTYPES.get(quant.storage_dtype)
    if (bits == 4 and storage is not None and storage.is_floating_point
            and train_dtype is not None and storage != train_dtype):
        p.append(f"quant.storage_dtype: {quant.storage_dtype!r} differs from the training "
                 f"precision ({train_dtype}): DeepSpeed casts float parameters to the training "
                 "dtype, which would scramble the packed 4-bit weights; use quant.storage_dtype: "
                 "auto (uint8, or the training dtype under ZeRO-3)")
    if method is not None and method != "bitsandbytes":
        if zero_stage == 3 and method in ZERO3_REFUSED_METHODS:
            p.append(f"model {name} is pre-quantized with {method.upper()}: DeepSpeed ZeRO-3 "
                     f"cannot partition its packed integer weights; use a ZeRO-2 config "
                     f"(deepspeed: ds_configs/zero2.json) or a non-quantized base with "
                     f"quant.bits: 4")
        if bits is not None:
            p.append(f"quant.bits: {bits} but model {name} is already quantized with "
                     f"{method.upper()}; set quant.bits: none, or start from the "
                     f"non-quantized model")
    return p


def resolve_compute_dtype(quant: QuantArgs, train_dtype: torch.dtype) -> torch.dtype:
    """``quant.compute_dtype``, with auto = the training dtype."""
    return train_dtype if quant.compute_dtype == "auto" else DTYPES[quant.compute_dtype]


def resolve_storage_dtype(quant: QuantArgs, train_dtype: torch.dtype,
                          zero_stage: int) -> torch.dtype:
    """``quant.storage_dtype``, with auto = uint8, or the training dtype under ZeRO-3."""
    if quant.storage_dtype != "auto":
        return DTYPES[quant.storage_dtype]
    return train_dtype if zero_stage == 3 else torch.uint8


def bnb_config(quant: QuantArgs, compute_dtype: torch.dtype,
               zero_stage: int) -> BitsAndBytesConfig | None:
    """The transformers ``BitsAndBytesConfig`` for the recipe's quant section (None: bits none).

    Args:
        quant: the recipe's quant section.
        compute_dtype: the training dtype; ``quant.compute_dtype: auto`` resolves to it, and so
            does ``storage_dtype: auto`` under ZeRO-3.
        zero_stage: the DeepSpeed ZeRO stage (0-3).
    """
    bits = quant_bits(quant)
    if bits is None:
        return None
    from transformers import BitsAndBytesConfig

    skip = list(FULL_PRECISION_MODULES)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=resolve_compute_dtype(quant, compute_dtype),
        bnb_4bit_quant_storage=resolve_storage_dtype(quant, compute_dtype, zero_stage),
        llm_int8_skip_modules=skip,
    )


def _local_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def load_quantized(model_cls: Any, name_or_path: str, quant: QuantArgs, compute_dtype: torch.dtype,
                   zero_stage: int, **from_pretrained_kwargs: Any) -> PreTrainedModel:
    """Load the base with ``model_cls.from_pretrained``, quantized as ``quant`` says.

    ``bits: none`` is a plain load in ``compute_dtype``. Otherwise the linear layers inside the
    model become bitsandbytes layers (lm_head / heads / norms stay in ``compute_dtype``). Under
    ZeRO-0/1/2 the model lands on this rank's device; under ZeRO-3 no ``device_map`` is passed
    and ``deepspeed.initialize`` partitions the 4-bit base later (see the module docstring). The
    caller keeps an ``HfDeepSpeedConfig`` alive under ZeRO-3, as for any base.

    Args:
        model_cls: a transformers auto class or model class (AutoModelForCausalLM, ...).
        name_or_path: hub id or local directory.
        quant: the recipe's quant section.
        compute_dtype: the training dtype (what the quant ``auto`` values resolve to).
        zero_stage: the DeepSpeed ZeRO stage (0-3).
        **from_pretrained_kwargs: passed on (revision, trust_remote_code, attn_implementation,
            num_labels, ...). ``dtype`` defaults to ``compute_dtype``.

    Raises:
        UserError: bitsandbytes missing, 8-bit or GPTQ/AWQ under ZeRO-3, a pre-quantized base
            asked to be quantized again, a float storage dtype other than the training dtype.
    """
    kwargs = dict(from_pretrained_kwargs)
    bits = quant_bits(quant)
    if bits is None:
        kwargs.setdefault("dtype", compute_dtype)
        return model_cls.from_pretrained(name_or_path, **kwargs)
    if bits == 4 and zero_stage == 3:  # PEFT: load dtype = quant storage dtype under ZeRO-3
        kwargs["dtype"] = resolve_storage_dtype(quant, compute_dtype, zero_stage)
    kwargs.setdefault("dtype", compute_dtype)
    from transformers import AutoConfig

    config_keys = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only")
    config = AutoConfig.from_pretrained(
        name_or_path, **{k: kwargs[k] for k in config_keys if k in kwargs})
    problems = _problems(quant, zero_stage, prequantized_method(config), compute_dtype,
                         name_or_path)
    if problems:
        raise UserError(bulleted("cannot load a quantized base", problems))
    bnb = bnb_config(quant, compute_dtype, zero_stage)
    if bits == 4 and zero_stage == 3 and quant.storage_dtype == "uint8":
        log.warning("quant.storage_dtype: uint8 under ZeRO-3 mixes dtypes in DeepSpeed's "
                    "parameter gathers (fine with DeepSpeed 0.19.8's all-gather); "
                    "storage_dtype: auto stores the packed weights in the training dtype, as "
                    "PEFT documents for ZeRO-3")
    if zero_stage == 3:  # transformers refuses a device_map under ZeRO-3; the quantizer then
        kwargs.pop("device_map", None)  # places the model on the current CUDA device
        if torch.cuda.is_available():
            torch.cuda.set_device(_local_device())
    else:
        kwargs.setdefault("device_map", {"": _local_device()})
    model = model_cls.from_pretrained(name_or_path, quantization_config=bnb, **kwargs)
    _keep_cpu_layout(model)
    quantized = [n for n, m in model.named_modules() if is_quantized_linear(m)]
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and not is_quantized_linear(m)]
    if bits == 4:
        what = (f"4-bit {quant.type}{' + double quant' if quant.double_quant else ''}, compute "
                f"{bnb.bnb_4bit_compute_dtype}, storage {bnb.bnb_4bit_quant_storage}")
    else:
        what = "8-bit LLM.int8"
    log.info("loaded %s as %s: %d linear layers quantized, kept in %s: %s", name_or_path, what,
             len(quantized), kwargs["dtype"], ", ".join(kept) or "none")
    return model


def _keep_cpu_layout(model: nn.Module) -> None:
    """Keep 4-bit weights in their canonical packing on CPU.

    On a CPU with AVX512-BF16, bitsandbytes re-packs a Linear4bit's weight at its first no-grad
    eval forward into a bf16-kernel layout (and rounds the absmax scales to bf16, irreversibly).
    Eval would then compute a different function from training, and the stored bytes would
    change; so every forward takes the dequantize-then-matmul path, in the compute dtype.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit or Linear8bitLt."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4")


@torch.no_grad()
def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] fp32 weight a bitsandbytes linear layer computes with.

    4-bit: ``dequantize_4bit(packed, quant_state)``; 8-bit: ``CB · SCB / 127`` per row. Under
    ZeRO-3 gather the layer's parameters first (``deepspeed.zero.GatheredParameters``).
    """
    import bitsandbytes as bnb

    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnb.functional.dequantize_4bit(data, state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        if weight.dtype != torch.int8:  # has_fp16_weights: not quantized
            return weight.data.float()
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb).float()
    raise TypeError(f"dequantize_weight needs a bitsandbytes Linear4bit/Linear8bitLt, "
                    f"got {type(module).__name__}")


@torch.no_grad()
def dequantize_linear(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A plain ``nn.Linear`` in ``dtype`` computing what the bitsandbytes layer computes."""
    weight = dequantize_weight(module)
    bias = getattr(module, "bias", None)
    out = nn.Linear(module.in_features, module.out_features, bias=bias is not None,
                    device=weight.device, dtype=dtype)
    out.weight.copy_(weight.to(dtype))
    if bias is not None:
        out.bias.copy_(bias.to(dtype))
    out.weight.requires_grad_(False)
    if bias is not None:
        out.bias.requires_grad_(False)
    return out


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every bitsandbytes linear layer (also the base of a NoisyLoRALinear) in place by
    its ``dequantize_linear`` copy. Returns the replaced names; clears transformers' quantized
    flags so the model saves as a plain one."""
    names = [n for n, m in model.named_modules() if is_quantized_linear(m)]
    for name in names:
        model.set_submodule(name, dequantize_linear(model.get_submodule(name), dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    return names
