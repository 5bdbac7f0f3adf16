"""NoisyLoRALinear: the PACE adapter layer (docs/PACE.md §1), and the view-sharing mechanism.

    h(x) = W0 x + b0 + z ⊙ s · B A drop(x)     training, σ > 0
    h(x) = W0 x + b0 + s · B A x               eval, or σ = 0 (plain LoRA)
    h(x) = W0 x + b0                           disabled (the base model)

A ∈ R^{r×d_in} (Kaiming-uniform, as PEFT), B ∈ R^{d_out×r} (zeros), s = α/r (α/√r with
rsLoRA). z = 1 + σ·ε, ε ~ N(0, 1), has shape [rows, 1, d_out]: one value per (sequence, output
channel), shared by every token of the sequence, new at each forward, drawn in fp32 under
no_grad and cast to the activation dtype. Noise multiplies the adapter output only, never W0 x.

Where z comes from: inside a ``pace_llm.noise`` block (``NoiseBank.draw``, which the PACE
objective opens around every forward, or ``pace_noise``) one draw serves every adapted layer:
the block hands each layer a ``SharedNoise`` (which holds Z = s·z, the scaling folded in) and
its column offset, and the layer scales, multiplies and adds in one kernel,
``addcmul(W0 x + b0, B A drop(x), Z[:, offset:offset + d_out])``. The layer keeps that state
after the block for the recompute of gradient checkpointing (which runs inside backward);
a forward outside any block, not in a backward, drops it. A layer used on its own (outside any
block) draws its own z from the torch RNG, as ``noise()``.

The two PACE views are the two halves of a doubled batch ([x1..xB, x1..xB]). Inside
``shared_views(model, 2)`` the layers draw their LoRA-dropout mask for the first half and repeat
it, so the views differ only by z. ``ViewSharedDropout`` does the same for the base model's own
dropout modules. This context manager is the only way the layers learn the number of views.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def _first_view_mask(x: torch.Tensor, p: float, views: int) -> torch.Tensor:
    """Inverted-dropout mask for x, drawn for the first 1/views of the rows and repeated."""
    rows = x.shape[0]
    if rows % views:
        raise ValueError(f"batch of {rows} rows cannot be split into {views} PACE views")
    first = x[: rows // views]
    keep = torch.empty_like(first).bernoulli_(1.0 - p) / (1.0 - p)
    return keep.repeat((views,) + (1,) * (x.dim() - 1))


class ViewSharedDropout(nn.Dropout):
    """nn.Dropout whose mask is shared by the views of a doubled batch (docs/PACE.md §1).

    Outside ``shared_views`` (views = 1) it is exactly nn.Dropout.
    """

    views: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.views == 1:
            return super().forward(x)
        return x * _first_view_mask(x, self.p, self.views)


class SharedNoise:
    """One forward's Z = s·z for every adapted layer: [rows, D] (D = Σ d_out of the noised
    layers; s the layer's scaling), cast to each activation dtype once. ``open`` while its ``pace_noise`` block runs; after
    the block it serves only recomputes inside backward (gradient checkpointing)."""

    def __init__(self, z: torch.Tensor, casts: dict[torch.dtype, torch.Tensor] | None = None):
        self._by_dtype = {z.dtype: z, **(casts or {})}
        self.rows = z.shape[0]
        self.open = True

    def columns(self, offset: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Z[:, offset:offset + width] in ``dtype`` (a view of the one cast per dtype)."""
        z = self._by_dtype.get(dtype)
        if z is None:
            z = self._by_dtype[dtype] = self._by_dtype[torch.float32].to(dtype)
        return z[:, offset:offset + width]


def _in_backward() -> bool:
    """True while the autograd engine runs (where gradient checkpointing recomputes)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is None or task() != -1


class NoisyLoRALinear(nn.Module):
    """A frozen linear layer plus a LoRA adapter whose output is multiplied by N(1, σ²) noise.

    Args:
        base: the frozen layer (nn.Linear, or a bitsandbytes Linear4bit / Linear8bitLt).
        r: adapter rank.
        alpha: scaling numerator; ``scaling = alpha / r`` (``alpha / sqrt(r)`` if rslora).
        dropout: dropout on the adapter input, mask shared by the PACE views.
        sigma: noise std for this layer (already scheduled by depth); 0 = plain LoRA.
        rslora: rank-stabilised scaling.

    State: ``scaling``, ``sigma``, ``merged`` (s·BA folded into W0), ``disabled`` (adapter
    bypassed: the base model), ``views`` (set only by ``shared_views``), ``shared_noise``
    ((SharedNoise, column offset), set only by ``pace_llm.noise.pace_noise``).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 sigma: float = 0.0, rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.rslora = rslora
        self.dropout = dropout
        self.sigma = float(sigma)
        self.merged = False
        self.disabled = False
        self.views = 1
        self.shared_noise: tuple[SharedNoise, int] | None = None
        for p in self.base.parameters():
            p.requires_grad_(False)
        dtype = _adapter_dtype(base)
        device = _param_device(base)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters this layer declares: [A, B]."""
        return [self.lora_A, self.lora_B]

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:.4g}, sigma={self.sigma:.4g}, dropout={self.dropout}")

    def noise(self, rows: int, ndim: int, like: torch.Tensor) -> torch.Tensor:
        """z ~ N(1, σ²) of shape [rows, 1, …, d_out] from the torch RNG: fp32 draw, cast to
        ``like``'s dtype (a layer used outside a ``pace_noise`` block)."""
        shape = (rows,) + (1,) * (ndim - 2) + (self.out_features,)
        with torch.no_grad():
            z = torch.randn(shape, device=like.device, dtype=torch.float32).mul_(self.sigma).add_(1.0)
        return z.to(like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.disabled:
            if self.merged:
                raise RuntimeError("cannot disable an adapter while it is merged; call unmerge() first")
            return out
        if self.merged:
            if self.training and self.sigma > 0:
                raise RuntimeError("a merged NoisyLoRALinear cannot train with noise; unmerge() first")
            return out
        h = x.to(self.lora_A.dtype)
        if self.training and self.dropout > 0:
            h = h * _first_view_mask(h, self.dropout, self.views)
        delta = F.linear(F.linear(h, self.lora_A), self.lora_B)
        if self.training and self.sigma > 0:
            z = self._shared_z(delta, out.dtype)
            if z is not None:  # out + BA drop(x) ⊙ (s·z) in one kernel
                return torch.addcmul(out, delta.to(out.dtype), z)
            delta = delta * self.scaling * self.noise(delta.shape[0], delta.dim(), delta)
        else:
            delta = delta * self.scaling
        return out + delta.to(out.dtype)

    def _shared_z(self, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """This layer's columns of the block's Z = s·z, shaped [rows, 1, …, d_out], or None."""
        if self.shared_noise is None:
            return None
        noise, offset = self.shared_noise
        if not noise.open and not _in_backward():  # a forward after the block: not its noise
            self.shared_noise = None
            return None
        if noise.rows != delta.shape[0]:
            raise ValueError(f"PACE noise was drawn for {noise.rows} rows but a layer got a batch "
                             f"of {delta.shape[0]}")
        z = noise.columns(offset, self.out_features, dtype)
        return z.view(z.shape[0], *([1] * (delta.dim() - 2)), z.shape[1])

    def delta_weight(self) -> torch.Tensor:
        """s · B A in fp32, shape [d_out, d_in]."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·BA into W0 (idempotent). Not for quantized bases: export dequantizes first."""
        if self.merged:
            return
        weight = _plain_weight(self.base)
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError(f"NaN/inf in the adapter of {self!r}; refusing to merge it")
        weight.copy_((weight.float() + delta).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract s·BA from W0 again (idempotent); restores W0 to fp32 rounding."""
        if not self.merged:
            return
        weight = _plain_weight(self.base)
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False


def _plain_weight(base: nn.Module) -> torch.Tensor:
    if type(base) is not nn.Linear:
        raise TypeError(f"merge() needs a plain nn.Linear base, got {type(base).__name__}; "
                        "quantized bases are merged into a dequantized copy at export")
    return base.weight


def _param_device(base: nn.Module) -> torch.device:
    for p in base.parameters():
        return p.device
    return torch.device("cpu")


def _adapter_dtype(base: nn.Module) -> torch.dtype:
    """Adapters live in the base's float dtype, or the compute dtype of a quantized base."""
    compute = getattr(base, "compute_dtype", None)
    if isinstance(compute, torch.dtype):
        return compute
    weight = getattr(base, "weight", None)
    if weight is not None and weight.dtype.is_floating_point:
        return weight.dtype
    return torch.float32


def lora_layers(model: nn.Module) -> Iterator[tuple[str, NoisyLoRALinear]]:
    """(name, layer) for every NoisyLoRALinear in the model."""
    for name, module in model.named_modules():
        if isinstance(module, NoisyLoRALinear):
            yield name, module


@contextmanager
def shared_views(model: nn.Module, views: int) -> Iterator[None]:
    """Within this block, every forward sees a batch of ``views`` stacked copies.

    LoRA-dropout masks and the base model's dropout masks are drawn for the first copy and
    repeated, so the copies differ only by the PACE noise z.
    """
    modules = [m for m in model.modules() if isinstance(m, (NoisyLoRALinear, ViewSharedDropout))]
    for m in modules:
        m.views = views
    try:
        yield
    finally:
        for m in modules:
            m.views = 1


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within this block the model is the base model (every adapter bypassed)."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m in layers:
            m.disabled = False


@contextmanager
def noise_free(model: nn.Module) -> Iterator[None]:
    """Within this block every module is in eval mode (no PACE noise, no dropout); afterwards
    each module gets back its own mode, so a block nested in another eval block (or a model
    whose wrapper and inner model differ) leaves the outer mode intact."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
