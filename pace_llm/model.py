"""Tokenizer and base-model loading: hub ids and local directories, causal LM or classifier;
the loaded model checked against the tokenizer and the data (:func:`check_model`).

Under ZeRO-3 the weights are partitioned while loading (transformers reads the DeepSpeed config
kept alive in ``HfDeepSpeedConfig``), so no rank ever holds the whole model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pace_llm.data.sources import looks_like_path
from pace_llm.distributed import is_main
from pace_llm.dsconfig import zero_stage
from pace_llm.dtypes import resolve
from pace_llm.errors import UserError, first_line, listing, problems_error
from pace_llm.families import head_names
from pace_llm.hub import OFFLINE_FORM
from pace_llm.quant import load_quantized
from pace_llm.schema import Recipe

log = logging.getLogger(__name__)


def _hub_kwargs(recipe: Recipe) -> dict[str, Any]:
    """revision, and trust_remote_code: the recipe's value, which counts only when the command
    line set it (pace_llm/config.py refuses it from a recipe file)."""
    kw: dict[str, Any] = {"trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.revision:
        kw["revision"] = recipe.model.revision
    return kw


TRAIN_CODE_FLAG = "--model.trust_remote_code true"
"""What a train or data-check command line says to run a model repository's own code."""


def own_code(name_or_path: str) -> dict[str, str]:
    """A local model directory's ``config.json`` ``auto_map`` (class -> its own Python code),
    empty for a hub id or a model without one."""
    path = Path(name_or_path).expanduser() / "config.json" if name_or_path else None
    if path is None or not looks_like_path(name_or_path) or not path.is_file():
        return {}
    try:
        auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return {}  # reported when the model loads
    return {str(k): str(v) for k, v in auto_map.items()} if isinstance(auto_map, dict) else {}


def note_own_code(name_or_path: str, trusted: bool, flag: str) -> None:
    """Say (once per load) that a model's own code is not run, and how to run it."""
    code = own_code(name_or_path)
    if code and not trusted and is_main():
        shown = ", ".join(f"{k}: {v}" for k, v in list(code.items())[:3])
        log.warning("note: %s ships its own Python code (config.json auto_map: %s); it is not "
                    "run: transformers' built-in classes load the model. To run that code (only "
                    "for a model you trust): %s", name_or_path, shown, flag)


def remote_code_error(name_or_path: str, exc: Exception, flag: str) -> UserError | None:
    """The one message for transformers refusing a model that needs its own code; None for
    any other error."""
    if "trust_remote_code" not in str(exc):
        return None
    code = ", ".join(f"{k}: {v}" for k, v in list(own_code(name_or_path).items())[:3])
    return UserError(f"{name_or_path} can only be loaded by running its own Python code"
                     + (f" (config.json auto_map: {code})" if code else "") + "; pace_llm runs "
                     f"it only when the command line asks: {flag} (only for a model you trust)")


def check_model_dir(name_or_path: str, need_model: bool = True,
                    key: str = "model.name_or_path") -> None:
    """A local model path, checked before anything loads (see :func:`model_dir_problem`)."""
    problem = model_dir_problem(name_or_path, need_model, key)
    if problem is not None:
        raise UserError(problem)


def model_dir_problem(name_or_path: str, need_model: bool = True,
                      key: str = "model.name_or_path") -> str | None:
    """What is wrong with a local model path, or None: it exists, is a directory, and (for a
    model, not only a tokenizer) has a config.json object and weights whose safetensors headers
    read. Hub ids are left to the hub."""
    if not name_or_path or not looks_like_path(name_or_path):
        return None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return (f"{key}: {name_or_path!r} does not exist (resolved: {path.absolute()}); "
                "give an existing model directory, or a hub id like org/name")
    if not path.is_dir():
        return (f"{key}: {name_or_path!r} is a file; give the model directory that holds "
                f"config.json (e.g. {str(path.parent)!r})")
    if not need_model:
        return None
    config = path / "config.json"
    if not config.is_file():
        inside = sorted(p.name for p in path.iterdir())
        return (f"{key}: directory {name_or_path!r} has no config.json, so it is not a "
                f"transformers model directory (it holds: {listing(inside)}); give the "
                "directory written by save_pretrained / downloaded from the hub")
    try:
        body = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{config} is not valid JSON ({first_line(exc)}); restore the model's config.json"
    if not isinstance(body, dict):
        return (f"{config} holds a JSON {type(body).__name__}, not an object; it is not a "
                "transformers model config")
    return _weights_problem(path)


def _weights_problem(path: Path) -> str | None:
    """Every *.safetensors header readable (cheap: header only, no tensor is loaded)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            return (f"{file}: the weights cannot be read ({first_line(exc)}); the file is "
                    "truncated or corrupt: copy or download it again")
    return None


def load_tokenizer(name_or_path: str, recipe: Recipe, need_model: bool = True):
    """The base model's tokenizer, with a pad token that does not grow the vocabulary.

    ``need_model`` (training): the directory must also hold a model (see check_model_dir);
    data-check only needs the tokenizer."""
    from transformers import AutoTokenizer

    check_model_dir(name_or_path, need_model)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **_hub_kwargs(recipe))
    except OSError as exc:
        raise UserError(_load_failure("a tokenizer", name_or_path, exc)) from None
    except ValueError as exc:
        if (refusal := remote_code_error(name_or_path, exc, TRAIN_CODE_FLAG)) is not None:
            raise refusal from None
        raise
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token_id is None:
        raise UserError(f"the tokenizer of {name_or_path!r} has no pad, eos or unk token to pad with")
    return tok


def weight_dtype(recipe: Recipe, precision: str) -> torch.dtype:
    """model.dtype, or the training precision's dtype when auto."""
    return resolve(recipe.model.dtype, precision)


def load_model(name_or_path: str, recipe: Recipe, *, causal: bool, num_labels: int | None,
               pad_token_id: int, dtype: torch.dtype, ds_config: dict | None) -> nn.Module:
    """The frozen base model (causal LM or sequence classifier), partitioned under ZeRO-3."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    check_model_dir(name_or_path)
    note_own_code(name_or_path, recipe.model.trust_remote_code, TRAIN_CODE_FLAG)
    kw: dict[str, Any] = dict(_hub_kwargs(recipe), dtype=dtype)
    if recipe.model.attn_implementation:
        kw["attn_implementation"] = recipe.model.attn_implementation
    keep_alive = _zero3_loading(ds_config)  # noqa: F841  (must live until the model is built)
    if causal:
        cls = AutoModelForCausalLM
    else:
        cls = AutoModelForSequenceClassification
        kw.update(num_labels=num_labels, pad_token_id=pad_token_id)
        if num_labels == 1:
            kw["problem_type"] = "regression"
    try:
        if recipe.quant.bits in (4, 8):
            model = load_quantized(cls, name_or_path, recipe.quant, dtype,
                                   zero_stage(ds_config) if ds_config else 0, **kw)
        else:
            try:
                model = cls.from_pretrained(name_or_path, **kw)
            except (OSError, SafetensorError) as exc:
                raise UserError(_load_failure("the model", name_or_path, exc)) from None
    except (ImportError, ValueError) as exc:  # its own code, or an attention backend
        if (refusal := remote_code_error(name_or_path, exc, TRAIN_CODE_FLAG)) is not None:
            raise refusal from None
        if not recipe.model.attn_implementation or "ttention" not in str(exc):
            raise
        raise UserError(f"model.attn_implementation: {recipe.model.attn_implementation!r} "
                        f"cannot be used here ({first_line(exc)}); use sdpa or eager, or "
                        "install its package") from None
    if causal and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _load_failure(what: str, name_or_path: str, exc: BaseException) -> str:
    """One line for a failed load: a local directory's problem, or the hub's with the way out."""
    if looks_like_path(name_or_path):
        return f"model.name_or_path: cannot load {what} from {name_or_path!r}: {first_line(exc)}"
    return (f"model.name_or_path: {name_or_path!r} is no local directory and could not be loaded "
            f"from the Hugging Face hub ({first_line(exc)}); {OFFLINE_FORM}")


def classifier_head(model: nn.Module) -> list[str]:
    """Names of the task head that trains alongside the adapters (empty for causal LMs)."""
    heads = head_names(getattr(model.config, "model_type", None))
    return [n for n, _ in model.named_children() if n in heads]


def _zero3_loading(ds_config: dict | None):
    if not ds_config or zero_stage(ds_config) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def base_model_dir(recipe: Recipe, output_dir: Path) -> str:
    """Where the base model is read from: model.name_or_path, or the offline-built base."""
    if recipe.model.build is not None:
        return str(output_dir / "base_model")
    return recipe.model.name_or_path


# ----------------------------------------------------------------------- the loaded model
# learned position tables that start after the padding index (RoBERTa family)
POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "xlm-roberta-xl": 2}


def check_model(recipe: Recipe, model: Any, tokenizer: Any, task: Any) -> None:
    """Refuse a model that cannot run the task: token ids beyond its embedding rows, or
    sequences beyond its position limit. Every problem in one UserError.

    Call after the base model is loaded (and adapters injected) and before the optimizer and
    ``deepspeed.initialize``. ``task`` is the TaskData of ``pace_llm.tasks.build_task``.
    """
    problems = _vocab_problems(model, tokenizer, task) + _length_problems(recipe, model, task)
    if problems:
        raise problems_error(f"{len(problems)} problem(s) with this model", problems)


def _ids(task: Any) -> Iterable[list[int]]:
    rows = [*task.eval, *(r for rows in task.extra_eval.values() for r in rows)]  # eval: lists
    for row in rows:
        for key in ("input_ids", "prompt_ids", "target_ids"):
            if row.get(key):
                yield row[key]


def _vocab_problems(model: Any, tokenizer: Any, task: Any) -> list[str]:
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if not isinstance(rows, int):
        return []
    top_tokenizer = len(tokenizer) - 1
    top_data = max([task.max_train_id, *(max(ids) for ids in _ids(task))])  # train: the cache's
    if max(top_tokenizer, top_data) < rows:
        return []
    return [(f"the tokenizer's ids reach {top_tokenizer} (len(tokenizer) = {len(tokenizer)}; "
             f"the task's examples use ids up to {top_data}) but the model has {rows} embedding "
             f"rows (ids 0..{rows - 1}): the tokenizer does not belong to this model. Use the "
             "tokenizer saved with the model (same directory), or resize the model's "
             "embeddings (model.resize_token_embeddings) and save it")]


def position_limit(config: Any) -> int | None:
    """The positions a model config gives a sequence (None: it does not say): its
    max_position_embeddings less a learned table's offset; a config object or a dict."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    limit = get("max_position_embeddings")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None
    return limit - POSITION_OFFSET.get(get("model_type"), 0)


def max_length_problem(recipe: Recipe, limit: int | None) -> str | None:
    """data.max_length beyond the model's positions (checked from config.json at parse time,
    and again on the loaded model)."""
    if limit is None or recipe.data.max_length <= limit:
        return None
    return (f"data.max_length: {recipe.data.max_length} is beyond the model's {limit} positions "
            f"(config.max_position_embeddings); set --data.max_length {limit} (or lower)")


def config_dict(recipe: Recipe) -> dict[str, Any] | None:
    """The base model's config as a dict, read without loading the model (None: not known
    here): model.build, a local directory's config.json, or one in the hub cache."""
    if recipe.model.build is not None:
        return dict(recipe.model.build) if isinstance(recipe.model.build, dict) else None
    name = recipe.model.name_or_path
    if not name:
        return None
    path: Any = Path(name).expanduser() / "config.json"
    if not looks_like_path(name):
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name, "config.json", revision=recipe.model.revision)
    try:
        body = json.loads(Path(path).read_text(encoding="utf-8"))
    except (TypeError, OSError, ValueError):  # not cached, absent or unreadable: known later
        return None
    return body if isinstance(body, dict) else None


def _length_problems(recipe: Recipe, model: Any, task: Any) -> list[str]:
    limit = position_limit(getattr(model, "config", None))
    if limit is None:
        return []
    problems = []
    if (problem := max_length_problem(recipe, limit)) is not None:
        problems.append(problem)
    inputs = [r.get("prompt_ids") or r.get("input_ids") or [] for r in task.eval]
    longest = max(map(len, inputs), default=0)
    if longest > limit:
        problems.append(f"an evaluation input has {longest} tokens, beyond the model's {limit} "
                        "positions (evaluation rows are never cut); use shorter evaluation rows "
                        "(data.eval_path) or a model with more positions")
    return problems
