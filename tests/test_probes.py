"""The eval record's mechanism helpers: the Hutchinson output-gradient estimate against an exact
Jacobian, and the noise-free block that keeps each module's own mode."""

from __future__ import annotations

import torch
from torch import nn

from pace_llm.probes import jacobian_sq_norm
from pace_llm.lora import NoisyLoRALinear, noise_free


def _adapted(seed: int = 0) -> NoisyLoRALinear:
    torch.manual_seed(seed)
    layer = NoisyLoRALinear(nn.Linear(8, 6), r=3, alpha=6, sigma=1.0)
    with torch.no_grad():
        layer.lora_B.normal_()  # a trained-looking adapter: ∂f/∂A is not zero
    return layer


def test_hutchinson_matches_the_exact_jacobian_norm():
    layer = _adapted().eval()
    x = torch.randn(5, 8)
    params = [layer.lora_A, layer.lora_B]
    f = torch.tanh(layer(x)) ** 2
    exact = 0.0
    for k in range(f.numel()):  # one backward per output element
        grads = torch.autograd.grad(f.flatten()[k], params, retain_graph=True)
        exact += sum(float(g.pow(2).sum()) for g in grads)
    estimate = jacobian_sq_norm(f, params, probes=4000, seed=0)
    assert abs(estimate - exact) < 0.05 * exact, (estimate, exact)
    # seeded: the same probes give the same figure, another seed another draw
    again = jacobian_sq_norm(torch.tanh(layer(x)) ** 2, params, probes=8, seed=3)
    assert again == jacobian_sq_norm(torch.tanh(layer(x)) ** 2, params, probes=8, seed=3)
    assert again != jacobian_sq_norm(torch.tanh(layer(x)) ** 2, params, probes=8, seed=4)


def test_noise_free_switches_noise_off_and_restores_each_modules_mode():
    inner = _adapted()
    outer = nn.Sequential(inner, nn.Dropout(0.5))
    outer.train()
    inner.eval()  # e.g. an evaluator put the inner model in eval mode, the wrapper trains
    x = torch.randn(4, 8)
    torch.manual_seed(1)
    with noise_free(outer):
        assert not outer.training and not inner.training
        assert torch.equal(outer(x), outer(x))  # σ = 1 but no noise, no dropout
    assert outer.training and not inner.training and outer[1].training
    inner.train()
    assert not torch.equal(inner(x), inner(x))  # noise is back in training mode
