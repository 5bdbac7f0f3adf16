"""The adapter's flat optimizer (ZeRO-0/1/2, bf16/fp32): one fp32 master, one fused AdamW.

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
A skipped step still advances the lr schedule (the engine steps the schedule after every
optimizer step, as DeepSpeed's engine does on its path, where ``GuardedAdamW.skip_next`` skips).

Gradients: autograd leaves each micro-batch's gradient on ``p.grad`` (its own tensor, as without
this optimizer); ``accumulate()`` after each backward adds them into the flat fp32 gradient in
one multi-tensor op (``_foreach_copy_`` / ``_foreach_add_``: fp32 accumulation also for a bf16
model) and clears ``p.grad``; ``step()`` folds any gradient left on the params first.

Sharding (``partition``, the run's ZeRO-1/2): the master and the AdamW moments are split in
``world_size`` contiguous shards, one per rank (ZeRO-1's optimizer-state partitioning); per step
the flat fp32 gradient is all-reduced whole (one collective; the adapter's gradient is small,
and every rank then computes the exact global norm without a second one), each rank updates its
shard, and one all-gather of the flat model-dtype buffer brings every rank the new params. Unlike
DeepSpeed's ZeRO-2 the fp32 gradient is whole on every rank (4 bytes per adapter element). On
one rank the shard is the whole adapter. A checkpoint holds each shard as written by its rank
(:meth:`FlatAdamW.shard_state`): saving is no collective.

The engine around it (no DeepSpeed): pace_llm/flat_engine.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from pace_llm.errors import UserError


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
        self._publish()
        g.zero_()
        self._folded, self._bad = 0, None
        self.last_norm, self.last_skipped = norm, bad

    def _publish(self) -> None:
        """The params follow the master: this rank's shard of the flat buffer (a copy when the
        params are of lower precision), then one all-gather of the shards when partitioned."""
        if self._lp:
            self.flat[self._shard].copy_(self.master)
        if self.shards > 1:
            dist.all_gather_into_tensor(self.flat, self.flat[self._shard])

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

    @torch.no_grad()
    def broadcast_params(self) -> None:
        """Every rank takes rank 0's params (and master): one broadcast of the flat buffer."""
        dist.broadcast(self.flat, src=0)
        if self._lp:
            self.master.copy_(self.flat[self._shard])

    def shard_state(self) -> dict[str, torch.Tensor]:
        """This rank's shard of the optimizer state: the fp32 master, the AdamW moments and the
        step count (fp32 tensors, on the CPU). No collective."""
        state = self.state.get(self.master, {})
        zeros = torch.zeros_like(self.master)
        return {"master": self.master.detach().float().cpu().clone(),
                "exp_avg": state.get("exp_avg", zeros).detach().cpu().clone(),
                "exp_avg_sq": state.get("exp_avg_sq", zeros).detach().cpu().clone(),
                "step": torch.as_tensor(state.get("step", 0.0), dtype=torch.float32).reshape(1)}

    @torch.no_grad()
    def load_shard_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore this rank's shard (:meth:`shard_state`); the model params follow the master
        (one all-gather when sharded)."""
        if tensors["master"].shape != self.master.shape:
            raise UserError(f"the checkpoint's optimizer shard holds {tensors['master'].numel()} "
                            f"elements, this adapter's shard {self.master.numel()}")
        self.master.copy_(tensors["master"])
        device = self.master.device
        self.state[self.master] = {
            "step": tensors["step"].reshape(()).to(device=device, dtype=torch.float32),
            "exp_avg": tensors["exp_avg"].to(device),
            "exp_avg_sq": tensors["exp_avg_sq"].to(device)}
        self._publish()
