"""PACE in one place (docs/PACE.md §3–4): what a step does in each mode, and the objective.

Per optimizer step (:func:`step_plan`):
    full  every micro-batch is doubled ([x, x], one forward over 2B rows): task + λ·consistency
    lazy  every lazy_interval-th step: the first half of each micro-batch doubled (B rows),
          task + λ·consistency; other steps: plain task loss, noise on
    fast  one view; consistency against last epoch's stored outputs of the same examples
          (:class:`FastHistory`)
    off   plain LoRA

The objective (:class:`PaceObjective`, the module DeepSpeed wraps). For a doubled micro-batch
(rows 0..B−1 = view 1, rows B..2B−1 = view 2, same examples):

    L = Σ_task + λ · Σ_consistency,   both sums divided by N (see ``scale``)

Causal LM: let S be the supervised positions (labels ≠ −100 after the shift) of view 1, and
ℓ¹, ℓ² the next-token logits of the two views at S. Then
    Σ_task = Σ_{s∈S} CE(ℓ¹_s, y_s)               (task_loss_on=both: mean of the two views' sums)
    Σ_consistency = Σ_{s∈S} ‖ℓ¹_s − ℓ²_s‖²₂      (summed over the vocabulary)
or, with consistency_on=hidden, ‖h¹_s − h²_s‖²₂ over the final hidden states. lm_head runs on
the supervised positions only, in chunks (recomputed in backward when there is more than one),
so full-vocabulary logits for a whole batch never exist. S arrives as flat indices computed on
the CPU batch (``data.supervised_index``, passed as ``supervised``) and is gathered with
``index_select``, so the device never syncs on a boolean mask (without them it is computed on
the device). N = supervised tokens in the accumulation window on all ranks, so the loss is a
token mean over the window, not a mean of micro-batch means.

The PACE noise of every adapted layer is drawn once per forward (pace_llm/noise.py), keyed by
the rows' ``noise_keys`` when the trainer passes them.

Classification / regression: Σ_task = Σ_b CE(ℓ¹_b, y_b) (MSE for one output), Σ_consistency =
Σ_b ‖ℓ¹_b − ℓ²_b‖²₂, N = examples in the window: the paper's "sum over classes, mean over batch".
In ``fast`` mode (one view) ℓ² is the stored output of the same example from the last epoch;
examples never seen contribute nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pace_llm import distributed as D
from pace_llm.data.collate import supervised_index
from pace_llm.lora import shared_views
from pace_llm.noise import NoiseBank, RowKeys
from pace_llm.schema import PaceArgs


@dataclass(frozen=True)
class StepPlan:
    """What PACE does in one optimizer step."""

    views: int
    """1, or 2: every micro-batch is run as [x, x]."""
    rows: int | None
    """Rows of each micro-batch to use (None = all): lazy pairs half a micro-batch."""
    lam: float
    """λ of this step (0 when the step has no consistency term)."""
    paired: bool
    """The step has a consistency term (its value is logged)."""


def step_plan(pace: PaceArgs, step: int, micro_batch_size: int) -> StepPlan:
    """The plan of optimizer step ``step`` (0-based: the step about to run)."""
    lam = pace.consistency_weight
    if pace.mode == "full":
        return StepPlan(2, None, lam, True)
    if pace.mode == "lazy" and (step + 1) % pace.lazy_interval == 0:
        return StepPlan(2, max(1, micro_batch_size // 2), lam, True)
    if pace.mode == "fast":
        return StepPlan(1, None, lam, True)
    return StepPlan(1, None, 0.0, False)


def doubled(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[x1..xB] → [x1..xB, x1..xB] along the batch dimension (the two PACE views)."""
    return {k: torch.cat([v, v]) for k, v in batch.items()}


class FastHistory:
    """``fast`` mode's store: the last output of every training example (NaN = never seen).

    Every rank stores every rank's outputs, so the buffer stays identical across ranks.
    """

    def __init__(self, n_examples: int, width: int):
        self.values = torch.full((n_examples, width), float("nan"))

    def lookup(self, idx: list[int], device: torch.device) -> torch.Tensor:
        return self.values[idx].to(device)

    def update(self, idx: list[int], outputs: torch.Tensor) -> None:
        for ids, values in D.all_gather_objects((idx, outputs.float().cpu())):
            self.values[torch.tensor(ids)] = values


class PaceObjective(nn.Module):
    """Wraps a transformers model; ``forward(batch…)`` returns the scaled loss and its terms.

    Args:
        model: a causal-LM or sequence-classification transformers model with adapters.
        causal: causal LM (token losses) or classification/regression.
        consistency_on: "logits" or "hidden" (causal LM only).
        task_loss_on: "first" (view 1, the paper) or "both".
        regression: one output trained with MSE (STS-B).
    """

    def __init__(self, model: nn.Module, causal: bool, consistency_on: str = "logits",
                 task_loss_on: str = "first", regression: bool = False):
        super().__init__()
        self.model = model
        self.causal = causal
        self.consistency_on = consistency_on
        self.task_loss_on = task_loss_on
        self.regression = regression
        vocab = model.get_output_embeddings().out_features if causal else 1
        self.chunk = max(256, 2 ** 26 // max(vocab, 1))  # rows of lm_head per chunk (~256 MB fp32)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.noise = NoiseBank(model)  # PACE's z: one draw per forward (pace_llm/noise.py)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                views: int = 1, lam: float = 0.0, scale: float = 1.0,
                history: torch.Tensor | None = None, noise_keys: RowKeys | None = None,
                supervised: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One forward over ``views`` stacked copies of a micro-batch.

        ``scale`` multiplies the summed terms (the engine passes ranks·accum/N so that DeepSpeed's
        averaging yields Σ/N). ``history`` (fast mode) holds last epoch's logits per row, NaN
        where unseen. ``noise_keys``: the rows' keys of the PACE noise stream (None: the torch
        RNG). ``supervised`` (causal LM): ``data.supervised_index(labels, views)``, computed
        on the host; None: computed here.
        """
        rows = input_ids.shape[0]
        with shared_views(self.model, views), \
                self.noise.draw(rows, input_ids.device, noise_keys, views):
            if self.causal:
                ce, cons = self._causal_terms(input_ids, attention_mask, labels, views, supervised)
                out = {}
            else:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
                ce, cons = self._cls_terms(logits, labels, views, history)
                out = {"logits": logits.detach()}
        loss = (ce + lam * cons) * scale
        return {"loss": loss, "ce": ce.detach(), "cons": cons.detach(), **out}

    # ---------------------------------------------------------------- causal LM
    def _causal_terms(self, input_ids, attention_mask, labels, views, supervised=None):
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False).last_hidden_state
        if supervised is None:
            supervised = supervised_index(labels, views)     # [views·N] (syncs on a device)
        n = supervised.numel() // views
        flat = hidden.reshape(-1, hidden.shape[-1])          # [rows·T, H], a view
        hs = flat.index_select(0, supervised)                # [views·N, H], view-major
        targets = labels.reshape(-1)[1:].index_select(0, supervised[:n])  # [N] next tokens
        h1 = hs[:n]                                          # [N, H] view 1
        h2 = hs[n:] if views == 2 else None                  # [N, H] view 2, same positions
        both = views == 2 and self.task_loss_on == "both"
        want_logit_cons = views == 2 and self.consistency_on == "logits"
        zero = hidden.new_zeros((), dtype=torch.float32)
        ce, cons = zero, zero
        # one chunk: keep its logits for backward; several: recompute each in backward, so at
        # most one chunk of full-vocabulary logits is alive at a time
        recompute = torch.is_grad_enabled() and targets.numel() > self.chunk
        for s in range(0, targets.numel(), self.chunk):
            a = h1[s:s + self.chunk]
            c = h2[s:s + self.chunk] if h2 is not None else None
            y = targets[s:s + self.chunk]
            args = (a, c if (both or want_logit_cons) else None, y, both, want_logit_cons)
            if recompute:
                dce, dcons = checkpoint(self._chunk_terms, *args, use_reentrant=False)
            else:
                dce, dcons = self._chunk_terms(*args)
            ce, cons = ce + dce, cons + dcons
        if views == 2 and self.consistency_on == "hidden":
            cons = ((h1.float() - h2.float()) ** 2).sum()
        return ce, cons

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(h).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _chunk_terms(self, h1, h2, y, both: bool, logit_cons: bool):
        l1 = self._logits(h1)
        ce = F.cross_entropy(l1, y, reduction="sum")
        cons = l1.new_zeros(())
        if h2 is not None:
            l2 = self._logits(h2)
            if both:
                ce = 0.5 * (ce + F.cross_entropy(l2, y, reduction="sum"))
            if logit_cons:
                cons = ((l1 - l2) ** 2).sum()
        return ce, cons

    # ---------------------------------------------------------------- classification
    def _task_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.regression:
            return ((logits.squeeze(-1) - labels.float()) ** 2).sum()
        return F.cross_entropy(logits, labels, reduction="sum")

    def _cls_terms(self, logits, labels, views, history):
        b = logits.shape[0] // views
        l1 = logits[:b]
        ce = self._task_sum(l1, labels[:b])
        cons = logits.new_zeros(())
        if views == 2:
            if self.task_loss_on == "both":
                ce = 0.5 * (ce + self._task_sum(logits[b:], labels[b:]))
            cons = ((l1 - logits[b:]) ** 2).sum()
        elif history is not None:
            seen = ~torch.isnan(history).any(dim=-1)
            if seen.any():
                cons = ((l1[seen] - history[seen].to(l1.dtype)) ** 2).sum()
        return ce, cons
