"""In-loop evaluation on every rank: greedy generation (causal LM) or class predictions, and
PACE's mechanism quantities (pace_llm.probes), all at the un-noised weights.

Each rank evaluates a shard (example i goes to rank i mod world) and the results are gathered.
Under ZeRO-3 the whole model is gathered once per evaluation pass and DeepSpeed's per-module
fetch hooks are lifted for the pass (the engine's ``whole_weights``), so generation does not
all-gather weights per token.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pace_llm import distributed as D
from pace_llm import probes
from pace_llm.data.examples import IGNORE, TaskData
from pace_llm.data.tokens import reply_text
from pace_llm.lora import noise_free
from pace_llm.schema import EvalArgs

LOSS_ROWS = 64  # held-out examples in the eval loss


@dataclass
class EvalContext:
    """What an evaluation needs from the run, and nothing else."""

    model: nn.Module
    """The transformers model with adapters."""
    objective: nn.Module
    """The PaceObjective around it (task loss for eval_loss and clean_grad_norm)."""
    device: torch.device
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    task: TaskData
    args: EvalArgs
    tokenizer: Any
    grad_batch_size: int
    """Rows per backward in the gradient probe: training's micro-batch (its memory)."""
    whole_weights: Callable[[], AbstractContextManager]
    """Context in which every weight is whole and local (ZeRO-3 gathered once)."""

    @property
    def causal(self) -> bool:
        return self.task.kind == "causal_lm"


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def stop_at_text(tokenizer: Any, width: int, ends: list[str]) -> Any:
    """A transformers stopping criterion: row i of a batch is done once the text it generated
    after the ``width`` prompt columns contains ``ends[i]`` (special tokens kept: a marker
    may be a special token or plain text of several tokens); an empty end never stops a row."""
    from transformers import StoppingCriteria

    class StopAtText(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            done = [bool(end) and end in tokenizer.decode(row[width:][-(4 * len(end) + 8):],
                                                          skip_special_tokens=False)
                    for row, end in zip(input_ids.tolist(), ends)]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopAtText()


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: list[list[int]], tokenizer: Any,
                    max_new_tokens: int, batch_size: int, device: torch.device,
                    on_batch: Callable[[int], Any] | None = None,
                    ends: list[str] | None = None) -> list[list[int]]:
    """Greedy continuations (new token ids, EOS excluded) for each prompt; batched, left-padded,
    KV-cached. A prompt's generation also stops once its text holds ``ends[i]`` (a chat
    template's end of turn; the marker's tokens are kept). ``on_batch(n)`` is told each
    finished batch's size (progress)."""
    eos = tokenizer.eos_token_id
    outputs = []
    for s in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[s:s + batch_size], tokenizer.pad_token_id)
        batch_ends = (ends or [])[s:s + batch_size]
        stop = ([stop_at_text(tokenizer, ids.shape[1], batch_ends)] if any(batch_ends)
                else None)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id, use_cache=True,
                             num_beams=1, temperature=None, top_p=None, top_k=None,
                             stopping_criteria=stop)
        for row in gen[:, ids.shape[1]:].tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            outputs.append(row)
        if on_batch is not None:
            on_batch(len(gen))
    return outputs


class Evaluator:
    """The task metric and the mechanism probes for a run (every rank calls ``evaluate``)."""

    def __init__(self, ctx: EvalContext):
        self.ctx = ctx
        limit = ctx.args.limit
        clip = (lambda rows: rows[:limit]) if limit else (lambda rows: rows)  # noqa: E731
        self.examples = clip(ctx.task.eval)
        self.extra = {name: clip(rows) for name, rows in ctx.task.extra_eval.items()}
        self.grad_rows = ctx.task.probe_rows(probes.GRAD_ROWS)
        self.fp_rows = self.grad_rows[:probes.FP_ROWS]

    def evaluate(self) -> dict[str, Any]:
        """The eval record, all at the un-noised weights: metrics (and samples) on the eval set,
        metrics on each extra set (e.g. MNLI mismatched), FP-distance, the task-loss and output
        gradient norms on fixed training rows, and the held-out loss for causal LMs."""
        ctx = self.ctx
        with noise_free(ctx.model), ctx.whole_weights():
            preds = self._sharded_predictions(self.examples)
            extra = {name: self._sharded_predictions(rows) for name, rows in self.extra.items()}
            fp = probes.fp_distance(ctx.model, ctx.collate(self.fp_rows), ctx.device, ctx.causal)
            grad = self.grad_norm()  # on whole weights: no ZeRO-3 hooks left active
            out_grad = probes.output_grad_norm(ctx.model, self.fp_rows, ctx.collate, ctx.device,
                                               ctx.causal)
            loss = self.eval_loss() if ctx.causal else None
        record = self._score(self.examples, preds)
        record["fp_distance"] = fp
        record["clean_grad_norm"] = grad
        record["output_grad_norm"] = out_grad
        if loss is not None:
            record["eval_loss"] = loss
        if extra:
            record["extra"] = {name: self._score(self.extra[name], p, name)["metrics"]
                               for name, p in extra.items()}
        return record

    def _sharded_predictions(self, examples: list[dict]) -> list[Any]:
        """Rank r predicts examples r, r+world, …; every rank gets all predictions in order."""
        shard = list(range(D.rank(), len(examples), D.world_size()))
        preds = self._predict([examples[i] for i in shard])
        merged = dict(_flatten(D.all_gather_objects(list(zip(shard, preds)))))
        return [merged[i] for i in range(len(examples))]

    def _predict(self, examples: list[dict]) -> list[Any]:
        ctx = self.ctx
        if not examples:
            return []
        if ctx.causal:  # generation is the slow part: rank 0 shows its shard's progress
            from tqdm import tqdm

            replies = [e.get("reply") for e in examples]  # a chat layout: its end of turn
            with tqdm(total=len(examples), desc="eval (generation, rank 0's share)", leave=False,
                      disable=not D.is_main(), dynamic_ncols=True) as bar:
                rows = greedy_generate(ctx.model, [e["prompt_ids"] for e in examples],
                                       ctx.tokenizer, ctx.args.max_new_tokens,
                                       ctx.args.batch_size, ctx.device, on_batch=bar.update,
                                       ends=[(r or {}).get("end", "") for r in replies])
            return [reply_text(ctx.tokenizer, row, reply) for row, reply in zip(rows, replies)]
        preds = []
        bs = ctx.args.batch_size
        for s in range(0, len(examples), bs):
            batch = ctx.collate(examples[s:s + bs])
            with torch.no_grad():
                logits = ctx.model(input_ids=batch["input_ids"].to(ctx.device),
                                   attention_mask=batch["attention_mask"].to(ctx.device)).logits
            preds += (logits.squeeze(-1).float().tolist() if ctx.task.num_labels == 1
                      else logits.argmax(-1).tolist())
        return preds

    def grad_norm(self) -> float:
        """probes.clean_grad_norm on the first GRAD_ROWS training rows (the same rows at every
        eval, split across ranks): Thm 1's task-loss gradient norm without the batch-to-batch
        noise of the per-step ``clean_grad_norm``."""
        ctx = self.ctx
        mine = self.grad_rows[D.rank()::D.world_size()]
        bs = ctx.grad_batch_size
        with torch.enable_grad():  # also when a caller evaluates under no_grad
            return probes.clean_grad_norm(ctx.objective, [ctx.collate(mine[s:s + bs])
                                                          for s in range(0, len(mine), bs)],
                                          ctx.device, ctx.causal)

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Mean next-token CE on the held-out references (prompt masked), on a fixed slice of the
        eval set; every rank computes it on the same rows."""
        ctx = self.ctx
        rows = []
        for e in self.examples[:LOSS_ROWS]:
            target = e["target_ids"]  # the answer's ids exactly as trained, EOS included
            ids = e["prompt_ids"] + target
            rows.append({"input_ids": ids, "labels": [IGNORE] * len(e["prompt_ids"]) + target})
        total, count = 0.0, 0
        for s in range(0, len(rows), ctx.args.batch_size):
            batch = ctx.collate(rows[s:s + ctx.args.batch_size])
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            out = ctx.objective(**batch, views=1)
            total += float(out["ce"])
            count += int((batch["labels"][:, 1:] != IGNORE).sum())
        return total / max(count, 1)

    def _score(self, examples: list[dict], predictions: list[Any],
               extra: str | None = None) -> dict[str, Any]:
        """Metrics of a set: the task's, or an extra set's own (a mixture source's task)."""
        ctx = self.ctx
        metric, main = ctx.task.extra_metrics.get(extra, (ctx.task.metric, ctx.task.main_metric))
        refs = [e["reference"] if ctx.causal else e["label"] for e in examples]
        metrics = metric(predictions, refs) if predictions else {}
        primary = metrics.get(main, next(iter(metrics.values()), None))
        record: dict[str, Any] = {"metrics": metrics, "metric": primary,
                                  "examples": len(predictions)}
        if ctx.causal:
            record["samples"] = [{"prediction": p, "reference": r}
                                 for p, r in list(zip(predictions, refs))[:3]]
        return record


def _flatten(lists: list[list[Any]]) -> list[Any]:
    return [x for sub in lists for x in sub]
