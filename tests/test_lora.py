"""NoisyLoRALinear: noise statistics, PEFT parity at σ=0, merge/unmerge, shared views."""

import math

import pytest
import torch
from torch import nn

from pace_llm.lora import NoisyLoRALinear, adapters_disabled, shared_views


def make_layer(d_in=16, d_out=12, r=4, alpha=8.0, sigma=0.0, dropout=0.0, rslora=False, seed=0):
    torch.manual_seed(seed)
    layer = NoisyLoRALinear(nn.Linear(d_in, d_out), r=r, alpha=alpha, sigma=sigma,
                            dropout=dropout, rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_()  # non-zero B so the adapter path matters
    return layer


def constant_adapter_layer(sigma: float, d=8):
    """Base outputs 0 and the adapter outputs exactly 1 per channel for x = ones, so out = z."""
    layer = NoisyLoRALinear(nn.Linear(d, d, bias=False), r=1, alpha=1.0, sigma=sigma)
    with torch.no_grad():
        layer.base.weight.zero_()
        layer.lora_A.fill_(1.0 / d)
        layer.lora_B.fill_(1.0)
    return layer


def test_noise_statistics_and_sharing():
    torch.manual_seed(1)
    sigma = 0.7
    layer = constant_adapter_layer(sigma).train()
    x = torch.ones(4000, 5, 8)
    z = layer(x)
    # identical across the tokens of a row
    assert torch.equal(z, z[:, :1, :].expand_as(z))
    per_row = z[:, 0, :]
    assert abs(per_row.mean().item() - 1.0) < 0.02
    assert abs(per_row.std().item() - sigma) / sigma < 0.05
    # independent across rows: the two halves of a doubled batch differ everywhere
    with shared_views(layer, 2):
        zz = layer(torch.ones(6, 3, 8))
    assert (zz[:3] != zz[3:]).all()
    # correlation between rows ~ 0
    a, b = per_row[::2].flatten(), per_row[1::2].flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 0.05


def test_no_noise_in_eval_or_sigma_zero():
    layer = constant_adapter_layer(1.0).eval()
    assert torch.equal(layer(torch.ones(3, 2, 8)), torch.ones(3, 2, 8))
    layer = constant_adapter_layer(0.0).train()
    assert torch.equal(layer(torch.ones(3, 2, 8)), torch.ones(3, 2, 8))


def test_noise_cast_to_activation_dtype():
    layer = constant_adapter_layer(0.5).to(torch.bfloat16).train()
    x = torch.ones(4, 2, 8, dtype=torch.bfloat16)
    assert layer.noise(4, 3, x).dtype == torch.bfloat16
    assert layer(x).dtype == torch.bfloat16


def test_2d_input_noise_per_row():
    layer = constant_adapter_layer(0.5).train()
    z = layer(torch.ones(7, 8))
    assert z.shape == (7, 8)
    assert len(torch.unique(z)) > 7


@pytest.mark.parametrize("rslora", [False, True])
def test_sigma_zero_equals_peft_lora(rslora):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    ours = make_layer(r=4, alpha=8.0, rslora=rslora).train()
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    base.load_state_dict(ours.base.state_dict())
    config = LoraConfig(r=4, lora_alpha=8.0, use_rslora=rslora, lora_dropout=0.0)
    peft = PeftLinear(base, adapter_name="default", config=config, r=4, lora_alpha=8.0,
                      use_rslora=rslora, lora_dropout=0.0)
    with torch.no_grad():
        peft.lora_A["default"].weight.copy_(ours.lora_A)
        peft.lora_B["default"].weight.copy_(ours.lora_B)
    assert math.isclose(ours.scaling, peft.scaling["default"])
    x = torch.randn(3, 5, 16)
    diff = (ours(x) - peft(x)).abs().max().item()
    assert diff <= 1e-6


def test_merge_unmerge_roundtrip():
    layer = make_layer().eval()
    x = torch.randn(4, 3, 16)
    before = layer(x)
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    merged_w = layer.base.weight.detach().clone()
    assert (layer(x) - before).abs().max().item() <= 1e-5
    layer.merge()  # double merge is a no-op
    assert torch.equal(layer.base.weight, merged_w)
    layer.unmerge()
    assert (layer.base.weight - w0).abs().max().item() <= 1e-6
    layer.unmerge()
    assert (layer.base.weight - w0).abs().max().item() <= 1e-6
    assert not layer.merged


def test_merge_refuses_nan():
    layer = make_layer()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.merge()


def test_disabled_is_base():
    layer = make_layer(sigma=1.0).train()
    x = torch.randn(2, 3, 16)
    with adapters_disabled(layer):
        assert torch.equal(layer(x), layer.base(x))
    assert not torch.equal(layer(x), layer.base(x))


def test_dropout_mask_shared_by_views():
    layer = make_layer(dropout=0.5, sigma=0.0).train()
    x1 = torch.randn(3, 4, 16)
    torch.manual_seed(5)
    with shared_views(layer, 2):
        out = layer(torch.cat([x1, x1]))
    assert torch.equal(out[:3], out[3:])
    torch.manual_seed(5)
    out = layer(torch.cat([x1, x1]))  # without the context the masks differ
    assert not torch.equal(out[:3], out[3:])
    assert layer.views == 1


def test_views_must_divide_rows():
    layer = make_layer(dropout=0.1).train()
    with shared_views(layer, 2), pytest.raises(ValueError, match="3 rows"):
        layer(torch.randn(3, 2, 16))


def test_only_adapter_trainable():
    layer = make_layer()
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A", "lora_B"]
