"""PACE noise (pace_llm/noise.py): one draw per forward for every adapted layer, its statistics
per layer, and the keyed stream that makes an example's noise independent of where it lands."""

import pytest
import torch
from torch import nn

from pace_llm import LoraArgs, PaceArgs, inject_noisy_lora
from pace_llm.inject import block_relative
from pace_llm.lora import NoisyLoRALinear, lora_layers, shared_views
from pace_llm.noise import NoiseBank, RowKeys, pace_noise, row_seed
from conftest import noisy_llama, tiny_llama


def constant_layers(sigmas, d=8):
    """Layers whose base outputs 0 and whose adapter outputs 1 per channel for x = ones: the
    output of each is its z."""
    layers = nn.ModuleList()
    for sigma in sigmas:
        layer = NoisyLoRALinear(nn.Linear(d, d, bias=False), r=1, alpha=1.0, sigma=sigma)
        with torch.no_grad():
            layer.base.weight.zero_()
            layer.lora_A.fill_(1.0 / d)
            layer.lora_B.fill_(1.0)
        layers.append(layer)
    return layers.train()


@pytest.mark.parametrize("keyed", [False, True])
def test_one_draw_serves_every_layer_with_its_sigma(keyed):
    torch.manual_seed(0)
    sigmas = [0.7, 0.35, 0.0, 1.2]
    layers = constant_layers(sigmas)
    rows = 3000
    keys = RowKeys(seed=1, step=0, positions=tuple(range(rows))) if keyed else None
    with pace_noise(layers, rows, keys) as shared:
        outs = [layer(torch.ones(rows, 5, 8)) for layer in layers]
    assert shared.rows == rows and shared._by_dtype[torch.float32].shape == (rows, 8 * 3)
    for sigma, z, layer in zip(sigmas, outs, layers):
        assert torch.equal(z, z[:, :1, :].expand_as(z))  # shared by the tokens of a row
        per_row = z[:, 0, :]
        if sigma == 0.0:  # not noised, not in the draw
            assert torch.equal(per_row, torch.ones_like(per_row))
            assert layer.shared_noise is None
            continue
        assert abs(per_row.mean().item() - 1.0) < 0.03
        assert abs(per_row.std().item() - sigma) / sigma < 0.05
        a, b = per_row[::2].flatten(), per_row[1::2].flatten()
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.05
    # independent across layers: layer 0's and layer 3's z are uncorrelated
    a, b = outs[0][:, 0].flatten(), outs[3][:, 0].flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.05


def test_per_depth_sigma_and_skipped_blocks_in_the_draw():
    model = tiny_llama(num_hidden_layers=4)
    inject_noisy_lora(model, LoraArgs(), PaceArgs(sigma=2.0, skip_first_blocks=1))
    model.train()
    bank = NoiseBank(model)
    noised = bank.layers()
    assert {block_relative(n)[0] for n, m in lora_layers(model) if m in noised} == {1, 2, 3}
    torch.manual_seed(3)
    with bank.draw(4000, torch.device("cpu")) as shared:
        for name, layer in lora_layers(model):
            block = block_relative(name)[0]
            if block == 0:
                assert layer.shared_noise is None
                continue
            z = shared.columns(layer.shared_noise[1], layer.out_features, torch.float32)
            z = z / layer.scaling  # the block holds s·z
            want = 2.0 * (4 - block) / 4
            assert abs(z.mean().item() - 1.0) < 0.03 * want, name
            assert abs(z.std().item() - want) / want < 0.03, name


def test_eval_and_sigma_zero_draw_nothing():
    layers = constant_layers([0.5, 0.5]).eval()
    with pace_noise(layers, 4) as shared:
        assert shared is None
        assert torch.equal(layers[0](torch.ones(4, 2, 8)), torch.ones(4, 2, 8))
    layers = constant_layers([0.0, 0.0])
    with pace_noise(layers, 4) as shared:
        assert shared is None


def test_bf16_cast_once_per_dtype():
    layers = constant_layers([0.5, 0.5]).to(torch.bfloat16)
    with pace_noise(layers, 4, RowKeys(0, 0, (0, 1, 2, 3))) as shared:
        out = [layer(torch.ones(4, 3, 8, dtype=torch.bfloat16)) for layer in layers]
        assert out[1].dtype == torch.bfloat16
        z32 = shared.columns(8, 8, torch.float32)
        assert torch.equal(out[1][:, 0], z32.to(torch.bfloat16))
        assert list(shared._by_dtype) == [torch.float32, torch.bfloat16]  # one cast for both


def _keyed(positions, step=0, views=1, seed=5, sigma=0.5):
    layers = constant_layers([sigma])
    keys = RowKeys(seed, step, tuple(positions))
    rows = views * len(positions)
    with pace_noise(layers, rows, keys, views=views):
        return layers[0](torch.ones(rows, 8))


def test_same_key_same_noise_wherever_the_example_lands():
    # one rank with a micro-batch of 4 vs two ranks of 2 (positions 0, 1 | 2, 3), and a
    # micro-batch in another order: an example's z depends on its key only
    whole = _keyed([0, 1, 2, 3], views=2)
    rank0, rank1 = _keyed([0, 1], views=2), _keyed([2, 3], views=2)
    assert torch.equal(whole[[0, 1, 4, 5]], rank0)
    assert torch.equal(whole[[2, 3, 6, 7]], rank1)
    assert torch.equal(_keyed([3, 0]), whole[[3, 0]])
    # and differs across views, examples, steps and seeds
    assert (whole[:4] != whole[4:]).all()                  # view 1 vs view 2
    assert (whole[0] != whole[1]).all()                    # examples
    assert (_keyed([0], step=1) != whole[0]).all()         # steps
    assert (_keyed([0], seed=6) != whole[0]).all()         # seeds
    assert len({row_seed(0, s, p, v) for s in range(20) for p in range(50)
                for v in range(2)}) == 2000


def test_keys_must_match_the_rows():
    layers = constant_layers([0.5])
    with pytest.raises(ValueError, match="3 noise keys for a batch of 4 rows"):
        with pace_noise(layers, 4, RowKeys(0, 0, (0, 1, 2))):
            pass
    with pace_noise(layers, 4), pytest.raises(ValueError, match="drawn for 4 rows"):
        layers[0](torch.ones(2, 8))


def _step_grads(checkpointing: bool, keys: RowKeys):
    model, calls = noisy_llama(checkpointing)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with shared_views(model, 2), pace_noise(model, 4, keys, views=2):
        loss = model(input_ids=torch.cat([ids, ids]), labels=torch.cat([ids, ids])).loss
    torch.manual_seed(99)  # the recompute must not depend on the RNG: it reuses the drawn z
    loss.backward()  # after the block: the recompute runs here
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    forwards = len(calls)
    # a forward after the block (not a recompute) does not reuse the block's z
    layer = model.model.layers[0].self_attn.q_proj
    stale = layer.shared_noise
    torch.manual_seed(0)
    model(input_ids=torch.cat([ids, ids]))
    assert layer.shared_noise is None and stale is not None
    return loss.item(), grads, forwards


def test_gradient_checkpointing_recomputes_with_the_drawn_noise():
    keys = RowKeys(seed=0, step=7, positions=(4, 9))
    loss_a, grads_a, calls_a = _step_grads(False, keys)
    loss_b, grads_b, calls_b = _step_grads(True, keys)
    assert calls_b == 2 * calls_a == 2  # the recompute really ran
    assert loss_a == loss_b
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_row_positions_follow_the_global_batch_layout_even_with_repeated_examples():
    from types import SimpleNamespace

    from pace_llm.data.batches import rank_micro_batches
    from pace_llm.trainer import Trainer

    micro, accum = 3, 2
    for world in (1, 2, 4):
        G = micro * accum * world
        seen = []
        for rank in range(world):
            me = SimpleNamespace(world=world, rank=rank, recipe=SimpleNamespace(
                train=SimpleNamespace(micro_batch_size=micro)))
            slices = rank_micro_batches(list(range(G)), micro, accum, world, rank)
            for a, ids in enumerate(slices):
                assert Trainer.positions(me, a, len(ids)) == tuple(ids)  # position = index
                seen += ids
        assert sorted(seen) == list(range(G))
    # a mixture may hold one example twice in a global batch: its rows still get two keys
    me = SimpleNamespace(world=1, rank=0, recipe=SimpleNamespace(
        train=SimpleNamespace(micro_batch_size=4)))
    assert len(set(Trainer.positions(me, 0, 4))) == 4
