"""In-loop evaluation on every rank: greedy generation (causal LM) or class predictions, and the
FP-distance of PACE.md §6.

Each rank evaluates a shard (example i goes to rank i mod world) and the results are gathered.
Under ZeRO-3 the whole model is gathered once per evaluation pass and DeepSpeed's per-module
fetch hooks are lifted for the pass, so generation does not all-gather weights per token.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from pace_llm import distributed as D
from pace_llm.lora import adapters_disabled, lora_layers, noise_free

FP_ROWS = 8  # examples in the fixed FP-distance batch
GRAD_ROWS = 64  # fixed training examples for the eval record's clean task-gradient norm
LOSS_ROWS = 64  # held-out examples in the eval loss
PROBES = 8  # random probes per row in the output-gradient norm
PROBE_SEED = 20240926  # fixed: every eval, run, rank and world size draws the same probes


@contextlib.contextmanager
def full_weights(engine: Any):
    """Whole, local weights for the block; ZeRO-3 hooks are removed and restored around it."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None:
        yield
        return
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for p in params:
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


def jacobian_sq_norm(f: torch.Tensor, params: list[nn.Parameter], probes: int,
                     seed: int) -> float:
    """Hutchinson estimate of ‖∂f/∂θ‖²_F: E_v ‖Jᵀv‖² = tr(J Jᵀ) for v ~ N(0, I) shaped like f,
    averaged over ``probes`` draws from a CPU generator seeded with ``seed`` (one backward
    each; the graph of f is kept until the last)."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64, device=f.device)  # on device: one sync at the end
    for k in range(probes):
        v = torch.randn(f.shape, generator=gen).to(f.device, f.dtype)
        grads = torch.autograd.grad(f, params, grad_outputs=v, allow_unused=True,
                                    retain_graph=k + 1 < probes)
        squares = [g.float().pow(2).sum() for g in grads if g is not None]
        if squares:
            total += torch.stack(squares).double().sum()
    return float(total) / probes


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: list[list[int]], tokenizer: Any,
                    max_new_tokens: int, batch_size: int, device: torch.device) -> list[list[int]]:
    """Greedy continuations (new token ids, EOS excluded) for each prompt; batched, left-padded,
    KV-cached."""
    eos = tokenizer.eos_token_id
    outputs = []
    for s in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[s:s + batch_size], tokenizer.pad_token_id)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id, use_cache=True,
                             num_beams=1, temperature=None, top_p=None, top_k=None)
        for row in gen[:, ids.shape[1]:].tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            outputs.append(row)
    return outputs


class Evaluator:
    """Runs the task metric and the FP-distance for a Trainer."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        limit = trainer.recipe.eval.limit
        clip = (lambda rows: rows[:limit]) if limit else (lambda rows: rows)  # noqa: E731
        self.examples = clip(trainer.task.eval)
        self.extra = {name: clip(rows) for name, rows in trainer.task.extra_eval.items()}
        self.grad_rows = [trainer.task.train[i]
                          for i in range(min(GRAD_ROWS, len(trainer.task.train)))]
        self.fp_batch = self.grad_rows[:FP_ROWS]

    def run(self) -> dict[str, Any]:
        """The eval record, all at the un-noised weights: metrics (and samples) on the eval set,
        metrics on each extra set (e.g. MNLI mismatched), FP-distance, the task-loss and output
        gradient norms on fixed training rows, and the held-out loss for causal LMs."""
        tr = self.trainer
        with noise_free(tr.hf_model), full_weights(tr.engine):
            preds = self._sharded_predictions(self.examples)
            extra = {name: self._sharded_predictions(rows) for name, rows in self.extra.items()}
            fp = self.fp_distance()
            grad = self.grad_norm()  # on whole weights: no ZeRO-3 hooks left active
            out_grad = self.output_grad_norm()
            loss = self.eval_loss() if tr.causal else None
        record = self._score(self.examples, preds)
        record["fp_distance"] = fp
        record["clean_grad_norm"] = grad
        record["output_grad_norm"] = out_grad
        if loss is not None:
            record["eval_loss"] = loss
        if extra:
            record["extra"] = {name: self._score(self.extra[name], p)["metrics"]
                               for name, p in extra.items()}
        return record

    def _sharded_predictions(self, examples: list[dict]) -> list[Any]:
        """Rank r predicts examples r, r+world, …; every rank gets all predictions in order."""
        tr = self.trainer
        shard = list(range(tr.rank, len(examples), tr.world))
        preds = self._predict([examples[i] for i in shard])
        merged = dict(_flatten(D.all_gather_objects(list(zip(shard, preds)))))
        return [merged[i] for i in range(len(examples))]

    def _predict(self, examples: list[dict]) -> list[Any]:
        tr = self.trainer
        if not examples:
            return []
        if tr.causal:
            rows = greedy_generate(tr.hf_model, [e["prompt_ids"] for e in examples], tr.tokenizer,
                                   tr.recipe.eval.max_new_tokens, tr.recipe.eval.batch_size,
                                   tr.engine.device)
            return [tr.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        preds = []
        bs = tr.recipe.eval.batch_size
        for s in range(0, len(examples), bs):
            batch = tr.collate(examples[s:s + bs])
            with torch.no_grad():
                logits = tr.hf_model(input_ids=batch["input_ids"].to(tr.engine.device),
                                     attention_mask=batch["attention_mask"].to(tr.engine.device)).logits
            preds += (logits.squeeze(-1).float().tolist() if tr.task.num_labels == 1
                      else logits.argmax(-1).tolist())
        return preds

    def grad_norm(self) -> float:
        """‖∇_adapter L_task‖₂ at the un-noised weights on the first GRAD_ROWS training rows
        (the same rows at every eval, split across ranks): Thm 1's task-loss gradient norm
        without the batch-to-batch noise of the per-step ``clean_grad_norm``."""
        tr = self.trainer
        mine = self.grad_rows[tr.rank::tr.world]
        bs = tr.recipe.train.micro_batch_size  # a backward: training's memory, not generation's
        with torch.enable_grad():  # also when a caller evaluates under no_grad
            return tr.clean_grad_norm([tr.collate(mine[s:s + bs])
                                       for s in range(0, len(mine), bs)])

    def output_grad_norm(self) -> float:
        """The adapter-weight gradient of the model's *output*, the quantity PACE's Thm 2
        penalises (consistency ≈ 2σ²‖Δθ⊙∇_θ f‖²) and the paper plots as "gradient norm":

            G = ‖J‖_F / √K,   J = ∂f/∂θ_adapter,

        θ_adapter the LoRA A and B of every noisy layer (a trainable classifier head is left
        out: it is not noised, so PACE does not act on its gradient, and a fresh head's large
        Jacobian would swamp the adapters'), f the K un-noised outputs on the fixed FP batch
        (the FP-distance's outputs: next-token logits at supervised positions, or class
        logits); G is the RMS over output elements of ‖∂f_k/∂θ‖. Unlike the task-loss gradient
        it does not shrink as the loss is fitted (∇L = Σ_k ∂ℓ/∂f_k · ∂f_k/∂θ), so runs at
        different fit compare on the mechanism itself.

        Hutchinson estimate, row by row: ‖J_row‖²_F = E_v ‖J_rowᵀ v‖², v ~ N(0, I), PROBES
        probes per row drawn from a generator seeded by (PROBE_SEED, row), so the figure does not
        depend on the rank split and two runs are measured with the same probes."""
        tr = self.trainer
        model, dev = tr.hf_model, tr.engine.device
        params = [p for _, layer in lora_layers(model) for p in layer.adapter_parameters()]
        mine = list(range(tr.rank, len(self.fp_batch), tr.world))
        squares, count = 0.0, 0  # Σ_rows mean_probes ‖J_rowᵀ v‖², K
        with torch.enable_grad():
            for i in mine:
                f = self._outputs(model, tr.collate([self.fp_batch[i]]), dev)
                squares += jacobian_sq_norm(f, params, PROBES, PROBE_SEED + i)
                count += f.numel()
        squares, count = D.all_reduce([squares, float(count)])
        return (squares / max(count, 1.0)) ** 0.5

    def _outputs(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 dev: torch.device) -> torch.Tensor:
        """The model's outputs on a batch as the FP-distance sees them (fp32): logits at
        supervised positions (causal LM, flattened) or class logits."""
        logits = model(input_ids=batch["input_ids"].to(dev),
                       attention_mask=batch["attention_mask"].to(dev)).logits.float()
        if self.trainer.causal:
            logits = logits[:, :-1][(batch["labels"][:, 1:] != -100).to(dev)]
        return logits

    @torch.no_grad()
    def fp_distance(self) -> float:
        """Mean squared difference between fine-tuned and base outputs on the fixed batch:
        next-token logits at supervised positions (causal LM) or class logits."""
        model, dev = self.trainer.hf_model, self.trainer.engine.device
        batch = self.trainer.collate(self.fp_batch)
        tuned = self._outputs(model, batch, dev)
        with adapters_disabled(model):
            base = self._outputs(model, batch, dev)
        return float(((tuned - base) ** 2).mean())

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Mean next-token CE on the held-out references (prompt masked), on a fixed slice of the
        eval set; every rank computes it on the same rows."""
        tr = self.trainer
        rows = []
        for e in self.examples[:LOSS_ROWS]:
            target = e["target_ids"]  # the answer's ids exactly as trained, EOS included
            ids = e["prompt_ids"] + target
            rows.append({"input_ids": ids, "labels": [-100] * len(e["prompt_ids"]) + target})
        total, count = 0.0, 0
        for s in range(0, len(rows), tr.recipe.eval.batch_size):
            batch = tr.collate(rows[s:s + tr.recipe.eval.batch_size])
            batch = {k: v.to(tr.engine.device) for k, v in batch.items()}
            out = tr.objective(**batch, views=1)
            total += float(out["ce"])
            count += int((batch["labels"][:, 1:] != -100).sum())
        return total / max(count, 1)

    def _score(self, examples: list[dict], predictions: list[Any]) -> dict[str, Any]:
        tr = self.trainer
        refs = [e["reference"] if tr.causal else e["label"] for e in examples]
        metrics = tr.task.metric(predictions, refs) if predictions else {}
        primary = metrics.get(tr.task.main_metric, next(iter(metrics.values()), None))
        record: dict[str, Any] = {"metrics": metrics, "metric": primary,
                                  "examples": len(predictions)}
        if tr.causal:
            record["samples"] = [{"prediction": p, "reference": r}
                                 for p, r in list(zip(predictions, refs))[:3]]
        return record


def _flatten(lists: list[list[Any]]) -> list[Any]:
    return [x for sub in lists for x in sub]
