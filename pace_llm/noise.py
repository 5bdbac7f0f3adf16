"""PACE noise: one draw per forward for every adapted layer, from a world-size-free stream
(docs/PACE.md §1).

Layout. The noised layers (training mode, σ_l > 0), in model order, own consecutive column
ranges [o_l, o_l + d_out_l) of a [rows, D] matrix, D = Σ_l d_out_l. One forward draws

    ε ∈ R^{rows×D}, ε_ij ~ N(0, 1) i.i.d. (fp32)
    z = 1 + σ ⊙ ε                     σ ∈ R^D holds σ_l on layer l's columns
    Z = s ⊙ z = s + (s ⊙ σ) ⊙ ε       s ∈ R^D holds layer l's LoRA scaling s_l (one addcmul)

and casts Z once to the activation dtype; layer l computes W0 x + b0 + Z_l ⊙ B A drop(x) with
Z_l = Z[:, o_l:o_l + d_out_l] broadcast over the tokens of each row, in one ``addcmul``
(``lora.NoisyLoRALinear``): the scaling rides in Z, so the layer launches A, B and the addcmul.
So z_l = Z_l / s_l ~ N(1, σ_l²) per (row, output channel), independent across rows, channels and
layers: the distribution of a per-layer draw.

Streams. With ``RowKeys`` (the trainer's), row i's ε_i is ``normal_`` of a generator on the
device seeded with splitmix64(seed, step, position_i, view_i): seed = train.seed, step = the
0-based optimizer step, position = the example's index in the step's global batch (the same at
every world size, grad_accum and micro-batch split: pace_llm/data.py), view = 0 or 1 (the
halves of a doubled batch). An example's noise is thus a pure function of that key: the same on
any rank, in any micro-batch, at any world size, and after a resume (nothing to checkpoint).
Cost: one launch per row (rows = views × micro-batch) plus the addcmul and one cast, whatever
the number of layers (the per-layer draw cost five launches per layer, plus the scaling's).
The values are torch's own normal sampler on that device's generator (Philox on CUDA; mt19937
on the CPU, which keeps only the seed's low 32 bits, so two of a CPU run's row keys share their
noise with probability 2⁻³² per pair), so a CPU run and a GPU run do not share values. Without keys (tests, a caller of the objective that passes none)
ε is one ``torch.randn`` from the torch RNG. Dropout (LoRA and the base model's) still draws
from the torch RNG, whose seed is per rank (setup.SEEDS["noise"]): with dropout > 0 a run
is not world-size free.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pace_llm.lora import NoisyLoRALinear, SharedNoise, lora_layers

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def row_seed(seed: int, step: int, position: int, view: int) -> int:
    """The generator seed of one row's noise: splitmix64 chained over the key, 63 bits."""
    h = 0
    for part in (seed, step, position, view):
        h = _splitmix64(h ^ (part & _MASK))
    return h >> 1


@dataclass(frozen=True)
class RowKeys:
    """The key of every example of a micro-batch: row i of view v is (seed, step,
    positions[i], v)."""

    seed: int
    step: int
    positions: tuple[int, ...]

    def seeds(self, views: int) -> list[int]:
        """Generator seeds of the rows of ``views`` stacked copies (view-major)."""
        return [row_seed(self.seed, self.step, p, v) for v in range(views) for p in self.positions]


class NoiseBank:
    """Draws z for a model's noised layers; keeps the σ vector and a generator per device."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._adapted: list[NoisyLoRALinear] | None = None  # found once: injection is done
        self._vectors: tuple[tuple, torch.Tensor, torch.Tensor] | None = None
        self._generators: dict[torch.device, torch.Generator] = {}

    def layers(self) -> list[NoisyLoRALinear]:
        """The layers that multiply by z in the coming forward, in model order."""
        if self._adapted is None:
            self._adapted = [m for _, m in lora_layers(self.model)]
        return [m for m in self._adapted if m.training and m.sigma > 0]

    def vectors(self, layers: list[NoisyLoRALinear], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, s ⊙ σ) ∈ R^D on ``device``, rebuilt when the layers, s or σ change."""
        key = (device, tuple((id(m), m.scaling, m.sigma, m.out_features) for m in layers))
        if self._vectors is None or self._vectors[0] != key:
            s = torch.cat([torch.full((m.out_features,), m.scaling) for m in layers])
            sigma = torch.cat([torch.full((m.out_features,), m.sigma) for m in layers])
            self._vectors = (key, s.to(device), (s * sigma).to(device))
        return self._vectors[1], self._vectors[2]

    def normal(self, rows: int, width: int, device: torch.device,
               seeds: Sequence[int] | None) -> torch.Tensor:
        """ε [rows, width] fp32: row i from a generator seeded with seeds[i], or one torch.randn."""
        if seeds is None:
            return torch.randn(rows, width, device=device)
        if len(seeds) != rows:
            raise ValueError(f"{len(seeds)} noise keys for a batch of {rows} rows")
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        eps = torch.empty(rows, width, device=device)
        for i, s in enumerate(seeds):
            gen.manual_seed(s)
            eps[i].normal_(generator=gen)
        return eps

    @contextmanager
    def draw(self, rows: int, device: torch.device, keys: RowKeys | None = None,
             views: int = 1) -> Iterator[SharedNoise | None]:
        """Within this block every noised layer multiplies by its columns of one Z [rows, D].

        ``keys``: the rows' keys (``rows`` must be views × len(keys.positions)); None: the torch
        RNG. Yields the SharedNoise (None when no layer is noised: eval, σ = 0). The layers keep
        it after the block for gradient checkpointing's recompute in backward."""
        layers = self.layers()
        if not layers:
            yield None
            return
        s, s_sigma = self.vectors(layers, device)
        with torch.no_grad():
            eps = self.normal(rows, s.numel(), device,
                              keys.seeds(views) if keys is not None else None)
            z = torch.addcmul(s, eps, s_sigma)  # Z = s ⊙ (1 + σ ⊙ ε)
            dtype = layers[0].lora_A.dtype  # the activation dtype, as a rule: cast here, once
            shared = SharedNoise(z, {dtype: z.to(dtype)} if dtype != z.dtype else None)
        offset = 0
        for m in layers:
            m.shared_noise = (shared, offset)
            offset += m.out_features
        try:
            yield shared
        finally:
            shared.open = False


@contextmanager
def pace_noise(model: nn.Module, rows: int, keys: RowKeys | None = None, views: int = 1,
               device: torch.device | None = None) -> Iterator[SharedNoise | None]:
    """``NoiseBank(model).draw(...)`` for one block (tests, scripts); the objective keeps a bank."""
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with NoiseBank(model).draw(rows, device, keys, views) as shared:
        yield shared
