"""PACE's mechanism quantities (docs/PACE.md §6), measured at the un-noised weights.

- ``clean_grad_norm``: ‖∇_adapter L_task‖₂ without noise or dropout — Thm 1's ‖∇θL‖.
- ``output_grad_norm``: ‖∂f/∂θ_adapter‖_F / √K, the adapter-weight gradient of the model's K
  outputs — what the consistency term penalises (Thm 2: ≈ 2σ²‖Δθ⊙∇_θ f‖²).
- ``fp_distance``: mean squared difference of fine-tuned and base outputs.

The outputs f are those the FP-distance compares: next-token logits at supervised positions
(causal LM, flattened) or class logits. Every function is collective where it says so: all
ranks call it, each with its own rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pace_llm import distributed as D
from pace_llm.data.collate import supervised_count
from pace_llm.data.examples import IGNORE
from pace_llm.inject import trainable_parameters
from pace_llm.lora import adapters_disabled, lora_layers, noise_free

FP_ROWS = 8  # examples in the fixed FP-distance / output-gradient batch
GRAD_ROWS = 64  # fixed training examples for the eval record's clean task-gradient norm
PROBES = 8  # random probes per row in the output-gradient norm
PROBE_SEED = 20240926  # fixed: every eval, run, rank and world size draws the same probes

Batch = dict[str, torch.Tensor]


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


def model_outputs(model: nn.Module, batch: Batch, device: torch.device,
                  causal: bool) -> torch.Tensor:
    """The outputs the probes measure (fp32): logits at supervised positions (causal LM,
    flattened to [N, V]) or class logits [B, C]."""
    logits = model(input_ids=batch["input_ids"].to(device),
                   attention_mask=batch["attention_mask"].to(device)).logits.float()
    if causal:
        logits = logits[:, :-1][(batch["labels"][:, 1:] != IGNORE).to(device)]
    return logits


def clean_grad_norm(objective: nn.Module, batches: list[Batch], device: torch.device,
                    causal: bool) -> float:
    """‖∇_adapter L_task‖₂ at the current weights without noise or dropout, over these
    micro-batches on every rank (token mean, as training; collective). Costs one extra
    forward/backward. The gradients come from torch.autograd.grad, so nothing reaches
    DeepSpeed's buffers. ``objective`` is the PaceObjective DeepSpeed wraps."""
    params = trainable_parameters(objective)
    n_total = D.all_reduce([float(sum(supervised_count(b, causal) for b in batches))])[0]
    with noise_free(objective):
        total = [torch.zeros(tuple(getattr(p, "ds_shape", p.shape))) for p in params]
        for batch in batches:
            out = objective(**{k: v.to(device) for k, v in batch.items()}, views=1)
            grads = torch.autograd.grad(out["loss"] / n_total, params, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc += g.float()
    flat = torch.cat([g.flatten() for g in total])
    if D.world_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(flat)
    return float(flat.norm())


def output_grad_norm(model: nn.Module, rows: list[dict], collate: Callable[[list[dict]], Batch],
                     device: torch.device, causal: bool) -> float:
    """G = ‖J‖_F / √K, J = ∂f/∂θ_adapter, over the K outputs of ``rows`` (collective).

    θ_adapter is the LoRA A and B of every noisy layer (a trainable classifier head is left
    out: it is not noised, so PACE does not act on its gradient, and a fresh head's large
    Jacobian would swamp the adapters'); G is the RMS over output elements of ‖∂f_k/∂θ‖.
    Unlike the task-loss gradient it does not shrink as the loss is fitted (∇L = Σ_k ∂ℓ/∂f_k ·
    ∂f_k/∂θ), so runs at different fit compare on the mechanism itself.

    Hutchinson estimate, row by row: ‖J_row‖²_F = E_v ‖J_rowᵀ v‖², v ~ N(0, I), PROBES probes per
    row drawn from a generator seeded by (PROBE_SEED, row), so the figure does not depend on
    the rank split (rank r takes rows r, r + world, …) and two runs use the same probes.
    """
    params = [p for _, layer in lora_layers(model) for p in layer.adapter_parameters()]
    squares, count = 0.0, 0  # Σ_rows mean_probes ‖J_rowᵀ v‖², K
    with torch.enable_grad():
        for i in range(D.rank(), len(rows), D.world_size()):
            f = model_outputs(model, collate([rows[i]]), device, causal)
            squares += jacobian_sq_norm(f, params, PROBES, PROBE_SEED + i)
            count += f.numel()
    squares, count = D.all_reduce([squares, float(count)])
    return (squares / max(count, 1.0)) ** 0.5


@torch.no_grad()
def fp_distance(model: nn.Module, batch: Batch, device: torch.device, causal: bool) -> float:
    """Mean squared difference between fine-tuned and base outputs (adapters bypassed) on a
    fixed batch."""
    tuned = model_outputs(model, batch, device, causal)
    with adapters_disabled(model):
        base = model_outputs(model, batch, device, causal)
    return float(((tuned - base) ** 2).mean())
