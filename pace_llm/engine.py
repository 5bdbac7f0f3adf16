"""The training loop over ``deepspeed.initialize``: PACE modes, token-normalised losses, logging,
evaluation and checkpoints. One class holds the run's state; its loop calls named steps.

Per optimizer step (PACE.md §3–4):
    full  every micro-batch is doubled ([x, x], one forward over 2B rows): task + λ·consistency
    lazy  every lazy_interval-th step: the first half of each micro-batch doubled (B rows),
          task + λ·consistency; other steps: plain task loss, noise on
    fast  one view; consistency against last epoch's stored outputs of the same examples
    off   plain LoRA
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pace_llm import checkpoint as ckpt
from pace_llm import distributed as D
from pace_llm.config import Recipe
from pace_llm.consistency import PaceObjective
from pace_llm.data import (BatchPlan, Cursor, collate_causal, collate_cls, doubled,
                           rank_micro_batches, supervised_count)
from pace_llm.dsconfig import offloads_optimizer, zero_stage
from pace_llm.errors import UserError
from pace_llm.inject import adapter_parameters
from pace_llm.lora import noise_free


class SkipNextStep:
    """Optimizer mixin: the next ``step()`` can be skipped (a non-finite loss), whatever ZeRO
    wrapper calls it."""

    skip_next = False

    def step(self, *args, **kwargs):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(*args, **kwargs)


class GuardedAdamW(SkipNextStep, torch.optim.AdamW):
    """torch AdamW with SkipNextStep."""


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak lr at optimizer step s: linear warmup, then cosine/linear/constant."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


class Trainer:
    """Owns the DeepSpeed engine, the data stream and the run directory."""

    def __init__(self, recipe: Recipe, model: nn.Module, task: Any, tokenizer: Any,
                 ds_config: dict[str, Any], output_dir: Path, precision: str, base_model: str):
        import deepspeed

        self.recipe, self.task, self.tokenizer = recipe, task, tokenizer
        self.base_model = base_model
        self.model = model
        self.output_dir = output_dir
        self.precision = precision
        self.causal = task.kind == "causal_lm"
        self.pace = recipe.pace
        t = recipe.train
        self.world, self.rank = D.world_size(), D.rank()
        self.global_batch = t.micro_batch_size * t.grad_accum * self.world
        self.plan = BatchPlan([len(e["input_ids"]) for e in task.train], self.global_batch, t.seed)
        self.max_steps = t.max_steps or max(1, int(t.epochs * self.plan.steps_per_epoch))
        self.objective = PaceObjective(model, self.causal, recipe.pace.consistency_on,
                                       recipe.pace.task_loss_on, regression=task.num_labels == 1)
        params = adapter_parameters(model)
        self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        optimizer = self._optimizer(params, ds_config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(t.schedule, t.warmup_steps, self.max_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.objective, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.guard = optimizer
        self.zero_stage = zero_stage(ds_config)
        self.step = 0
        self.cursor = Cursor()
        self.bad_in_a_row = 0
        self.bad_total = 0
        self.history = self._new_history() if self.pace.mode == "fast" else None
        self.stop_requested = False
        self.metrics_file = output_dir / "metrics.jsonl"
        self.best_metric: float | None = None

    # ------------------------------------------------------------------ setup helpers
    def _optimizer(self, params, ds_config) -> torch.optim.Optimizer:
        t = self.recipe.train
        if offloads_optimizer(ds_config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            guarded = type("GuardedCPUAdam", (SkipNextStep, DeepSpeedCPUAdam), {})
            return guarded(params, lr=t.lr, weight_decay=t.weight_decay, adamw_mode=True)
        return GuardedAdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    def _new_history(self) -> torch.Tensor:
        n = len(self.task.train)
        return torch.full((n, self.task.num_labels or 1), float("nan"))

    @property
    def hf_model(self) -> nn.Module:
        return self.engine.module.model

    def log(self, message: str) -> None:
        if D.is_main():
            print(f"[pace_llm] {message}", flush=True)

    def write_metrics(self, record: dict[str, Any]) -> None:
        if D.is_main():
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        """Run from the current step to max_steps; evaluate, checkpoint and log on schedule."""
        from tqdm import tqdm

        from pace_llm.evaluate import Evaluator

        self.evaluator = Evaluator(self)
        self._install_signal_handlers()
        if self.step == 0:
            self.maybe_evaluate(force=True)
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not D.is_main(),
                   desc="train", dynamic_ncols=True)
        stream = self.plan.batches_from(self.cursor)
        window = _Window()
        self.engine.train()  # from_pretrained returns eval mode: no noise, no dropout
        while self.step < self.max_steps:
            cursor, global_batch = next(stream)
            clean = self.maybe_clean_grad_norm(global_batch)
            stats = self.train_step(global_batch)
            stats["clean_grad_norm"] = clean
            self.cursor = cursor
            self.step += 1
            window.add(stats)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['task_loss']:.4f}", cons=f"{stats['consistency']:.4g}",
                            lr=f"{stats['lr']:.2e}", tok_s=f"{stats['tokens'] / stats['time']:.0f}")
            if self.step % self.recipe.train.log_every == 0 or self.step == self.max_steps:
                self.write_metrics(window.record(self.step, self.max_steps, bar))
                window = _Window()
            self.maybe_evaluate(force=self.step == self.max_steps)
            self.maybe_checkpoint()
            if self._stop_agreed():
                self.save_checkpoint()
                bar.close()
                self.log(f"stopped by signal after step {self.step}; checkpoint saved. Resume with "
                         f"the same command plus --train.resume auto")
                return
        bar.close()
        if self.recipe.train.save_every or self.recipe.train.resume:
            if not (self.output_dir / "checkpoints" / f"step-{self.step}").exists():
                self.save_checkpoint()

    def train_step(self, global_batch: list[int]) -> dict[str, float]:
        """One optimizer step: this rank's micro-batches, token-normalised over the window."""
        t, started = self.recipe.train, time.perf_counter()
        micro = rank_micro_batches(global_batch, t.micro_batch_size, t.grad_accum, self.world,
                                   self.rank)
        views, rows = self._views_for_step()
        batches = [self._collate(ids[:rows] if rows else ids) for ids in micro]
        local = sum(supervised_count(b, self.causal) for b in batches)
        n_total, _ = D.all_reduce([float(local), 0.0])
        if n_total == 0:
            raise UserError("a training batch has no supervised tokens; check the data's labels")
        scale = self.world * t.grad_accum / n_total
        lam = self.pace.consistency_weight if views == 2 or self.history is not None else 0.0
        ce_sum = cons_sum = 0.0
        local_finite = True
        for ids, batch in zip(micro, batches):
            idx = ids[:rows] if rows else ids
            out = self._forward(batch, views, lam, scale, idx)
            self.engine.backward(out["loss"])  # a bad window's update is skipped below
            # one host sync per micro-batch, after backward has been queued (on a GPU a sync
            # between forward and backward would idle the device while the host launches)
            finite, ce, cons = torch.stack([torch.isfinite(out["loss"]).float(),
                                            out["ce"].detach().float(),
                                            out["cons"].detach().float()]).tolist()
            local_finite &= finite == 1.0
            ce_sum, cons_sum = ce_sum + ce, cons_sum + cons
            if self.history is not None:
                self._update_history(idx, out["logits"][: len(idx)])
            if self.engine.is_gradient_accumulation_boundary():  # one collective per step
                losses_finite = D.all_reduce([0.0 if local_finite else 1.0], op="max")[0] == 0.0
                self.guard.skip_next = not losses_finite
            grad_norm = self._grad_norm_before_step()
            self.engine.step()
        ce_tot, cons_tot, tokens = D.all_reduce([ce_sum, cons_sum, float(self._tokens(batches))])
        self._count_bad(losses_finite)
        grad_norm = grad_norm if grad_norm is not None else self.engine.get_global_grad_norm()
        return {"task_loss": ce_tot / n_total, "consistency": cons_tot / n_total,
                "lr": self.scheduler.get_last_lr()[0], "grad_norm": _float(grad_norm),
                "tokens": tokens, "time": time.perf_counter() - started,
                "paired": views == 2 or self.history is not None, "skipped": not losses_finite}

    def _views_for_step(self) -> tuple[int, int | None]:
        """(views, rows per micro-batch to use; None = all) for the coming step."""
        mode = self.pace.mode
        if mode == "full":
            return 2, None
        if mode == "lazy" and (self.step + 1) % self.pace.lazy_interval == 0:
            return 2, max(1, self.recipe.train.micro_batch_size // 2)
        return 1, None

    def _collate(self, ids: list[int]) -> dict[str, torch.Tensor]:
        return self.collate([self.task.train[i] for i in ids])

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """A training batch (padding, labels) of these examples."""
        pad = self.tokenizer.pad_token_id
        if self.causal:
            return collate_causal(examples, pad)
        return collate_cls(examples, pad, regression=self.task.num_labels == 1)

    def _forward(self, batch, views: int, lam: float, scale: float, idx: list[int]):
        dev = self.engine.device
        if views == 2:
            batch = doubled(batch)
        history = self.history[idx].to(dev) if self.history is not None else None
        return self.engine(**{k: v.to(dev) for k, v in batch.items()}, views=views, lam=lam,
                           scale=scale, history=history)

    def _tokens(self, batches) -> int:
        """Non-padding tokens this rank trained on (each example counted once)."""
        return int(sum(int(b["attention_mask"].sum()) for b in batches))

    def _update_history(self, idx: list[int], logits: torch.Tensor) -> None:
        """fast mode: every rank stores every rank's outputs, so the buffer stays identical."""
        for ids, values in D.all_gather_objects((idx, logits.float().cpu())):
            self.history[torch.tensor(ids)] = values

    def maybe_clean_grad_norm(self, global_batch: list[int]) -> float | None:
        """clean_grad_norm on the coming step's batch every train.clean_grad_norm_every steps
        (outside the step's timing)."""
        every = self.recipe.train.clean_grad_norm_every
        if not every or (self.step + 1) % every:
            return None
        t = self.recipe.train
        micro = rank_micro_batches(global_batch, t.micro_batch_size, t.grad_accum, self.world,
                                   self.rank)
        return self.clean_grad_norm([self._collate(ids) for ids in micro])

    def clean_grad_norm(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """‖∇_adapter L_task‖₂ at the current weights without noise or dropout — Thm 1's
        ‖∇θL‖ in PACE's theory — over this step's micro-batches on every rank (token
        mean, as training). Costs one extra forward/backward. The gradients come from
        torch.autograd.grad, so nothing reaches DeepSpeed's buffers."""
        module = self.engine.module
        params = adapter_parameters(module)
        n_total = D.all_reduce([float(sum(supervised_count(b, self.causal) for b in batches))])[0]
        with noise_free(module):
            total = [torch.zeros(tuple(getattr(p, "ds_shape", p.shape))) for p in params]
            for batch in batches:
                out = module(**{k: v.to(self.engine.device) for k, v in batch.items()}, views=1)
                grads = torch.autograd.grad(out["loss"] / n_total, params, allow_unused=True)
                for acc, g in zip(total, grads):
                    if g is not None:
                        acc += g.float()
        flat = torch.cat([g.flatten() for g in total])
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(flat)
        return float(flat.norm())

    def _grad_norm_before_step(self) -> float | None:
        """ZeRO-0 keeps whole grads on the params; DeepSpeed reports the norm for ZeRO ≥ 1."""
        if self.zero_stage > 0 or not self.engine.is_gradient_accumulation_boundary():
            return None
        grads = [p.grad for p in self.engine.module.parameters()
                 if p.requires_grad and p.grad is not None]
        if not grads:
            return 0.0
        # one multi-tensor kernel per dtype/device group, accumulated in fp32 (bf16/fp16 grads
        # too): per-tensor norms cost two launches per adapter tensor, which is host time on GPU
        return float(torch.linalg.vector_norm(torch.stack(
            torch._foreach_norm(grads, 2, dtype=torch.float32))))

    def _count_bad(self, finite: bool) -> None:
        if finite:
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row += 1
        self.bad_total += 1
        self.log(f"step {self.step + 1}: non-finite loss, update skipped "
                 f"({self.bad_in_a_row} in a row, {self.bad_total} in total)")
        self.write_metrics({"step": self.step + 1, "skipped_step": True, "bad_in_a_row":
                            self.bad_in_a_row})
        if self.bad_in_a_row >= self.recipe.train.max_bad_steps:
            raise UserError(f"{self.bad_in_a_row} consecutive steps had a NaN/inf loss "
                            f"(train.max_bad_steps = {self.recipe.train.max_bad_steps}); lower "
                            "train.lr or pace.consistency_weight, or check the data")

    # ------------------------------------------------------------------ eval and checkpoints
    def maybe_evaluate(self, force: bool = False) -> None:
        every = self.recipe.eval.every
        if not force and not (every and self.step % every == 0):
            return
        record = self.evaluator.run()
        self.write_metrics({"step": self.step, "eval": record})
        metric = record.get("metric")
        self.log(f"eval at step {self.step}: {json.dumps(record.get('metrics', {}))}")
        if self.recipe.eval.save_best and metric is not None and self.step > 0:
            if self.best_metric is None or metric > self.best_metric:
                self.best_metric = metric
                self.export_adapter(self.output_dir / "adapter-best", overwrite=True)

    def maybe_checkpoint(self) -> None:
        every = self.recipe.train.save_every
        if every and self.step % every == 0 and self.step < self.max_steps:
            self.save_checkpoint()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, whole (gathered under ZeRO-3), on CPU."""
        named = [(n, p) for n, p in self.hf_model.named_parameters() if p.requires_grad]
        from pace_llm.export import gathered

        with gathered([p for _, p in named]):
            return {n: p.detach().float().cpu().clone() for n, p in named}

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "cursor": [self.cursor.epoch, self.cursor.batch],
                 "bad_in_a_row": self.bad_in_a_row, "bad_total": self.bad_total,
                 "best_metric": self.best_metric}
        path = ckpt.save(self.engine, self.output_dir / "checkpoints", self.step, state,
                         self.trainable_state(), self.history, self.recipe.train.keep_last,
                         extra_writer=lambda d: self.export_adapter(d / "adapter", quiet=True))
        self.log(f"checkpoint written: {path}")
        return path

    def resume(self, path: Path) -> None:
        state, history, trainable = ckpt.load(self.engine, path)
        current = self.trainable_state()
        missing = sorted(set(trainable) ^ set(current))
        if missing:
            raise UserError(f"checkpoint {path} does not match this model's trainable params: "
                            f"{missing[:5]}")
        for name, value in trainable.items():
            if not torch.equal(current[name], value):
                raise UserError(f"checkpoint {path}: DeepSpeed restored {name} differently from "
                                "trainable.safetensors; the checkpoint is inconsistent")
        self.step = state["step"]
        self.cursor = Cursor(*state["cursor"])
        self.bad_in_a_row, self.bad_total = state["bad_in_a_row"], state["bad_total"]
        self.best_metric = state.get("best_metric")
        if history is not None:
            self.history = history
        self.log(f"resumed from {path} at step {self.step}")

    def export_adapter(self, out_dir: Path, overwrite: bool = False, quiet: bool = False) -> None:
        """The PEFT-format adapter of the current weights (every rank calls; rank 0 writes)."""
        from pace_llm.config import recipe_to_dict
        from pace_llm.export import export_adapter
        from pace_llm.model import DTYPES, classifier_head

        dtype = self.recipe.export.dtype
        export_adapter(self.hf_model, out_dir, base_model_name_or_path=self.base_model,
                       task_type="CAUSAL_LM" if self.causal else "SEQ_CLS",
                       dtype=DTYPES[self.precision if dtype == "auto" else dtype],
                       head_modules=[] if self.causal else classifier_head(self.hf_model),
                       pace_info=recipe_to_dict(self.recipe), overwrite=overwrite)
        if not quiet:
            self.log(f"adapter written: {out_dir}")

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.stop_requested = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _stop_agreed(self) -> bool:
        return D.all_reduce([1.0 if self.stop_requested else 0.0], op="max")[0] > 0


class _Window:
    """Accumulates step stats between two log lines."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def add(self, stats: dict[str, float]) -> None:
        self.steps.append(stats)

    def record(self, step: int, max_steps: int, bar) -> dict[str, Any]:
        n = len(self.steps)
        mean = lambda k: sum(s[k] for s in self.steps) / n  # noqa: E731
        paired = [s for s in self.steps if s["paired"]]
        task = mean("task_loss")
        cons = sum(s["consistency"] for s in paired) / len(paired) if paired else 0.0
        elapsed = sum(s["time"] for s in self.steps)
        tokens = sum(s["tokens"] for s in self.steps)
        peak = _peak_memory_mb()
        return {"step": step, "task_loss": task, "consistency_loss": cons,
                "loss_ratio": cons / task if task else None, "grad_norm": mean("grad_norm"),
                "clean_grad_norm": next((s["clean_grad_norm"] for s in reversed(self.steps)
                                         if s["clean_grad_norm"] is not None), None),
                "lr": self.steps[-1]["lr"], "tokens_per_s": tokens / elapsed if elapsed else None,
                "step_time_s": elapsed / n, "peak_memory_mb": peak,
                "skipped_steps": sum(1 for s in self.steps if s["skipped"])}


def _float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if hasattr(x, "item") else x)


def _peak_memory_mb() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
