"""PEFT's on-disk LoRA adapter format: key table, target names, adapter_config.json, read/write.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``, and,
when the run rendered its data with a chat template, that template as ``chat_template.jinja``
(what transformers' tokenizers save; ``vllm serve --chat-template`` reads it). The tensors are
named through one key table:

    model module P (a NoisyLoRALinear)   ->  base_model.model.P.lora_A.weight   [r, d_in]
                                              base_model.model.P.lora_B.weight   [d_out, r]
    head module H parameter p (SEQ_CLS)  ->  base_model.model.H.p               (modules_to_save)

When PEFT loads the adapter onto the plain base it wraps every linear whose name matches
``target_modules`` (exact name, or name ending in ``.<target>``) and none that matches
``exclude_modules``; :func:`peft_targets` picks names for which that selects exactly the
adapted modules. Export, merge and the vLLM check all read the format from here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pace_llm.distributed import gathered
from pace_llm.errors import UserError
from pace_llm.inject import block_relative
from pace_llm.lora import NoisyLoRALinear, lora_layers
from pace_llm.quant import is_quantized_linear

PREFIX = "base_model.model."
"""Every tensor key starts with this (PEFT's wrapper around the base model)."""
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TEMPLATE_FILE = "chat_template.jinja"
"""The chat template the adapter was trained with (absent: no chat layout was trained)."""


def lora_key(module: str, ab: str) -> str:
    """The tensor key of module's lora_A (ab="A") or lora_B (ab="B") weight."""
    return f"{PREFIX}{module}.lora_{ab}.weight"


def adapted_modules(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The module names (without PREFIX) that have a lora_A tensor, sorted."""
    suffix = ".lora_A.weight"
    return sorted(k.removeprefix(PREFIX)[: -len(suffix)] for k in tensors if k.endswith(suffix))


def peft_target_match(module: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for a list of target_modules: exact name, or name ends with '.<target>'."""
    return any(module == t or module.endswith("." + t) for t in targets)


# --------------------------------------------------------------------------------------------
# target_modules / exclude_modules
# --------------------------------------------------------------------------------------------

def _peft_visible_linears(model: nn.Module, adapted: set[str]) -> list[str]:
    """Names of the modules PEFT could wrap when it loads the adapter onto the plain base."""
    names = []
    for name, module in model.named_modules():
        if any(name.startswith(a + ".") for a in adapted):
            continue  # the .base inside a NoisyLoRALinear does not exist in the plain base
        if (isinstance(module, (nn.Linear, NoisyLoRALinear)) or type(module).__name__ == "Conv1D"
                or is_quantized_linear(module)):
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


# --------------------------------------------------------------------------------------------
# The tensors and the config of a model's adapters
# --------------------------------------------------------------------------------------------

def adapter_tensors(model: nn.Module, head_modules: Sequence[str] = (),
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The PEFT key table: every lora_A/lora_B and head tensor, gathered, on CPU, in dtype.

    Under ZeRO-3 call on every rank (each layer's parameters are gathered in turn).
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        with gathered(layer.adapter_parameters()):
            out[lora_key(name, "A")] = layer.lora_A.detach().to("cpu", dtype).clone()
            out[lora_key(name, "B")] = layer.lora_B.detach().to("cpu", dtype).clone()
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
    """adapter_config.json as PEFT's save_pretrained writes it (the keys PEFT has long read).

    ``layer`` gives r, lora_alpha, dropout and rsLoRA (one value for every adapted module).
    """
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


# --------------------------------------------------------------------------------------------
# The directory
# --------------------------------------------------------------------------------------------

def write_adapter(directory: str | Path, config: Mapping[str, Any],
                  tensors: Mapping[str, torch.Tensor], chat_template: str | None = None) -> None:
    """Write adapter_config.json, adapter_model.safetensors and (when given) the training chat
    template, chat_template.jinja, into an existing directory."""
    from safetensors.torch import save_file

    d = Path(directory)
    (d / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / WEIGHTS_FILE),
              metadata={"format": "pt"})
    if chat_template is not None:
        (d / TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")


def read_chat_template(adapter_dir: str | Path) -> str | None:
    """The adapter's chat_template.jinja (None if it has none); UserError if it is not text."""
    path = Path(adapter_dir) / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "re-export the adapter") from None


def read_adapter(adapter_dir: str | Path, strict: bool = False
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config dict, tensors) of a PEFT adapter directory; UserError if unreadable.

    ``strict``: also refuse an adapter_config.json whose LoRA fields are missing or ill-typed
    (see :func:`config_problems`), naming the file and the keys (export / merge need them)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg_path, st_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    if d.is_file():
        raise UserError(f"adapter directory {d} is a file; give the directory that holds "
                        f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    if not d.is_dir():
        raise UserError(f"adapter directory {d} does not exist")
    missing = [p.name for p in (cfg_path, st_path) if not p.is_file()]
    if missing:
        raise UserError(f"{d} is not a PEFT adapter directory: {', '.join(missing)} missing "
                        "(vLLM reads adapter_config.json + adapter_model.safetensors)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if hasattr(exc, "lineno") else ""
        raise UserError(f"{cfg_path} is not valid JSON{where}: {getattr(exc, 'msg', exc)}; "
                        "restore it (export writes it) or re-export the adapter") from None
    if not isinstance(config, dict):
        raise UserError(f"{cfg_path} must hold a JSON object (PEFT's LoraConfig), got a "
                        f"{type(config).__name__}")
    try:
        tensors = load_file(str(st_path))
    except SafetensorError as exc:
        raise UserError(f"{st_path} is not a readable safetensors file: {exc}") from None
    problems = config_problems(config) if strict else []
    if problems:
        raise UserError(f"{cfg_path}: {'; '.join(problems)}; fix the file or re-export the "
                        "adapter")
    return config, tensors


def config_problems(config: dict[str, Any]) -> list[str]:
    """The LoRA fields of an adapter_config.json that are missing or of the wrong type."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    need = "PEFT's LoraConfig needs r, lora_alpha and target_modules"
    out = [f"missing key(s) {', '.join(missing)} ({need})"] if missing else []
    r, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    if "r" in config and not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        out.append(f"key 'r' is {r!r}; expected a positive integer (the LoRA rank)")
    if "lora_alpha" in config and not (number(alpha) and alpha > 0):
        out.append(f"key 'lora_alpha' is {alpha!r}; expected a positive number")
    if "target_modules" in config and not (
            (isinstance(targets, str) and targets)
            or (isinstance(targets, list) and targets and all(isinstance(t, str) and t
                                                              for t in targets))):
        out.append(f"key 'target_modules' is {targets!r}; expected a non-empty list of module "
                   "names")
    for key, kinds, expected in (("use_rslora", bool, "true or false"),
                                 ("base_model_name_or_path", (str, type(None)), "a string"),
                                 ("task_type", (str, type(None)), "a string")):
        if key in config and not isinstance(config[key], kinds):
            out.append(f"key {key!r} is {config[key]!r}; expected {expected}")
    return out
