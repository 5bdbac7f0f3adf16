"""Offline check that a PEFT adapter directory is one vLLM will load and serve correctly.

Re-implements vLLM's own load-time checks -- ``PEFTHelper.validate_legal`` in
vllm/lora/peft_helper.py (rank limits, DoRA, bias, required fields) and
``parse_fine_tuned_lora_name`` in vllm/lora/utils.py (which tensor keys are LoRA weights) --
and adds those vLLM misses: tensor rank equal to the config ``r`` (vLLM silently rescales),
every listed target has tensors, tensors only for listed targets, tensor shapes against the
base model's config (vLLM fails later, at the first forward), and the prompt layout: an adapter
trained on chat-rendered data carries its template (chat_template.jinja, valid Jinja), which
the serve command passes with ``--chat-template`` (a server would otherwise prompt with the
base's own layout, without a warning). docs/VLLM.md describes the contract and how
scripts/check_vllm.py cross-checks this mirror against a real vLLM.

Export runs the check once, on the adapter directory it has just written (before moving it
into place); ``pace-llm export --check vllm`` runs it on an existing directory.

    check_vllm_contract(adapter_dir, base_config)   -> report lines, or UserError listing all
    contract_violations(config, tensors, base_config) -> the violations (pure)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pace_llm.data.build import renders_conversations
from pace_llm.dtypes import FLOAT_DTYPES
from pace_llm.errors import UserError, bulleted, first_line, listing
from pace_llm.families import embedding_names, expected_shape
from pace_llm.inject import block_relative
from pace_llm.peft_format import (
    PREFIX,
    TEMPLATE_FILE,
    adapted_modules,
    peft_target_match,
    read_adapter,
    read_chat_template,
)
from pace_llm.schema import DataArgs

ALLOWED_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""Values vLLM accepts for --max-lora-rank (vllm/config/lora.py); its default is 16."""
VLLM_DEFAULT_MAX_LORA_RANK = 16
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# adapter_config keys that switch on features vLLM rejects (or silently mis-serves) when set
_UNSUPPORTED_FEATURES = ("layer_replication", "alora_invocation_tokens", "trainable_token_indices",
                         "use_bdlora", "use_qalora", "lora_bias", "target_parameters")
_NONPLAIN_INIT = ("pissa", "olora", "corda", "loftq", "eva")


def required_max_lora_rank(r: int) -> int | None:
    """The smallest --max-lora-rank value vLLM allows that serves rank r (None: r > 512)."""
    return next((v for v in ALLOWED_MAX_LORA_RANKS if v >= r), None)


# --------------------------------------------------------------------------------------------
# Base-model shapes
# --------------------------------------------------------------------------------------------

def load_base_config(base: Any) -> dict[str, Any] | None:
    """A plain dict of the base model config from a dict, a PretrainedConfig or a model dir."""
    if base is None:
        return None
    if isinstance(base, Mapping):
        cfg = dict(base)
    elif hasattr(base, "to_dict"):
        cfg = base.to_dict()
    else:
        path = Path(base) / "config.json"
        if not path.is_file():
            raise UserError(f"base model config {path} not found: give a model directory with a "
                            "config.json (or pass the config itself)")
        cfg = json.loads(path.read_text())
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), Mapping):
        cfg = {**cfg, **cfg["text_config"]}  # multimodal wrappers keep the LM sizes here
    return cfg


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------

def _config_violations(config: Mapping[str, Any], max_lora_rank: int | None) -> list[str]:
    v: list[str] = []
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        v.append(f"adapter_config.json lacks required field(s) {', '.join(missing)} "
                 "(vLLM: 'Missing required configuration fields')")
    if config.get("peft_type", "LORA") != "LORA":
        v.append(f"peft_type {config.get('peft_type')!r}: vLLM serves only LORA adapters")
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        v.append(f"task_type {task!r}: vLLM serves generation adapters (CAUSAL_LM); serve a "
                 f"{task} adapter with transformers + PEFT")
    r = config.get("r")
    if "r" in config and (not isinstance(r, int) or isinstance(r, bool) or r <= 0):
        v.append(f"r = {r!r}: the LoRA rank must be a positive integer")
    elif isinstance(r, int):
        need = required_max_lora_rank(r)
        allowed = ", ".join(map(str, ALLOWED_MAX_LORA_RANKS))
        if need is None:
            v.append(f"r = {r} is above vLLM's largest --max-lora-rank (512; allowed values "
                     f"{allowed}); retrain with r <= 512")
        elif max_lora_rank is not None and r > max_lora_rank:
            v.append(f"r = {r} is greater than max_lora_rank {max_lora_rank} (vLLM: 'LoRA rank "
                     f"{r} is greater than max_lora_rank {max_lora_rank}'); serve with "
                     f"--max-lora-rank {need} (allowed values: {allowed})")
    targets = config.get("target_modules")
    if "target_modules" in config and (not isinstance(targets, list) or not targets
                                       or not all(isinstance(t, str) and t for t in targets)):
        v.append(f"target_modules = {targets!r}: must be an explicit, non-empty list of module "
                 "names (never 'all-linear' or a regex)")
    if config.get("use_dora"):
        v.append("use_dora: true — vLLM does not support DoRA ('vLLM does not yet support DoRA'); "
                 "retrain without DoRA")
    if config.get("bias", "none") != "none":
        v.append(f"bias = {config.get('bias')!r}: vLLM accepts only bias 'none' ('Adapter bias "
                 "is not supported')")
    if config.get("modules_to_save"):
        v.append(f"modules_to_save = {config['modules_to_save']}: vLLM serves no fully-saved "
                 "modules (a classification head, lm_head, embeddings); a CAUSAL_LM adapter "
                 "must have modules_to_save null")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            v.append(f"{key} = {config[key]}: per-module ranks/alphas are applied as one global "
                     "scaling by many vLLM versions; export one r and lora_alpha for all modules")
    for key in _UNSUPPORTED_FEATURES:
        if config.get(key):
            v.append(f"{key} = {config[key]!r}: a PEFT feature vLLM rejects; export a plain LoRA")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.split("_")[0].lower() in _NONPLAIN_INIT:
        v.append(f"init_lora_weights = {init!r}: vLLM rejects {init} adapters; convert to a plain "
                 "LoRA first")
    return v


def _tensor_violations(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                       base: Mapping[str, Any] | None) -> list[str]:
    v: list[str] = []
    if not tensors:
        return ["adapter_model.safetensors holds no tensors (vLLM: 'doesn't contain tensors')"]
    bad_keys, embed_keys, named_keys = [], [], []
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    embeddings = embedding_names()
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        m = _LORA_KEY.match(name)
        if any(w in name.split(".") for w in embeddings) or "lora_embedding" in name:
            embed_keys.append(key)
        elif re.search(r"\.lora_[AB]\.[^.]+\.weight$", name):
            named_keys.append(key)
        elif m is None:
            bad_keys.append(key)
        else:
            pairs.setdefault(m.group("module"), {})[m.group("ab")] = t
    if embed_keys:
        v.append(f"embedding/lm_head tensors {listing(embed_keys, 4)}: vLLM cannot serve a saved "
                 "or LoRA-adapted vocabulary; keep the vocabulary unchanged and do not train "
                 "embeddings")
    if bad_keys:
        v.append(f"tensors {listing(bad_keys, 4)} are not LoRA weights: vLLM accepts only "
                 "'<module>.lora_A.weight' / '<module>.lora_B.weight' ('is unsupported LoRA "
                 "weight'; DoRA magnitudes, modules_to_save copies and biases are refused)")
    if named_keys:
        v.append(f"tensors {listing(named_keys, 4)} carry an adapter-name segment ('.default.'); "
                 "keys must be base_model.model.<module>.lora_A.weight")
    half = sorted(mod + (".lora_B" if "A" in ab else ".lora_A") for mod, ab in pairs.items()
                  if len(ab) == 1)
    if half:
        v.append(f"tensors {listing(half, 4)} are missing (every module needs lora_A and lora_B)")
    full = {mod: ab for mod, ab in pairs.items() if len(ab) == 2}
    v += _rank_and_target_violations(config, full)
    v += _value_violations(full)
    if base is not None:
        v += _shape_violations(full, base)
    return v


def _rank_and_target_violations(config: Mapping[str, Any],
                                pairs: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    v: list[str] = []
    r = config.get("r")
    wrong_rank = sorted(f"{mod} (A {list(ab['A'].shape)}, B {list(ab['B'].shape)})"
                        for mod, ab in pairs.items()
                        if ab["A"].dim() != 2 or ab["B"].dim() != 2
                        or ab["A"].shape[0] != r or ab["B"].shape[1] != r)
    if wrong_rank:
        v.append(f"tensor rank differs from config r = {r} in {listing(wrong_rank, 4)}: vLLM would "
                 "silently apply the wrong scaling (PEFT refuses to load it)")
    targets = config.get("target_modules")
    if isinstance(targets, list) and targets:
        without = [t for t in targets if not any(peft_target_match(m, [t]) for m in pairs)]
        if without:
            v.append(f"target_modules {without} have no lora_A/lora_B tensors: list only the "
                     "modules the adapter was trained on")
        unlisted = sorted(m for m in pairs if not peft_target_match(m, targets))
        if unlisted:
            v.append(f"modules {listing(unlisted, 4)} have tensors but match no entry of "
                     f"target_modules {targets}")
        excluded = config.get("exclude_modules") or []
        if isinstance(excluded, list):
            hit = sorted(m for m in pairs if peft_target_match(m, excluded))
            if hit:
                v.append(f"modules {listing(hit, 4)} have tensors but are in exclude_modules")
    return v


def _value_violations(pairs: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    v: list[str] = []
    odd = sorted({str(t.dtype) for ab in pairs.values() for t in ab.values()} -
                 {str(d) for d in FLOAT_DTYPES.values()})
    if odd:
        v.append(f"tensor dtype(s) {odd}: export in bfloat16, float16 or float32")
        return v
    nonfinite = sorted(f"{m}.lora_{k}" for m, ab in pairs.items() for k, t in ab.items()
                       if not torch.isfinite(t).all())
    if nonfinite:
        v.append(f"NaN/inf values in {listing(nonfinite, 4)}")
    if pairs and all(not ab["B"].any() for ab in pairs.values()):
        v.append("every lora_B is all-zero: the adapter is a no-op (exported before training, "
                 "or from ZeRO-3 shards that were not gathered)")
    return v


def _shape_violations(pairs: Mapping[str, Mapping[str, torch.Tensor]],
                      base: Mapping[str, Any]) -> list[str]:
    v: list[str] = []
    n_layers = base.get("num_hidden_layers")
    sizes = ", ".join(f"{k} {base.get(k)}" for k in ("hidden_size", "intermediate_size",
                      "num_attention_heads", "num_key_value_heads", "head_dim") if base.get(k))
    wrong, beyond = [], []
    for mod, ab in sorted(pairs.items()):
        idx, rel = block_relative(mod)
        if isinstance(n_layers, int) and idx is not None and idx >= n_layers:
            beyond.append(mod)
        want = expected_shape(rel, base)
        if want is None or ab["A"].dim() != 2 or ab["B"].dim() != 2:
            continue
        got = (ab["B"].shape[0], ab["A"].shape[1])
        if got != want:
            wrong.append(f"{mod} (adapter out×in {got[0]}×{got[1]}, base {want[0]}×{want[1]})")
    if wrong:
        v.append(f"tensor shapes do not fit the base model ({sizes}): {listing(wrong, 4)} — the "
                 "adapter was trained on another model")
    if beyond:
        v.append(f"modules {listing(beyond, 4)} lie beyond the base model's {n_layers} layers")
    return v


def trained_chat_layout(adapter_dir: str | Path) -> str | None:
    """What in the adapter's pace_config.json says its data was rendered with a chat template
    (``data.task instruct`` / ``data.prompt_style chat``), or None (no record, or no chat)."""
    path = Path(adapter_dir) / "pace_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["recipe"]["data"]
        known = {f.name for f in dataclasses.fields(DataArgs)}
        args = DataArgs(**{k: v for k, v in data.items() if k in known})
        chat = renders_conversations(args)
    except (OSError, ValueError, KeyError, TypeError):  # no record of the recipe: not known
        return None
    if not chat:
        return None
    return f"data.task {args.task!r}, data.prompt_style {args.prompt_style!r}" + (
        " (or a data.mix source's)" if args.mix else "")


def template_violations(adapter_dir: str | Path, shown_as: str | Path | None = None) -> list[str]:
    """The adapter's chat template: present when the run trained a chat layout, and valid
    Jinja (the serve command hands it to vLLM with --chat-template). Messages name
    ``shown_as`` (default ``adapter_dir``)."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    path = Path(shown_as if shown_as is not None else adapter_dir) / TEMPLATE_FILE
    text = read_chat_template(adapter_dir)
    if text is None:
        layout = trained_chat_layout(adapter_dir)
        if layout is None:
            return []
        return [(f"no {TEMPLATE_FILE}, but the adapter was trained on conversations rendered "
                 f"with a chat template ({layout}, pace_config.json): a server would prompt it "
                 "with another layout, without a warning; save the template the run rendered "
                 "with (its recipe's data.chat_template, else the tokenizer's own) as "
                 f"{path}")]
    try:
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).parse(text)
    except TemplateSyntaxError as exc:
        return [(f"{path} line {exc.lineno} is not a valid Jinja template ({first_line(exc)}); "
                 "vLLM's --chat-template would refuse it")]
    return []


def contract_violations(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                        base_config: Any = None, max_lora_rank: int | None = None) -> list[str]:
    """Every way this adapter breaks vLLM's loading contract (empty list = servable).

    Args:
        config: the adapter_config.json dict.
        tensors: the adapter_model.safetensors contents.
        base_config: the base model's config (dict, PretrainedConfig or model dir) for the
            shape checks; None skips them.
        max_lora_rank: the server's --max-lora-rank; None checks only vLLM's largest (512).
    """
    if max_lora_rank is not None and max_lora_rank not in ALLOWED_MAX_LORA_RANKS:
        raise UserError(f"--max-lora-rank {max_lora_rank} is not a value vLLM accepts; allowed: "
                        f"{', '.join(map(str, ALLOWED_MAX_LORA_RANKS))}")
    return (_config_violations(config, max_lora_rank)
            + _tensor_violations(config, tensors, load_base_config(base_config)))


def _default_base(config: Mapping[str, Any]) -> tuple[Any, str]:
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and (Path(base) / "config.json").is_file():
        return base, f"shapes checked against {base}/config.json"
    return None, ("shapes NOT checked: base_model_name_or_path is not a local model directory "
                  "(pass base_config / --base)")


def check_vllm_contract(adapter_dir: str | Path, base_config: Any = None, *,
                        max_lora_rank: int | None = None,
                        shown_as: str | Path | None = None) -> list[str]:
    """Check an adapter directory against vLLM's contract; return the report lines.

    Args:
        adapter_dir: a PEFT adapter directory.
        base_config: base model config (dict, PretrainedConfig or model directory) for the
            shape checks; None = the adapter's base_model_name_or_path if it is a local dir.
        max_lora_rank: the --max-lora-rank of the server it will run on (None: any allowed).
        shown_as: the directory named in the messages (export checks a temporary directory
            that becomes shown_as); None = adapter_dir.

    Raises:
        UserError: one message listing every violation.
    """
    config, tensors = read_adapter(adapter_dir)
    shown = adapter_dir if shown_as is None else shown_as
    if base_config is None:
        base_config, shape_note = _default_base(config)
    elif isinstance(base_config, (str, Path)):
        shape_note = f"shapes checked against {base_config}/config.json"
    else:
        shape_note = "shapes checked against the given base config"
    problems = (contract_violations(config, tensors, base_config, max_lora_rank)
                + template_violations(adapter_dir, shown))
    if problems:
        raise UserError(bulleted(f"{shown} breaks vLLM's adapter contract ({len(problems)} "
                                 "problem(s))", problems))
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    modules = adapted_modules(tensors)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    template = (Path(shown) / TEMPLATE_FILE).resolve()
    has_template = (Path(adapter_dir) / TEMPLATE_FILE).is_file()
    return [
        f"vLLM contract: OK ({shown})",
        (f"  rank r={r}, lora_alpha={alpha}, scaling {scaling:.4g}"
         f"{' (rsLoRA)' if config.get('use_rslora') else ''}"),
        (f"  targets {', '.join(config['target_modules'])}: {len(modules)} modules, "
         f"{len(tensors)} tensors, dtype {', '.join(dtypes)}"),
        f"  {shape_note}",
        (f"  chat template: {template} (the layout the adapter was trained on)" if has_template
         else "  chat template: none (no chat layout was trained: prompt with the training text)"),
        f"  serve: {serve_command(adapter_dir, shown, config)}",
    ]


def serve_command(adapter_dir: str | Path, shown_as: str | Path | None = None,
                  config: dict[str, Any] | None = None) -> str:
    """The ``vllm serve`` command for an adapter that passed the check: its base, the rank it
    needs, the adapter, and its training chat template (``--chat-template``) when it has one.
    ``shown_as``: the directory the command names (default ``adapter_dir``); ``config``: its
    adapter_config.json when the caller has read it already."""
    if config is None:
        config, _ = read_adapter(adapter_dir)
    shown = Path(shown_as if shown_as is not None else adapter_dir).resolve()
    r = config["r"]
    need = required_max_lora_rank(r)
    base = config.get("base_model_name_or_path") or "<base model>"
    template = (f" --chat-template {shown / TEMPLATE_FILE}"
                if (Path(adapter_dir) / TEMPLATE_FILE).is_file() else "")
    note = ("" if need <= VLLM_DEFAULT_MAX_LORA_RANK else
            f"   (r={r} needs --max-lora-rank {need}; vLLM's default is 16)")
    return (f"vllm serve {base} --enable-lora --max-lora-rank {need} --lora-modules "
            f"pace={shown}{template}{note}")
