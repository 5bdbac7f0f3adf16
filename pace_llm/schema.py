"""The recipe schema: one typed dataclass per recipe section, each field's docstring its
``--help`` text. A recipe YAML has one section per dataclass (``model``, ``lora``, ``pace``,
``quant``, ``data``, ``train``, ``eval``, ``export``) plus a top-level ``deepspeed`` path.

The bottom of the package: it imports nothing of pace_llm. Parsing is pace_llm/config.py's,
whole-recipe validation pace_llm/checks.py's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

Kind = Literal["causal_lm", "seq_cls"]

TASKS: dict[str, Kind] = {"gsm8k": "causal_lm", "glue": "seq_cls", "instruct": "causal_lm",
                          "synthetic": "causal_lm"}
"""The allowed ``data.task`` names -> the kind of model each trains. Each name is a task module
of pace_llm/tasks (tests/test_config.py checks that the two agree)."""


@dataclass
class ModelArgs:
    name_or_path: str = ""
    """Hub id (e.g. microsoft/Phi-3-mini-4k-instruct) or local directory of the base model."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the frozen base weights are loaded in; auto = the training precision."""
    trust_remote_code: bool = False
    """Allow the model repository's own Python code to run (only if you trust it)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the base model."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant); the PACE noise is reproduced."""
    attn_implementation: str | None = None
    """transformers attention backend (eager, sdpa, flash_attention_2); None = its default."""
    build: dict[str, Any] | None = None
    """Offline base: a transformers config dict (model_type plus sizes). A random-init model is
    built from it, with a sentencepiece tokenizer trained on the task's text, and saved under
    <output_dir>/base_model; name_or_path is then that directory."""


@dataclass
class LoraArgs:
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha; the adapter is scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter input; one mask per sample, shared by both PACE views."""
    targets: str | list[str] = "attn+mlp"
    """Preset (attn, mlp, attn+mlp, all-linear) or a list of module-name suffixes."""
    rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r)."""


@dataclass
class PaceArgs:
    mode: Literal["off", "full", "lazy", "fast"] = "full"
    """off = plain LoRA; full = doubled batch every step; lazy = every lazy_interval steps;
    fast = consistency against last epoch's stored outputs (classification only)."""
    sigma: float = 1.0
    """Std of the multiplicative noise z ~ N(1, sigma^2) on the adapter output (block 0's)."""
    consistency_weight: float = 0.05
    """lambda: weight of the consistency loss between the two noisy views."""
    sigma_schedule: Literal["linear_decay", "constant"] = "linear_decay"
    """Per-block sigma: linear_decay gives block l sigma*(L-l)/L; constant gives sigma."""
    skip_first_blocks: int = 0
    """sigma = 0 for the first k blocks."""
    lazy_interval: int = 2
    """In lazy mode, run the consistency step every N-th optimizer step."""
    task_loss_on: Literal["first", "both"] = "first"
    """Task loss on view 1 only (paper) or the mean over both views."""
    consistency_on: Literal["logits", "hidden"] = "logits"
    """Causal LM: consistency over supervised next-token logits or final hidden states."""


@dataclass
class QuantArgs:
    bits: Literal["none", 4, 8] = "none"
    """Quantize the frozen base: none, 4 (QLoRA, bitsandbytes) or 8."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the 4-bit quantization constants too."""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the 4-bit matmuls; auto = the training precision."""
    storage_dtype: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = "auto"
    """Storage dtype of packed 4-bit weights; auto = uint8, or the compute dtype under ZeRO-3."""


@dataclass
class DataArgs:
    task: Literal[tuple(TASKS)] = "synthetic"  # type: ignore[valid-type]
    """Task family; decides the model head, the losses and the metric."""
    path: str = ""
    """Hub dataset id or local file/directory (jsonl, json, parquet, GLUE tsv)."""
    eval_path: str | None = None
    """Evaluation split (hub split name or local file); None = the task's default."""
    max_length: int = 1024
    """Maximum tokens per example (prompt + target)."""
    on_too_long: Literal["truncate", "drop", "error"] = "drop"
    """What to do with an example longer than max_length."""
    prompt_style: Literal["plain", "chat"] = "plain"
    """plain = the task's prompt text; chat = rendered with a chat template (data.chat_template)."""
    chat_template: str | None = None
    """Chat template for prompt_style chat: None = the tokenizer's own; a built-in name (chatml,
    llama-3, mistral, phi-3, gemma, qwen); or a path to a Jinja file."""
    glue_task: str | None = None
    """GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte) when task = glue."""
    num_examples: int = 2000
    """Synthetic task: number of generated training problems."""
    limit: int | None = None
    """Use only the first N training rows (None = all)."""
    holdout: float = 0.05
    """Instruct data without an evaluation split (no data.eval_path, no test/validation file
    beside the data): the fraction of the training rows, the last ones, held out for
    evaluation (at least 1 row, at most 200)."""
    hub_config: str | None = None
    """Hub dataset config name; None = the task's default (gsm8k: main; glue: data.glue_task)."""
    seed: int = 0
    """Synthetic task: seed of the problem generator (training and eval problems)."""
    num_proc: int | None = None
    """Processes that tokenize the data (once, on rank 0); None = min(8, CPU count)."""
    cache_dir: str | None = None
    """Where tokenized datasets are cached; None = $PACE_LLM_CACHE or ~/.cache/pace_llm."""
    columns: dict[str, str] | None = None
    """Rename the data's fields to the task's: {task_field: field_in_your_data}, e.g.
    {question: prompt, answer: response} (gsm8k) or {instruction: query, output: reply}."""
    streaming: bool = False
    """Read and tokenize the training rows as they are consumed (no cache, nothing held): for
    corpora larger than memory. Needs train.max_steps; each rank tokenizes its own share."""
    shuffle_buffer: int = 10000
    """Streaming: rows in the shuffle buffer (a seeded random slot is emitted and refilled from
    the file; a new order each epoch); 1 = file order."""
    mix: list[dict[str, Any]] | None = None
    """A mixture of sources instead of data.path: a list of {path, weight, name, task,
    eval_path, hub_config, prompt_style, chat_template, limit, glue_task, columns}; each
    position of a global batch draws its source by weight. The first source is the eval set
    that ranks checkpoints; the others are scored under extra.<name>. The other data keys
    (task, max_length, prompt_style…) apply to every source that does not set its own."""
    pad_to_multiple_of: int | None = None
    """Pad each batch to a multiple of this many tokens (stable shapes for GPU kernels);
    1 = to the longest row; None = 8 on a GPU, 1 on a CPU (where padding is only extra work)."""


@dataclass
class TrainArgs:
    output_dir: str = "runs/default"
    """Directory for the resolved recipe, metrics, checkpoints and the adapter."""
    max_steps: int = 0
    """Optimizer steps to run; 0 = derive from epochs."""
    epochs: float = 1.0
    """Passes over the training data (used when max_steps = 0)."""
    micro_batch_size: int = 4
    """Examples per rank per forward (before PACE doubling)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate of the adapter params."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Global gradient clipping norm (0 = off)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto = bf16 on a GPU that supports it, else fp32. fp16 needs a GPU."""
    seed: int = 42
    """Seed for data order, init and the PACE noise."""
    log_every: int = 10
    """Log to metrics.jsonl every N optimizer steps."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=list)
    """Also send every metrics.jsonl record to these trackers (rank 0); each is an extra:
    pip install 'pace-llm[tensorboard]' (or wandb, mlflow, track for all three)."""
    clean_grad_norm_every: int = 0
    """Every N steps also log clean_grad_norm: the task-loss gradient norm at the un-noised
    weights (PACE's theory says PACE lowers it). One extra forward/backward; 0 = never."""
    save_every: int = 0
    """Write checkpoints/step-N every N optimizer steps (0 = no periodic checkpoints). A stop by
    SIGTERM/Ctrl-C always writes one; with save_every > 0 or a resumed run, the last step too."""
    keep_last: int = 2
    """Checkpoints to keep."""
    resume: str | None = None
    """auto = newest complete checkpoint in output_dir; or a checkpoint path."""
    overwrite: bool = False
    """Replace the run in output_dir with a new one (only a pace_llm run, holding none of this
    run's inputs; not with resume)."""
    accept_data_change: bool = False
    """Resume although the training data changed since the checkpoint (a file edited, cut or
    reordered; another tokenizer): training goes on with the data as they are now."""
    max_bad_steps: int = 5
    """Stop after this many consecutive non-finite losses (each such step is skipped; counted
    when the trainer reads its statistics: at logging steps and checkpoints)."""
    optimizer_path: Literal["auto", "flat", "deepspeed"] = "auto"
    """auto = flat at ZeRO-0/1/2 in bf16/fp32 without CPU offload, else DeepSpeed's. flat: one
    fp32 master of the adapter (sharded across ranks at ZeRO-1/2), fused AdamW, skip and clip on
    the device (pace_llm/flat_optim.py); deepspeed: DeepSpeed's optimizer wrappers (always at
    ZeRO-3, fp16 and CPU offload)."""


@dataclass
class EvalArgs:
    every: int = 0
    """Evaluate every N optimizer steps (0 = only before and after training)."""
    limit: int | None = 200
    """Evaluate on the first N examples (None = all)."""
    batch_size: int = 8
    """Examples per rank per generation batch."""
    max_new_tokens: int = 256
    """Generation budget per example."""
    save_best: bool = False
    """Keep the adapter with the best eval metric in <output_dir>/adapter-best."""
    at_start: bool = True
    """Evaluate once before the first step (the base model's figures)."""
    patience: int = 0
    """Early stopping: stop after this many evaluations (eval.every) without a better task
    metric; the best adapter becomes adapter/ (0 = off). Without save_best the best adapter is
    kept meanwhile in the hidden <output_dir>/.adapter-best (removed if the run does not stop
    early); an early stop is recorded in metrics.jsonl."""


@dataclass
class ExportArgs:
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the exported adapter tensors; auto = the training precision."""
    merge: bool = False
    """Also write a merged HF model (adapters folded into the base)."""


@dataclass
class Recipe:
    model: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    pace: PaceArgs = field(default_factory=PaceArgs)
    quant: QuantArgs = field(default_factory=QuantArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    export: ExportArgs = field(default_factory=ExportArgs)
    deepspeed: str | None = None
    """Path to a DeepSpeed JSON (ds_configs/zeroN.json); "auto" values are filled from the recipe."""

    @property
    def is_causal_lm(self) -> bool:
        return TASKS[self.data.task] == "causal_lm"


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Recipe) if f.name != "deepspeed"}
SECTIONS = {name: globals()[t] if isinstance(t, str) else t for name, t in SECTIONS.items()}


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (what --print_config prints and runs save); itself a
    valid recipe."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
