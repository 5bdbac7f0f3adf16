"""The training loop: one optimizer step at a time, with logging, evaluation and checkpoints on
schedule. Everything it runs is built by pace_llm/setup.py; what a PACE step does is
``objective.step_plan``; the engine behind ``stepper`` is pace_llm/stepper.py's seam (the loop
never names one); saving and resuming are pace_llm/resume.py's; what the run leaves
(adapter, early stopping's best) is pace_llm/results.py's.

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
from typing import Any

import torch
from tqdm import tqdm

from pace_llm import distributed as D
from pace_llm import resume as R
from pace_llm.atomic import as_fault
from pace_llm.data.batches import Cursor, micro_batch_slice, rank_micro_batches
from pace_llm.data.collate import supervised_count, supervised_index
from pace_llm.errors import UserError
from pace_llm.evaluate import Evaluator
from pace_llm.noise import RowKeys
from pace_llm.objective import StepPlan, doubled, step_plan
from pace_llm.probes import clean_grad_norm
from pace_llm.records import Window
from pace_llm.results import EarlyStopping, write_adapter
from pace_llm.run import Run
from pace_llm.tracking import Tracker

StepHook = Callable[["Trainer", list[int]], None]
StepEndHook = Callable[["Trainer", list[int], dict[str, Any]], None]


class Trainer:
    """The loop's state (step, data cursor, bad-step counts, early stopping) over a built Run."""

    def __init__(self, run: Run, evaluator: Evaluator, tracker: Tracker | None = None):
        self.run = run
        self.evaluator = evaluator
        self.tracker = tracker  # train.report_to's backends (rank 0)
        self.recipe = run.recipe
        self.stepper = run.stepper
        self.history = run.history
        self.world, self.rank = D.world_size(), D.rank()
        self.step = 0
        self.cursor = Cursor()
        self.bad_in_a_row = 0
        self.bad_total = 0
        self.stopping = EarlyStopping(self.recipe.eval.patience, self.recipe.eval.save_best)
        self.stop_requested = False
        self.window = Window()  # the steps since the last log line
        self._unsettled: list[tuple[int, dict[str, Any]]] = []  # steps whose skip is unread
        self.metrics_file = run.out / "metrics.jsonl"
        self._metrics_lost: int | None = None  # the first step whose record the disk refused
        self.on_step_start: list[StepHook] = []
        self.on_step_end: list[StepEndHook] = []

    @property
    def max_steps(self) -> int:
        return self.run.max_steps

    @property
    def finished(self) -> bool:
        """The run reached its last step or stopped early: its results are due."""
        return self.step >= self.max_steps or self.stopping.stopped

    def log(self, message: str) -> None:
        """A line on rank 0, never on the progress bar's line."""
        if D.is_main():
            tqdm.write(f"[pace_llm] {message}")
            sys.stdout.flush()

    def write_metrics(self, record: dict[str, Any]) -> None:
        """One record in metrics.jsonl and in every tracking backend (rank 0). A disk that
        refuses the record is one warning, with the step from which records are missing, and
        training goes on (the adapter is what a run must not lose)."""
        if not D.is_main():
            return
        try:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            fault = as_fault(exc, "metrics", self.metrics_file)
            if fault is None:
                raise
            if self._metrics_lost is None:
                self._metrics_lost = record.get("step", self.step)
                self.log(f"warning: {fault}; training goes on, and metrics.jsonl misses the "
                         f"records from step {self._metrics_lost} on")
        if self.tracker is not None:
            self.tracker.log(record)

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        """Run from the current step to max_steps; evaluate, checkpoint and log on schedule."""
        self._install_signal_handlers()
        if self.step == 0 and self.recipe.eval.at_start:
            self.maybe_evaluate(force=True)
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not D.is_main(),
                   desc="train", dynamic_ncols=True)
        try:
            self._loop(bar)
        finally:
            bar.close()  # an error message after this starts on a line of its own

    def _loop(self, bar: tqdm) -> None:
        stream = self.run.batches.batches_from(self.cursor)
        self.stepper.train()  # from_pretrained returns eval mode: no noise, no dropout
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
                self._log_window(bar)
            self.maybe_evaluate(force=self.step == self.max_steps)
            if self.stopping.stopped:
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

    def _log_window(self, bar: tqdm) -> None:
        """The window's record: one host read of its statistics, then metrics.jsonl."""
        self.settle()
        record = self.window.record(self.step)
        bar.set_postfix(loss=f"{record['task_loss']:.4f}", lr=f"{record['lr']:.2e}",
                        cons=f"{record['consistency_loss']:.4g}",
                        tok_s=f"{record['tokens_per_s'] or 0:.0f}")
        self.write_metrics(record)
        self.window = Window()

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
        """One optimizer step: this rank's micro-batches, token-normalised over the step. The
        loss sums, the skip flag and the gradient norm stay device values until a logging step
        (``settle``); a step whose loss is not finite is not applied.

        Loss scale: the engine averages gradients over the step's micro-batches and the ranks,
        so each micro-batch's summed loss is multiplied by world·grad_accum / N, N the step's
        supervised tokens (causal LM) or examples over every rank: the step's gradient is the
        gradient of the token mean."""
        t, started = self.recipe.train, time.perf_counter()
        plan = self.plan()
        micro = self.micro_batches(global_batch, plan)
        batches = [self._collate(ids) for ids in micro]
        local = sum(supervised_count(b, self.run.causal) for b in batches)
        n_total, _ = D.all_reduce([float(local), 0.0])
        if n_total == 0:
            raise UserError("a training batch has no supervised tokens; check the data's labels")
        scale = self.world * t.grad_accum / n_total
        sums = None  # device: [ce, cons, loss] summed over the step (a non-finite loss stays so)
        for a, (idx, batch) in enumerate(zip(micro, batches)):
            out = self._forward(batch, plan, scale, idx, self.positions(a, len(idx)))
            self.stepper.backward(out["loss"])
            terms = torch.stack([out[k].detach().float() for k in ("ce", "cons", "loss")])
            sums = terms if sums is None else sums + terms
            if self.history is not None:
                self.history.update(idx, out["logits"][: len(idx)])
        totals, tokens = _reduce_step(sums, self._tokens(batches), self.world)
        grad_norm, skipped = self.stepper.step(~torch.isfinite(totals[2]))
        return {"task_loss": totals[0] / n_total, "consistency": totals[1] / n_total,
                "lr": self.stepper.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "tokens": tokens, "time": time.perf_counter() - started, "views": plan.views,
                "paired": plan.paired, "skipped": skipped}

    def _collate(self, ids: list[int]) -> dict[str, torch.Tensor]:
        return self.run.collate(self.run.task.examples(ids))

    def positions(self, a: int, rows: int) -> tuple[int, ...]:
        """The global-batch positions of the first ``rows`` rows of this rank's a-th
        micro-batch (``data.batches.micro_batch_slice``): the same at every world size."""
        where = micro_batch_slice(a, self.rank, self.world, self.recipe.train.micro_batch_size)
        return tuple(range(where.start, where.start + rows))

    def _forward(self, batch: dict[str, torch.Tensor], plan: StepPlan, scale: float,
                 idx: list[int], positions: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """One micro-batch through the engine. On the host: the doubled batch, the supervised
        positions' flat indices (causal LM), and the noise keys (seed, step, each row's position
        in the global batch: the same at every world size; pace_llm/noise.py)."""
        dev = self.stepper.device
        batch = doubled(batch) if plan.views == 2 else dict(batch)
        if self.run.causal:
            batch["supervised"] = supervised_index(batch["labels"], plan.views)
        keys = RowKeys(self.recipe.train.seed, self.step, positions)
        history = self.history.lookup(idx, dev) if self.history is not None else None
        return self.stepper.forward(**{k: v.to(dev) for k, v in batch.items()}, views=plan.views,
                                    lam=plan.lam, scale=scale, history=history, noise_keys=keys)

    def _tokens(self, batches: list[dict[str, torch.Tensor]]) -> int:
        """Non-padding tokens this rank trained on (each example counted once)."""
        return int(sum(int(b["attention_mask"].sum()) for b in batches))

    def maybe_clean_grad_norm(self, global_batch: list[int]) -> float | None:
        """probes.clean_grad_norm on the coming step's batch every train.clean_grad_norm_every
        steps (outside the step's timing)."""
        every = self.recipe.train.clean_grad_norm_every
        if not every or (self.step + 1) % every:
            return None
        batches = [self._collate(ids) for ids in self.micro_batches(global_batch)]
        return clean_grad_norm(self.stepper.module, batches, self.stepper.device,
                               self.run.causal)

    # ------------------------------------------------------------------ bad steps
    def settle(self) -> None:
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
        """The eval record on schedule; early stopping sees its metric (results.EarlyStopping)."""
        every = self.recipe.eval.every
        if not force and not (every and self.step % every == 0):
            return
        record = self.evaluator.evaluate()
        self.write_metrics({"step": self.step, "eval": record})
        self.log(f"eval at step {self.step}: {eval_line(record)}")
        if self.step == 0:
            return
        verdict = self.stopping.observe(self.step, record.get("metric"),
                                        last=self.step >= self.max_steps)
        if verdict == "best" and self.stopping.keeps_best:  # eval.patience alone: kept hidden
            write_adapter(self.run, self.stopping.best_dir(self.run.out), overwrite=True,
                          quiet=not self.stopping.save_best)
        elif verdict == "stop":
            self.write_metrics({"step": self.step, "early_stop": self.stopping.record()})
            self.log(self.stopping.stop_message(self.step, self.run.out))

    def maybe_checkpoint(self) -> None:
        every = self.recipe.train.save_every
        if every and self.step % every == 0 and self.step < self.max_steps:
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        path = R.save_checkpoint(self)
        self.log(f"checkpoint written: {path}")

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


def eval_line(record: dict[str, Any]) -> str:
    """An eval record as the console shows it: the task metrics, the held-out loss, then each
    extra set's metrics (``extra.<name>``); the full record is in metrics.jsonl."""
    def pairs(metrics: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in metrics.items()) or "no metric"

    parts = [pairs(record.get("metrics", {}))]
    if record.get("eval_loss") is not None:
        parts.append(f"eval_loss {record['eval_loss']:.4g}")
    line = ", ".join(parts)
    for name, metrics in (record.get("extra") or {}).items():
        line += f"; extra.{name}: {pairs(metrics)}"
    return line


def _reduce_step(sums: torch.Tensor, tokens: int, world: int) -> tuple[torch.Tensor, Any]:
    """(a step's [ce, cons, loss] sums over every rank, the tokens trained on): one device
    collective across ranks (no host read); on one rank the sums and the host count as given."""
    if world == 1:
        return sums, tokens
    vec = torch.cat([sums.double(), torch.tensor([float(tokens)], dtype=torch.float64,
                                                 device=sums.device)])
    D.all_reduce_tensor(vec)
    return vec[:3], vec[3]
