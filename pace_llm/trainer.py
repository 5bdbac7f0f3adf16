"""The training loop over a DeepSpeed engine: one optimizer step at a time, with logging,
evaluation and checkpoints on schedule. Everything it runs is built by ``train.setup``; what a
PACE step does is ``objective.step_plan``.

Observers (benchmarks, tests) append to ``on_step_start(trainer, global_batch)`` and
``on_step_end(trainer, global_batch, stats)`` instead of patching methods.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pace_llm import checkpoint as ckpt
from pace_llm import distributed as D
from pace_llm.data import Cursor, rank_micro_batches, supervised_count, supervised_index
from pace_llm.errors import UserError
from pace_llm.flat_optim import FlatAdamW
from pace_llm.noise import RowKeys
from pace_llm.objective import StepPlan, doubled, step_plan
from pace_llm.optim import apply_schedule
from pace_llm.probes import clean_grad_norm
from pace_llm.records import Window, reduce_window

if TYPE_CHECKING:
    from pace_llm.evaluate import Evaluator
    from pace_llm.tracking import Tracker
    from pace_llm.train import Run

StepHook = Callable[["Trainer", list[int]], None]
StepEndHook = Callable[["Trainer", list[int], dict[str, Any]], None]


class Trainer:
    """The loop's state (step, data cursor, bad-step counts, best metric) over a built Run."""

    def __init__(self, run: Run, evaluator: Evaluator):
        self.run = run
        self.evaluator = evaluator
        self.recipe = run.recipe
        self.engine = run.engine  # DeepSpeed's engine around the PaceObjective
        self.history = run.history
        self.world, self.rank = D.world_size(), D.rank()
        self.step = 0
        self.cursor = Cursor()
        self.bad_in_a_row = 0
        self.bad_total = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.evals_without_gain = 0
        self.early_stopped = False
        self.stop_requested = False
        self.window = Window()  # the steps since the last log line
        self._unsettled: list[tuple[int, dict[str, Any]]] = []  # steps whose skip is unread
        self.metrics_file = run.out / "metrics.jsonl"
        self.tracker: Tracker | None = None  # train.report_to's backends (rank 0)
        self.on_step_start: list[StepHook] = []
        self.on_step_end: list[StepEndHook] = []

    @property
    def max_steps(self) -> int:
        return self.run.max_steps

    def log(self, message: str) -> None:
        """A line on rank 0, never on the progress bar's line."""
        if D.is_main():
            from tqdm import tqdm

            tqdm.write(f"[pace_llm] {message}")
            sys.stdout.flush()

    def write_metrics(self, record: dict[str, Any]) -> None:
        """One record in metrics.jsonl and in every tracking backend (rank 0)."""
        if D.is_main():
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tracker is not None:
                self.tracker.log(record)

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        """Run from the current step to max_steps; evaluate, checkpoint and log on schedule."""
        from tqdm import tqdm

        self._install_signal_handlers()
        if self.step == 0 and self.recipe.eval.at_start:
            self.maybe_evaluate(force=True)
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not D.is_main(),
                   desc="train", dynamic_ncols=True)
        try:
            self._loop(bar)
        finally:
            bar.close()  # an error message after this starts on a line of its own

    def _loop(self, bar) -> None:
        stream = self.run.batches.batches_from(self.cursor)
        self.engine.train()  # from_pretrained returns eval mode: no noise, no dropout
        while self.step < self.max_steps:
            cursor, global_batch = next(stream)
            for hook in self.on_step_start:
                hook(self, global_batch)
            clean = self.maybe_clean_grad_norm(global_batch)
            stats = self.train_step(global_batch)
            stats["clean_grad_norm"] = clean
            stats["sources"] = self.run.batches.source_counts(global_batch)
            self.cursor = cursor
            self.step += 1
            self.window.add(stats)
            self._unsettled.append((self.step, stats))
            for hook in self.on_step_end:
                hook(self, global_batch, stats)
            bar.update(1)
            if self.step % self.recipe.train.log_every == 0 or self.step == self.max_steps:
                self._settle()  # the one host read of the window's statistics
                record = self.window.record(self.step)
                bar.set_postfix(loss=f"{record['task_loss']:.4f}", lr=f"{record['lr']:.2e}",
                                cons=f"{record['consistency_loss']:.4g}",
                                tok_s=f"{record['tokens_per_s'] or 0:.0f}")
                self.write_metrics(record)
                self.window = Window()
            self.maybe_evaluate(force=self.step == self.max_steps)
            if self.early_stopped:
                return
            self.maybe_checkpoint()
            if self._stop_agreed():
                self.save_checkpoint()
                self.log(f"stopped by signal after step {self.step}; checkpoint saved. Resume with "
                         f"the same command plus --train.resume auto")
                return
        if self.recipe.train.save_every or self.recipe.train.resume:
            if not (self.run.out / "checkpoints" / f"step-{self.step}").exists():
                self.save_checkpoint()

    def micro_batches(self, global_batch: list[int], plan: StepPlan | None = None
                      ) -> list[list[int]]:
        """This rank's micro-batches (example indices) of a global batch, cut to the plan's rows."""
        t = self.recipe.train
        micro = rank_micro_batches(global_batch, t.micro_batch_size, t.grad_accum, self.world,
                                   self.rank)
        rows = plan.rows if plan is not None else None
        return [ids[:rows] if rows else ids for ids in micro]

    def plan(self, step: int | None = None) -> StepPlan:
        """What PACE does in optimizer step ``step`` (default: the coming one, 0-based)."""
        step = self.step if step is None else step
        return step_plan(self.recipe.pace, step, self.recipe.train.micro_batch_size)

    def train_step(self, global_batch: list[int]) -> dict[str, Any]:
        """One optimizer step: this rank's micro-batches, token-normalised over the window. No
        host read on the flat optimizer path (loss sums, skip flag, grad norm: device tensors
        until a logging step, ``Window.settle``); DeepSpeed's path reads the skip flag once."""
        t, started = self.recipe.train, time.perf_counter()
        plan = self.plan()
        micro = self.micro_batches(global_batch, plan)
        batches = [self._collate(ids) for ids in micro]
        local = sum(supervised_count(b, self.run.causal) for b in batches)
        n_total, _ = D.all_reduce([float(local), 0.0])
        if n_total == 0:
            raise UserError("a training batch has no supervised tokens; check the data's labels")
        scale = self.world * t.grad_accum / n_total
        opt = self.run.optimizer
        flat = isinstance(opt, FlatAdamW)
        sums = None  # device: [ce, cons, loss] summed over the window (a non-finite loss stays so)
        for a, (idx, batch) in enumerate(zip(micro, batches)):
            out = self._forward(batch, plan, scale, idx, self.positions(a, len(idx)))
            self.engine.backward(out["loss"])  # a bad window's update is skipped below
            if flat:
                opt.accumulate()  # this micro-batch's grads into the flat fp32 gradient
            terms = torch.stack([out[k].detach().float() for k in ("ce", "cons", "loss")])
            sums = terms if sums is None else sums + terms
            if self.history is not None:
                self.history.update(idx, out["logits"][: len(idx)])
            if self.engine.is_gradient_accumulation_boundary():  # one collective per step
                totals, tokens = reduce_window(sums, self._tokens(batches), self.world)
                bad = ~torch.isfinite(totals[2])
                if flat:
                    opt.skip_if(bad)  # decided on the device
                else:
                    skipped = opt.skip_next = bool(bad)  # the DeepSpeed path's one host read
            grad_norm = None if flat else self._grad_norm_before_step()
            self.engine.step()
        if flat:
            grad_norm, skipped = opt.last_norm, opt.last_skipped
        elif grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()  # ZeRO >= 1: a tensor, read at logging
        return {"task_loss": totals[0] / n_total, "consistency": totals[1] / n_total,
                "lr": self.run.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "tokens": tokens, "time": time.perf_counter() - started, "views": plan.views,
                "paired": plan.paired, "skipped": skipped}

    def _collate(self, ids: list[int]) -> dict[str, torch.Tensor]:
        return self.run.collate(self.run.task.examples(ids))

    def positions(self, a: int, rows: int) -> tuple[int, ...]:
        """The global-batch positions of the first ``rows`` rows of this rank's a-th
        micro-batch (pace_llm/data.py's layout): the same at every world size."""
        start = (a * self.world + self.rank) * self.recipe.train.micro_batch_size
        return tuple(range(start, start + rows))

    def _forward(self, batch, plan: StepPlan, scale: float, idx: list[int],
                 positions: tuple[int, ...]):
        """One micro-batch through the engine. On the host: the doubled batch, the supervised
        positions' flat indices (causal LM), and the noise keys (seed, step, each row's position
        in the global batch: the same at every world size; pace_llm/noise.py)."""
        dev = self.engine.device
        batch = doubled(batch) if plan.views == 2 else dict(batch)
        if self.run.causal:
            batch["supervised"] = supervised_index(batch["labels"], plan.views)
        keys = RowKeys(self.recipe.train.seed, self.step, positions)
        history = self.history.lookup(idx, dev) if self.history is not None else None
        return self.engine(**{k: v.to(dev) for k, v in batch.items()}, views=plan.views,
                           lam=plan.lam, scale=scale, history=history, noise_keys=keys)

    def _tokens(self, batches) -> int:
        """Non-padding tokens this rank trained on (each example counted once)."""
        return int(sum(int(b["attention_mask"].sum()) for b in batches))

    def maybe_clean_grad_norm(self, global_batch: list[int]) -> float | None:
        """probes.clean_grad_norm on the coming step's batch every train.clean_grad_norm_every
        steps (outside the step's timing)."""
        every = self.recipe.train.clean_grad_norm_every
        if not every or (self.step + 1) % every:
            return None
        batches = [self._collate(ids) for ids in self.micro_batches(global_batch)]
        return clean_grad_norm(self.engine.module, batches, self.engine.device, self.run.causal)

    def _grad_norm_before_step(self) -> torch.Tensor | float | None:
        """ZeRO-0 keeps whole grads on the params; DeepSpeed reports the norm for ZeRO ≥ 1."""
        if self.run.zero_stage > 0 or not self.engine.is_gradient_accumulation_boundary():
            return None
        grads = [p.grad for p in self.engine.module.parameters()
                 if p.requires_grad and p.grad is not None]
        if not grads:
            return 0.0
        # one multi-tensor kernel per dtype/device group, accumulated in fp32 (bf16/fp16 grads
        # too; per-tensor norms cost 2 launches per tensor); a device tensor, read at logging
        return torch.linalg.vector_norm(torch.stack(
            torch._foreach_norm(grads, 2, dtype=torch.float32)))

    def _settle(self) -> None:
        """Read the pending steps' statistics (one host read) and count their bad steps."""
        self.window.settle()
        pending, self._unsettled = self._unsettled, []
        for step, stats in pending:
            self._count_bad(step, not stats["skipped"])

    def _count_bad(self, step: int, finite: bool) -> None:
        """Step ``step`` was applied (finite) or skipped; max_bad_steps skips in a row stop."""
        if finite:
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row += 1
        self.bad_total += 1
        self.log(f"step {step}: non-finite loss or gradient, update skipped "
                 f"({self.bad_in_a_row} in a row, {self.bad_total} in total)")
        self.write_metrics({"step": step, "skipped_step": True, "bad_in_a_row":
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
        self.log(f"eval at step {self.step}: {json.dumps(record.get('metrics', {}))}")
        metric, patience = record.get("metric"), self.recipe.eval.patience
        if metric is None or self.step == 0:
            return
        if self.best_metric is None or metric > self.best_metric:
            self.best_metric, self.best_step, self.evals_without_gain = metric, self.step, 0
            if self.recipe.eval.save_best or patience:
                self.run.export_adapter(self.run.out / "adapter-best", overwrite=True)
            return
        self.evals_without_gain += 1
        if patience and self.evals_without_gain >= patience and self.step < self.max_steps:
            self.early_stopped = True
            self.log(f"early stop at step {self.step}: the task metric has not improved in "
                     f"{patience} evaluation(s) (eval.patience); best {self.best_metric:.4g} at "
                     f"step {self.best_step}, whose adapter becomes {self.run.out / 'adapter'}")

    def maybe_checkpoint(self) -> None:
        every = self.recipe.train.save_every
        if every and self.step % every == 0 and self.step < self.max_steps:
            self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        from pace_llm.schema import recipe_to_dict

        self._settle()  # the bad-step counts of the steps so far
        cursors = D.all_gather_objects([self.cursor.epoch, self.cursor.batch])
        state = {"step": self.step, "cursor": cursors[0], "cursors": cursors,
                 "bad_in_a_row": self.bad_in_a_row, "bad_total": self.bad_total,
                 "best_metric": self.best_metric, "best_step": self.best_step,
                 "evals_without_gain": self.evals_without_gain,
                 "recipe": recipe_to_dict(self.recipe)}
        history = self.history.values if self.history is not None else None
        path = ckpt.save(self.engine, self.run.out / "checkpoints", self.step, state,
                         self.run.trainable_state(), history, self.recipe.train.keep_last,
                         extra_writer=lambda d: self.run.export_adapter(d / "adapter",
                                                                        quiet=True))
        self.log(f"checkpoint written: {path}")
        return path

    def resume(self, path: Path) -> None:
        """Continue from a verified checkpoint: refuse recipe changes it cannot continue under,
        apply optimizer and schedule changes for real, and drop the log past its step."""
        from pace_llm.schema import recipe_to_dict

        saved = ckpt.read_state(path).get("recipe")
        if saved is None:
            raise UserError(f"checkpoint {path} records no recipe (written by an older "
                            "pace_llm); it cannot be checked against this one: start a new run")
        refused, applied = ckpt.recipe_changes(saved, recipe_to_dict(self.recipe))
        if refused:
            raise UserError(f"train.resume: checkpoint {path} was trained with other settings "
                            "that change shapes, data or what a step is; nothing was changed. "
                            "Resume with the checkpoint's values or start a new run (another "
                            "train.output_dir or --train.overwrite true):\n"
                            + "\n".join(f"  - {c}" for c in refused))
        state, history, trainable = ckpt.load(self.engine, path)
        current = self.run.trainable_state()
        missing = sorted(set(trainable) ^ set(current))
        if missing:
            raise UserError(f"checkpoint {path} does not match this model's trainable params: "
                            f"{missing[:5]}")
        for name, value in trainable.items():
            if not torch.equal(current[name], value):
                raise UserError(f"checkpoint {path}: DeepSpeed restored {name} differently from "
                                "trainable.safetensors; the checkpoint is inconsistent")
        self.step = state["step"]
        self.cursor = self._resumed_cursor(state)
        self.bad_in_a_row, self.bad_total = state["bad_in_a_row"], state["bad_total"]
        self.best_metric, self.best_step = state.get("best_metric"), state.get("best_step")
        self.evals_without_gain = state.get("evals_without_gain", 0)
        if history is not None:
            self.history.values = history
        if applied:
            apply_schedule(self.run.optimizer, self.run.scheduler, self.recipe.train,
                           self.max_steps)
            self.log(f"resume: applied {'; '.join(applied)} (optimizer param groups and "
                     "schedule updated)")
        self._drop_metrics_after(self.step)
        self.log(f"resumed from {path} at step {self.step}")

    def _resumed_cursor(self, state: dict[str, Any]) -> Cursor:
        """The data cursor to go on from: the run's, or (streaming) this rank's own place in
        the stream (a checkpoint resumes with its own number of ranks: checked at load)."""
        if self.run.task.streaming:
            return Cursor(*state["cursors"][self.rank])
        return Cursor(*state["cursor"])

    def _drop_metrics_after(self, step: int) -> None:
        """metrics.jsonl keeps each step once: records past the resumed step are redone."""
        if not D.is_main() or not self.metrics_file.is_file():
            return
        kept = [line for line in self.metrics_file.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        ckpt.atomic_write(self.metrics_file, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_requested:  # the second request: stop now
                print(f"\n[pace_llm] {name} again: stopping now, without a checkpoint",
                      file=sys.stderr, flush=True)
                os._exit(128 + signum)
            self.stop_requested = True
            if D.is_main():
                print(f"\n[pace_llm] {name}: stop requested. The current step finishes, a "
                      "checkpoint is saved and the run exits (continue it with --train.resume "
                      "auto); send it again to stop at once without a checkpoint",
                      file=sys.stderr, flush=True)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _stop_agreed(self) -> bool:
        return D.all_reduce([1.0 if self.stop_requested else 0.0], op="max")[0] > 0
