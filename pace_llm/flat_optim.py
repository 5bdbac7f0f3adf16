"""The adapter's flat optimizer path at ZeRO-0/1/2 (bf16, fp32): one fp32 master, one fused AdamW.

The adapter's trainable params become views of one flat buffer in the model dtype; the optimizer
holds one flat fp32 master of it (the buffer itself in fp32) and one flat fp32 gradient. Per
optimizer step, with g the gradient summed over the window's micro-batches (averaged over the
ranks) and n = ||g||_2 (one fp32 norm over the flat gradient, logged exactly):

    skip  = not isfinite(n) or a micro-batch loss of the window was non-finite (device tensor)
    c     = min(1, max_grad_norm / (n + 1e-6))          (clipping; c = 1 if max_grad_norm = 0)
    if not skip:                                        (AdamW, torch's, decoupled decay)
        t  = t + 1
        θ  = θ · (1 − lr·wd)
        m  = β1·m + (1 − β1)·c·g;   v = β2·v + (1 − β2)·(c·g)²
        θ  = θ − lr · (m / (1 − β1^t)) / (sqrt(v / (1 − β2^t)) + eps)
    model params (model dtype) = θ

The skip is decided on the device: torch's fused AdamW (``fused=True``) applies nothing when its
``found_inf`` tensor is 1 and undoes its step-counter increment, and divides the gradient by its
``grad_scale`` tensor (here 1/c); no value is read by the host. The non-finite flag and the norm
stay device tensors (``last_skipped``, ``last_norm``) for the trainer to read at logging time.
A skipped step still advances the lr schedule (DeepSpeed steps the scheduler after every
optimizer step; the same as DeepSpeed's path with ``GuardedAdamW.skip_next``).

Gradients: autograd leaves each micro-batch's gradient on ``p.grad`` (its own tensor, as without
this optimizer); ``accumulate()`` after each backward adds them into the flat fp32 gradient in
one multi-tensor op (``_foreach_copy_`` / ``_foreach_add_``: fp32 accumulation also for a bf16
model) and clears ``p.grad``; ``step()`` folds any gradient left on the params first.

ZeRO-1/2 (``partition``): the master and the AdamW moments are split in ``world_size``
contiguous shards, one per rank (ZeRO-1's optimizer-state partitioning); per step the flat fp32
gradient is all-reduced whole (one collective; the adapter's gradient is small, and every rank
then computes the exact global norm without a second one), each rank updates its shard, and
one all-gather of the flat model-dtype buffer brings every rank the new params. The frozen
base weights are not partitioned at ZeRO-1/2 in DeepSpeed either, so DeepSpeed is handed
stage 0; its ZeRO-1/2 optimizer would otherwise wrap the adapter with per-tensor overflow
checks, norms and bucket copies (bench/launch_count.py: ~3,100 launches per step more on a
280-tensor adapter). Unlike DeepSpeed's ZeRO-2 the fp32 gradient-accumulation buffer is whole
on every rank (4 bytes per adapter element). On one rank the shard is the whole adapter.

DeepSpeed 0.19.8 switches relied on (see :func:`engine_config` and :func:`prepare_engine`):
  - the engine is handed the config with ``bf16.enabled = false``, ``gradient_clipping = 0``
    and ``zero_optimization.stage = 0``: ``DeepSpeedEngine._do_optimizer_sanity_check`` then
    returns no wrapper (model dtype = grad-accum dtype = fp32 as far as it knows), so
    ``engine.optimizer`` is this object
    (no FP16_Optimizer per-tensor overflow checks, norms, clipping or fp32 copies), the engine
    does not cast the (already bf16) module, and ``_take_model_step`` neither clips
    (``clip_fp32_gradients``) nor reads an ``overflow`` attribute (this class has none) before
    stepping the lr scheduler; its ``zero_grad`` only sets ``p.grad = None``;
  - ``engine.enable_backward_allreduce = False`` (as DeepSpeed's own PipelineEngine does): no
    bucketed per-tensor gradient all-reduce in ``_backward_epilogue`` (it runs even on one
    process); this optimizer all-reduces the flat gradient itself, once per step, when there is
    more than one rank;
  - checkpoints: at stage 0 the engine saves ``optimizer.state_dict()`` (called on every rank
    in ``_common_checkpoint_state``; rank 0 writes it) and every rank restores it with
    ``optimizer.load_state_dict`` (fp32 mode: no ``load_optimizer_states`` argument); the state
    is unpartitioned and holds the fp32 master (``flat_master``), so a resume is bit-identical
    in bf16 too; partitioned, both are collectives (all-gather of the shards).
The path is not used at ZeRO-3 (DeepSpeed partitions the frozen base too), with fp16 (loss
scaling stays in DeepSpeed's FP16_Optimizer) or with CPU offload (DeepSpeedCPUAdam).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pace_llm.errors import UserError


def uses_flat(optimizer_path: str, zero_stage: int, precision: str, offload: bool,
              uniform: bool = True) -> bool:
    """Whether the run takes the flat path: ``auto`` = at ZeRO-0/1/2 in bf16/fp32 without
    offload, when every trainable param has one dtype and device (``uniform``); ``flat`` there
    too, refused elsewhere; ``deepspeed`` = never."""
    fits = zero_stage in (0, 1, 2) and precision in ("bf16", "fp32") and not offload and uniform
    if optimizer_path == "flat" and not fits:
        raise UserError(f"train.optimizer_path: flat needs ZeRO-0/1/2, bf16 or fp32, no CPU "
                        f"offload and one dtype for every trainable param (this run: "
                        f"ZeRO-{zero_stage}, {precision}{', offload' if offload else ''}"
                        f"{'' if uniform else ', mixed dtypes'}); use auto or deepspeed")
    return fits and optimizer_path in ("auto", "flat")


def engine_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The config handed to ``deepspeed.initialize`` on the flat path: stage 0, fp32 mode (no
    DeepSpeed optimizer wrapper) and no DeepSpeed clipping; the run's own config is recorded
    unchanged (FlatAdamW partitions its state at ZeRO-1/2)."""
    cfg = copy.deepcopy(ds_config)
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": False}
    cfg["gradient_clipping"] = 0.0
    cfg["zero_optimization"] = {**cfg.get("zero_optimization", {}), "stage": 0}
    return cfg


def prepare_engine(engine: Any) -> None:
    """No DeepSpeed gradient all-reduce after backward (the flat optimizer reduces its one flat
    gradient)."""
    engine.enable_backward_allreduce = False


class FlatAdamW(torch.optim.AdamW):
    """torch's fused AdamW over one flat fp32 master of the adapter (see the module docstring);
    its one param group is what LambdaLR and checkpoints see. ``partition`` (ZeRO-1/2): each of
    the ``world_size`` ranks holds the master and AdamW moments of one contiguous shard."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, weight_decay: float,
                 max_grad_norm: float, world_size: int = 1, partition: bool = False):
        self.params = list(params)
        if not self.params:
            raise UserError("no trainable parameters: the adapter is empty")
        dtypes = {(p.dtype, p.device) for p in self.params}
        if len(dtypes) != 1:
            raise UserError(f"the flat optimizer needs one dtype and device for every trainable "
                            f"param, got {sorted(map(str, dtypes))}; set "
                            "train.optimizer_path: deepspeed")
        dtype, device = dtypes.pop()
        self.max_grad_norm, self.world = float(max_grad_norm), int(world_size)
        self.shards = self.world if partition else 1
        self.rank = dist.get_rank() if self.shards > 1 else 0
        self.numel = sum(p.numel() for p in self.params)
        size = -(-self.numel // self.shards)  # shard length; the flat buffers are zero-padded
        self._shard = slice(self.rank * size, (self.rank + 1) * size)
        self._lp = dtype != torch.float32
        with torch.no_grad():
            self.flat = torch.zeros(size * self.shards, dtype=dtype, device=device)
            views = self._views(self.flat)
            torch._foreach_copy_(views, [p.detach() for p in self.params])
            for p, v in zip(self.params, views):
                p.data = v  # the param is now a view of the flat buffer
            own = self.flat[self._shard]  # fp32: the master is the buffer (its shard) itself
            self.master = own.float() if self._lp else own
            self.flat_grad = torch.zeros(self.flat.numel(), dtype=torch.float32, device=device)
            self.master.grad = self.flat_grad[self._shard]
        self._grad_views = self._views(self.flat_grad)
        self._folded = 0  # micro-batches folded into the flat gradient since the last step
        self._bad: torch.Tensor | None = None
        self.last_norm: torch.Tensor | None = None
        self.last_skipped: torch.Tensor | None = None
        super().__init__([self.master], lr=lr, weight_decay=weight_decay, fused=True)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for p in self.params:
            out.append(flat[start:start + p.numel()].view(p.shape))
            start += p.numel()
        return out

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add the params' gradients (one micro-batch) into the flat fp32 gradient and clear
        them; one multi-tensor op."""
        pairs = [(v, p.grad) for v, p in zip(self._grad_views, self.params) if p.grad is not None]
        if not pairs:
            return
        views, grads = map(list, zip(*pairs))
        if self._folded == 0 and len(views) == len(self.params):
            torch._foreach_copy_(views, grads)
        else:
            if self._folded == 0:
                self.flat_grad.zero_()
            torch._foreach_add_(views, grads)
        self._folded += 1
        for p in self.params:
            p.grad = None

    def skip_if(self, bad: torch.Tensor | None) -> None:
        """The next step is skipped where ``bad`` (a device bool tensor, e.g. a non-finite loss
        in the window) is true, in addition to a non-finite gradient norm."""
        self._bad = bad

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on the flat master (module docstring), decided on the device. Across
        ranks: one all-reduce of the flat gradient (every rank then has the whole average, so
        the norm needs no second collective); partitioned, one all-gather of the params."""
        if closure is not None:
            raise UserError("FlatAdamW.step takes no closure")
        self.accumulate()
        g = self.flat_grad
        if self._folded == 0:
            g.zero_()  # no gradient reached the adapter this window
        if self.world > 1:
            dist.all_reduce(g)
            g.div_(self.world)
        norm = self._global_norm(g)
        bad = ~torch.isfinite(norm)
        if self._bad is not None:
            bad = bad | self._bad.to(bad.device)
        self.found_inf = bad.float()
        self.grad_scale = self._clip_scale(norm)
        super().step()
        if self._lp:
            self.flat[self._shard].copy_(self.master)
        if self.shards > 1:
            dist.all_gather_into_tensor(self.flat, self.flat[self._shard])
        g.zero_()
        self._folded, self._bad = 0, None
        self.last_norm, self.last_skipped = norm, bad
        self._global_grad_norm = norm  # DeepSpeed's engine.get_global_grad_norm() reads it
        return None

    def _global_norm(self, g: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(g)

    def _clip_scale(self, norm: torch.Tensor) -> torch.Tensor | None:
        """1/c = max(1, (n + 1e-6) / max_grad_norm): the fused kernel divides g by it."""
        if self.max_grad_norm <= 0:
            return None
        return torch.clamp((norm + 1e-6) / self.max_grad_norm, min=1.0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the params' pending gradients (the flat gradient is cleared by ``step``)."""
        for p in self.params:
            p.grad = None

    def _whole(self, shard: torch.Tensor) -> torch.Tensor:
        """The unpartitioned flat tensor of a per-rank shard (a collective when partitioned),
        without the padding."""
        if self.shards == 1:
            return shard.detach()[:self.numel]
        out = torch.empty(self.flat.numel(), dtype=shard.dtype, device=shard.device)
        dist.all_gather_into_tensor(out, shard.detach().contiguous())
        return out[:self.numel]

    def _own(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's shard of an unpartitioned flat tensor (padded)."""
        padded = whole.new_zeros(self.flat.numel())
        padded[:self.numel] = whole
        return padded[self._shard]

    def state_dict(self) -> dict[str, Any]:
        """torch's AdamW state, unpartitioned (``flat_master``, ``exp_avg``, ``exp_avg_sq`` over
        the whole adapter, as at ZeRO-0). Partitioned, a collective: DeepSpeed 0.19.8 calls
        ``optimizer.state_dict()`` on every rank in ``save_checkpoint``
        (``_common_checkpoint_state``), rank 0 writes it."""
        sd = super().state_dict()
        sd["state"] = {k: {n: self._whole(v) if n in ("exp_avg", "exp_avg_sq") else v
                           for n, v in st.items()} for k, st in sd["state"].items()}
        sd["flat_master"] = self._whole(self.master)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the AdamW state and the master (this rank's shard of them); the model
        params follow the master."""
        sd = dict(state_dict)
        if "flat_master" not in sd:
            raise UserError("optimizer state without 'flat_master': the checkpoint was written "
                            "by DeepSpeed's optimizer path (train.optimizer_path: deepspeed)")
        master = sd.pop("flat_master")
        sd["state"] = {k: {n: self._own(v) if n in ("exp_avg", "exp_avg_sq") else v
                           for n, v in st.items()} for k, st in sd["state"].items()}
        super().load_state_dict(sd)
        with torch.no_grad():
            self.master.copy_(self._own(master))
            if self._lp:
                self.flat[self._shard].copy_(self.master)
            if self.shards > 1:
                dist.all_gather_into_tensor(self.flat, self.flat[self._shard])
