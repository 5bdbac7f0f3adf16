"""Export a PACE-trained model's adapter as a PEFT LoRA directory vLLM can serve; the CLI.

At inference a PACE adapter is a plain LoRA (the noise is training-only), so the export is
PEFT's on-disk format (pace_llm.peft_format) plus a pace_config.json recording the recipe and,
for a run whose data was rendered with a chat template, that template (chat_template.jinja):
what a served model must be prompted with.
Under DeepSpeed ZeRO-3 only the adapter and head parameters are gathered; every rank takes
part in the gather and rank 0 writes. Writes go to a temporary directory that is renamed into
place, so a crash never leaves half an adapter; a CAUSAL_LM adapter is checked against vLLM's
contract (pace_llm.vllm_contract) in that temporary directory, so one that breaks it is never
put in place.

    pace-llm export --run DIR [--step N] --out DIR [--dtype D]    re-export (cast) an adapter
    pace-llm export --run DIR --out DIR --merge                     merged HF model (pace_llm.merge)
    pace-llm export --adapter DIR --check vllm [--max-lora-rank R]  check only

A run directory is data: nothing read from it (its recipe's ``model.trust_remote_code``
included) makes export run code; the base model's own code runs only with
``--trust-remote-code`` on this command line. ``--out`` never replaces what export reads: the
run, the adapter, the base model, or a part of the run.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pace_llm import console
from pace_llm.atomic import WriteFault, atomic_dir, inside, refuse_nonempty
from pace_llm.config import load_recipe
from pace_llm.data.sources import looks_like_path
from pace_llm.distributed import on_rank0, unwrap
from pace_llm.dtypes import FLOAT_DTYPES, PRECISION_DTYPES
from pace_llm.errors import UserError, first_line, run_command
from pace_llm.lora import NoisyLoRALinear, lora_layers
from pace_llm.merge import merge_adapter_dir
from pace_llm.peft_format import (
    adapter_config,
    adapter_tensors,
    peft_targets,
    read_adapter,
    read_chat_template,
    write_adapter,
)
from pace_llm.rundir import RUN_ENTRIES
from pace_llm.vllm_contract import check_vllm_contract

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

    from pace_llm.schema import Recipe

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")


# --------------------------------------------------------------------------------------------
# Adapter export
# --------------------------------------------------------------------------------------------

def _uniform(layers: list[tuple[str, NoisyLoRALinear]]) -> NoisyLoRALinear:
    first = layers[0][1]
    odd = [n for n, m in layers if (m.r, m.alpha, m.rslora) != (first.r, first.alpha, first.rslora)]
    if odd:
        raise UserError(f"adapters {odd[:3]} have another r/alpha/rslora than {layers[0][0]} "
                        f"(r={first.r}, alpha={first.alpha}); vLLM applies one scaling to all "
                        "modules, so export needs one r and alpha")
    return first


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
                      base_config: Any = None, chat_template: str | None = None) -> Path:
    """Write the adapter (and pace_config.json, and the training chat template) atomically.

    With check_vllm the written copy is checked against vLLM's contract before it is moved into
    place; a violation raises UserError and leaves out_dir as it was.
    """
    with atomic_dir(out_dir, overwrite, what="adapter") as tmp:
        write_adapter(tmp, config, tensors, chat_template)
        if pace_notes is not None:
            (tmp / "pace_config.json").write_text(json.dumps(pace_notes, indent=2, default=str)
                                                  + "\n")
        if check_vllm:
            check_vllm_contract(tmp, base_config=base_config, shown_as=out_dir)
    return Path(out_dir)


def _rescued(fault: WriteFault, out_dir: str | Path, config: dict[str, Any],
             tensors: dict[str, torch.Tensor], notes: dict[str, Any],
             chat_template: str | None) -> WriteFault:
    """After the filesystem refused the adapter: the same adapter written to the system's
    temporary directory (often another filesystem), and one message saying where it is, or
    that it could not be kept."""
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    out = Path(out_dir)
    rescue = Path(tempfile.mkdtemp(prefix=f"pace_llm-{out.parent.name}-{out.name}-"))
    try:
        write_adapter_dir(rescue / "adapter", config, tensors, notes,
                          chat_template=chat_template)
    except (UserError, OSError) as again:
        shutil.rmtree(rescue, ignore_errors=True)
        return WriteFault(f"{fault}; the adapter needs about {need} bytes; writing it to "
                          f"{rescue} failed too ({first_line(again)}): the trained adapter "
                          "could not be kept", fault.kind, fault.path)
    return WriteFault(f"{fault}; the adapter needs about {need} bytes. The trained adapter was "
                      f"written to {rescue / 'adapter'} instead: move it to {out_dir} once "
                      "there is room (it is the run's result)", fault.kind, fault.path)


def export_adapter(model: nn.Module, out_dir: str | Path, *, base_model_name_or_path: str,
                   task_type: str, dtype: torch.dtype, head_modules: Sequence[str] = (),
                   pace_info: dict[str, Any] | None = None, overwrite: bool = False,
                   chat_template: str | None = None, rescue: bool = False) -> Path:
    """Write the model's adapters as a PEFT LoRA directory (plus pace_config.json and the
    training chat template).

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
        chat_template: the template the training data was rendered with (chat_template.jinja;
            None: the run trained no chat layout).
        rescue: when the filesystem refuses out_dir (full, read-only, ...), write the adapter
            to the system's temporary directory instead and say so (a run's final adapter).

    Raises:
        UserError: no adapters, every lora_B zero, bad task_type/head, out_dir not empty,
            (CAUSAL_LM) the written adapter breaks vLLM's contract, or the filesystem refused
            the write (WriteFault, naming where a rescued copy is).
    """
    if task_type not in TASK_TYPES:
        raise UserError(f"task_type {task_type!r} is not supported; use one of {TASK_TYPES}")
    if task_type == "CAUSAL_LM" and head_modules:
        raise UserError(f"head_modules {list(head_modules)} with task_type CAUSAL_LM: vLLM "
                        "cannot serve modules_to_save; a causal LM exports adapters only")
    if dtype not in FLOAT_DTYPES.values():
        raise UserError(f"export dtype {dtype} is not supported; use one of "
                        f"{', '.join(FLOAT_DTYPES)}")
    model = unwrap(model)
    layers = list(lora_layers(model))
    if not layers:
        raise UserError("the model has no NoisyLoRALinear layers: refusing to write an empty "
                        "adapter (was inject_noisy_lora called on this model?)")
    first = _uniform(layers)
    on_rank0(lambda: refuse_nonempty(out_dir, overwrite))
    tensors = adapter_tensors(model, head_modules, dtype)
    if all(not t.any() for k, t in tensors.items() if k.endswith(".lora_B.weight")):
        raise UserError(f"every lora_B of the {len(layers)} adapted layers is zero: the adapter "
                        "is a no-op (export before any training step, or ZeRO-3 shards not "
                        "gathered); refusing to write it")
    targets, excludes = peft_targets(model, [n for n, _ in layers])
    config = adapter_config(first, targets, excludes, task_type=task_type,
                            base_model_name_or_path=base_model_name_or_path,
                            head_modules=head_modules)
    notes = _pace_notes(model, layers, task_type, pace_info)

    def write() -> None:
        try:
            write_adapter_dir(out_dir, config, tensors, notes, overwrite=overwrite,
                              check_vllm=task_type == "CAUSAL_LM",
                              base_config=getattr(model, "config", None),
                              chat_template=chat_template)
        except WriteFault as fault:
            if not rescue:
                raise
            raise _rescued(fault, out_dir, config, tensors, notes, chat_template) from None

    on_rank0(write)
    return Path(out_dir)


# --------------------------------------------------------------------------------------------
# CLI: pace-llm export --run DIR [--step N] --out DIR [--merge] [--check vllm]
# --------------------------------------------------------------------------------------------

def _parser() -> ArgumentParser:
    from jsonargparse import ArgumentParser

    p = ArgumentParser(
        prog="pace-llm export", exit_on_error=False, default_env=False,
        description="Re-export, merge or check a run's PEFT adapter. --out DIR writes the adapter "
                    "(cast to --dtype); with --merge, DIR gets a merged HF model instead.")
    src = p.add_argument_group("source (one of)")
    src.add_argument("--run", type=str, help="a training output_dir (uses <run>/adapter)")
    src.add_argument("--adapter", type=str, help="a PEFT adapter directory")
    p.add_argument("--step", type=int, help="use <run>/checkpoints/step-N/adapter")
    p.add_argument("--out", type=str, help="output directory")
    p.add_argument("--merge", action="store_true", help="write a merged HF model to --out")
    p.add_argument("--check", choices=["vllm"], help="check the adapter against vLLM's contract")
    p.add_argument("--max-lora-rank", type=int,
                   help="the vLLM server's --max-lora-rank to check against; null = any")
    p.add_argument("--dtype", choices=["auto", *FLOAT_DTYPES],
                   help="dtype written; auto/null = the recipe's export.dtype, else as stored")
    p.add_argument("--base", type=str, help="base model directory; null = adapter_config's "
                                            "base_model_name_or_path, then <run>/base_model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="--merge: run the base model's own Python code (config.json auto_map); "
                        "only for a model you trust. A run's recipe.yaml never turns it on")
    return p


def _parse(argv: list[str] | None) -> Namespace | int:
    """The parsed flags, or the exit code of --help; a parse error becomes one UserError line."""
    from jsonargparse import ArgumentError

    try:
        return _parser().parse_args(argv)
    except ArgumentError as exc:
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise UserError(f"{text} (see pace-llm export --help)") from None
    except SystemExit as exc:  # --help printed the usage
        return int(exc.code or 0)


def _run_recipe(run: Path) -> Recipe:
    path = run / "recipe.yaml"
    if not path.is_file():
        raise UserError(f"{run} is not a run directory: {path} is missing")
    # paths saved in the recipe (deepspeed config, resume) are irrelevant to export
    return load_recipe(["--recipe", str(path), "--deepspeed", "null", "--train.resume", "null"])


def _source_adapter(args: Namespace) -> Path:
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


def _export_dtype(args: Namespace, recipe: Recipe | None) -> torch.dtype | None:
    """--dtype, else the recipe's export.dtype; auto = the run's precision; None = as stored."""
    name = args.dtype or (recipe.export.dtype if recipe is not None else "auto")
    if name == "auto":
        return PRECISION_DTYPES.get(recipe.train.precision) if recipe is not None else None
    return FLOAT_DTYPES.get(name)


def _local(base: str | None) -> str | None:
    """base when it is a local model directory (its config.json is readable), else None."""
    return base if base and (Path(base) / "config.json").is_file() else None


def _check_base_flag(base: str | None, recorded: Any) -> None:
    """--base, when given, is used as given: a local directory must hold config.json (a hub id
    is passed on); never silently replaced by the recorded base."""
    if not base or not looks_like_path(base):
        return
    path = Path(base).expanduser()
    instead = (f"; or omit --base to use the adapter's recorded base {recorded!r}"
               if isinstance(recorded, str) and recorded else "")
    if not path.exists():
        raise UserError(f"--base {base} does not exist; give the base model directory "
                        f"(config.json + weights){instead}")
    if not path.is_dir():
        raise UserError(f"--base {base} is a file; give the base model directory that holds "
                        f"config.json{instead}")
    if not (path / "config.json").is_file():
        raise UserError(f"--base {base} has no config.json, so it is not a model directory; give "
                        f"the directory the base model was saved in{instead}")


def _base_dir(args: Namespace, config: dict[str, Any]) -> str | None:
    """--base as given (checked), else the adapter's recorded base when it is a local model
    directory, else <run>/base_model, else the recorded name (a hub id)."""
    recorded = config.get("base_model_name_or_path")
    _check_base_flag(args.base, recorded)
    if args.base:
        return args.base
    candidates = [recorded, str(Path(args.run) / "base_model") if args.run else None]
    return next((c for c in candidates if _local(c)), None) or recorded


def _reexport(src: Path, out: str, dtype: torch.dtype | None, base: str | None,
              overwrite: bool) -> None:
    config, tensors = read_adapter(src)
    if dtype is not None:
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    notes_path = src / "pace_config.json"
    notes = json.loads(notes_path.read_text()) if notes_path.is_file() else None
    write_adapter_dir(out, config, tensors, notes, overwrite=overwrite,
                      check_vllm=config.get("task_type") == "CAUSAL_LM", base_config=_local(base),
                      chat_template=read_chat_template(src))
    print(f"adapter written to {out}")


def _refuse_own_inputs(out: str, args: Namespace, src: Path, base: str | None) -> None:
    """--out may not be, or hold, what this export reads (the run, the adapter, a local base
    model), nor a part of the run (its adapter, checkpoints, ...): --overwrite would replace it."""
    target = Path(out).expanduser().resolve()
    reads = [("the run", args.run), ("the adapter", str(src)),
             ("the base model", base if _local(base) else None)]
    for what, path in reads:
        if path and inside(Path(path).expanduser().resolve(), target):
            raise UserError(f"--out {out} is, or holds, {what} this export reads ({path}); "
                            "writing there would replace it: choose another directory")
    if args.run:
        run = Path(args.run).expanduser().resolve()
        part = target.relative_to(run).parts[0] if target != run and inside(target, run) else ""
        if part in RUN_ENTRIES:
            raise UserError(f"--out {out} is part of the run {args.run} (its {part}); writing "
                            "there would replace it: choose a directory outside the run, or a "
                            "new name inside it")


def _command(argv: list[str] | None) -> int:
    args = _parse(argv)
    if isinstance(args, int):
        return args
    src = _source_adapter(args)
    if args.merge and not args.out:
        raise UserError("--merge needs --out DIR for the merged model")
    if not args.out and not args.check:
        raise UserError("nothing to do: give --out DIR (with --merge for a merged model) "
                        "and/or --check vllm")
    recipe = _run_recipe(Path(args.run)) if args.run else None
    config, _ = read_adapter(src, strict=True)  # a malformed adapter_config.json: one message
    base = _base_dir(args, config)
    if args.out:
        _refuse_own_inputs(args.out, args, src, base)
    if args.check == "vllm":
        print("\n".join(check_vllm_contract(src, _local(base), max_lora_rank=args.max_lora_rank)))
    if args.out and not args.merge:
        _reexport(src, args.out, _export_dtype(args, recipe), base, args.overwrite)
    if args.merge:
        merge_adapter_dir(src, args.out, base=base, recipe=recipe,
                          dtype=_export_dtype(args, recipe), overwrite=args.overwrite,
                          trust_remote_code=args.trust_remote_code)
        print(f"merged model written to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code (2 with one ``error:`` line on stderr for bad input)."""
    console.configure()
    return run_command(lambda: _command(argv))


if __name__ == "__main__":
    sys.exit(main())
