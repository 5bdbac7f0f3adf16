"""The flat optimizer (pace_llm/flat_optim.py) against torch.optim.AdamW on separate tensors,
and the flat path against DeepSpeed's own path in real runs (fp32 on 1 and 2 ranks, bf16)."""

from __future__ import annotations

import copy

import pytest
import torch

from pace_llm.errors import UserError
from pace_llm.flat_optim import FlatAdamW, engine_config, uses_flat
from tests.test_engine import DS, rel_close, train_ok

SHAPES = [(4, 3), (5,), (2, 2, 3)]


def params(dtype=torch.float32, seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def grads(step: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [scale * torch.randn(s, generator=g) for s in SHAPES]


def reference_step(ref, opt, gs, max_norm):
    """torch AdamW on separate tensors, clipped as torch.nn.utils.clip_grad_norm_ does."""
    for p, g in zip(ref, gs):
        p.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_(ref, max_norm) if max_norm else None
    opt.step()
    return norm


@pytest.mark.parametrize("wd,max_norm,scale", [(0.0, 0.0, 1.0), (0.1, 0.0, 1.0),
                                                (0.1, 1.0, 3.0)])
def test_flat_adamw_equals_torch_adamw(wd, max_norm, scale):
    ref = params()
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=wd)
    flat_params = params()
    flat = FlatAdamW(flat_params, lr=1e-2, weight_decay=wd, max_grad_norm=max_norm)
    for step in range(5):
        gs = grads(step, scale)
        want_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in gs]))
        reference_step(ref, ref_opt, gs, max_norm)
        for p, g in zip(flat_params, gs):
            p.grad = g.clone()
        flat.step()
        assert float(flat.last_norm) == pytest.approx(float(want_norm), rel=1e-6)
        assert not bool(flat.last_skipped)
        for a, b in zip(ref, flat_params):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (step, (a - b).abs().max())
            assert b.grad is None
    if max_norm:  # the scale makes every step clip
        assert float(flat.last_norm) > max_norm


def test_accumulation_and_clipped_update_by_hand():
    ps = params()
    flat = FlatAdamW(ps, lr=0.1, weight_decay=0.0, max_grad_norm=0.5)
    before = [p.detach().clone() for p in ps]
    for part in (grads(0), grads(1)):  # two micro-batches
        for p, g in zip(ps, part):
            p.grad = g.clone()
        flat.accumulate()
    total = [a + b for a, b in zip(grads(0), grads(1))]
    flat.step()
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in total]))
    assert float(flat.last_norm) == pytest.approx(float(norm), rel=1e-6)
    c = 0.5 / (float(norm) + 1e-6)
    for p, b, g in zip(ps, before, total):
        # first AdamW step: m̂ = c·g, v̂ = (c·g)², θ −= lr · m̂ / (|m̂| + eps)
        cg = c * g
        want = b - 0.1 * cg / (cg.abs() + 1e-8)
        assert torch.allclose(p.detach(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("how", ["nan_grad", "flag"])
def test_non_finite_step_is_skipped_on_the_device(how):
    ps = params()
    flat = FlatAdamW(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    for p, g in zip(ps, grads(0)):
        p.grad = g
    flat.step()
    state = {k: v.clone() for k, v in flat.state[flat.master].items()}
    before = [p.detach().clone() for p in ps]
    gs = grads(1)
    if how == "nan_grad":
        gs[1][0] = float("nan")
    else:
        flat.skip_if(torch.tensor(True))
    for p, g in zip(ps, gs):
        p.grad = g
    flat.step()
    assert bool(flat.last_skipped)
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)
    for k, v in flat.state[flat.master].items():
        assert torch.equal(v, state[k]), k
    assert float(state["step"]) == 1.0
    for p, g in zip(ps, grads(2)):  # the next finite step applies, as step 2
        p.grad = g
    flat.step()
    assert not bool(flat.last_skipped) and float(flat.state[flat.master]["step"]) == 2.0


def test_bf16_params_keep_an_fp32_master_and_state_round_trips():
    ps = params(torch.bfloat16)
    flat = FlatAdamW(ps, lr=1e-3, weight_decay=0.0, max_grad_norm=0.0)
    assert flat.master.dtype == torch.float32 and flat.flat.dtype == torch.bfloat16
    for step in range(3):
        for p, g in zip(ps, grads(step)):
            p.grad = g.to(torch.bfloat16)
        flat.step()
    assert torch.equal(flat.flat, flat.master.to(torch.bfloat16))
    assert not torch.equal(flat.master, flat.master.to(torch.bfloat16).float())  # fp32 bits kept
    sd = copy.deepcopy(flat.state_dict())  # as saved to disk: no shared tensors
    saved = {k: v.clone() for k, v in flat.state[flat.master].items()}
    master = flat.master.clone()
    other_ps = params(torch.bfloat16, seed=1)
    other = FlatAdamW(other_ps, lr=1e-3, weight_decay=0.0, max_grad_norm=0.0)
    other.load_state_dict(sd)
    assert torch.equal(other.master, master)
    for a, b in zip(ps, other_ps):
        assert torch.equal(a.detach(), b.detach())
    for k, v in other.state[other.master].items():
        assert torch.equal(v, saved[k]), k
    # both continue identically
    for opt, ps_ in ((flat, ps), (other, other_ps)):
        for p, g in zip(ps_, grads(9)):
            p.grad = g.to(torch.bfloat16)
        opt.step()
    assert torch.equal(flat.master, other.master)


def test_lambda_lr_drives_the_flat_group():
    flat = FlatAdamW(params(), lr=1.0, weight_decay=0.0, max_grad_norm=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(flat, lambda s: 0.5 ** s)
    for _ in range(3):
        flat.step()
        sched.step()
    assert flat.param_groups[0]["lr"] == pytest.approx(0.125)


def test_the_path_choice():
    assert uses_flat("auto", 0, "bf16", False) and uses_flat("flat", 0, "fp32", False)
    assert uses_flat("auto", 2, "bf16", False) and not uses_flat("auto", 3, "bf16", False)
    assert not uses_flat("auto", 0, "fp16", False) and not uses_flat("auto", 1, "fp32", True)
    assert not uses_flat("deepspeed", 0, "bf16", False)
    assert not uses_flat("auto", 0, "bf16", False, uniform=False)
    with pytest.raises(UserError, match="optimizer_path: flat needs ZeRO-0/1/2.*ZeRO-3"):
        uses_flat("flat", 3, "bf16", False)
    cfg = engine_config({"bf16": {"enabled": True}, "gradient_clipping": 1.0,
                         "zero_optimization": {"stage": 2, "overlap_comm": False}})
    assert cfg == {"bf16": {"enabled": False}, "gradient_clipping": 0.0,
                   "zero_optimization": {"stage": 0, "overlap_comm": False}}


def test_a_checkpoint_from_before_the_flat_path_resumes_on_deepspeeds_path():
    from pace_llm.checkpoint import recipe_changes
    from pace_llm.schema import Recipe, recipe_to_dict

    saved = recipe_to_dict(Recipe())
    del saved["train"]["optimizer_path"]  # written before the key existed
    now = recipe_to_dict(Recipe())
    refused, _ = recipe_changes(saved, now)
    assert refused == ["train.optimizer_path 'deepspeed' -> 'auto'"]
    now["train"]["optimizer_path"] = "deepspeed"
    assert recipe_changes(saved, now) == ([], [])


# ------------------------------------------------------------------ real runs
@pytest.mark.multiproc
@pytest.mark.parametrize("world,stage", [(1, 0), (2, 0), (2, 2)])
def test_flat_path_follows_deepspeeds_path(tiny_base, tmp_path, world, stage):
    """fp32: the flat path's loss and grad-norm curves are DeepSpeed's own (clipping on, weight
    decay on, accumulation of two micro-batches); at ZeRO-2 on two ranks its state is sharded."""
    common = dict(train__micro_batch_size=2, train__grad_accum=2, train__max_grad_norm=0.5,
                  train__weight_decay=0.01, eval__at_start=False,
                  deepspeed=DS / f"zero{stage}.json")
    ds, _ = train_ok(tiny_base, tmp_path / "ds", world=world, train__optimizer_path="deepspeed",
                     **common)
    flat, _ = train_ok(tiny_base, tmp_path / "flat", world=world, train__optimizer_path="flat",
                       **common)
    assert len(ds) == len(flat) == 10
    assert rel_close([r["task_loss"] for r in ds], [r["task_loss"] for r in flat])
    assert rel_close([r["grad_norm"] for r in ds], [r["grad_norm"] for r in flat], 1e-4)
    assert max(r["grad_norm"] for r in flat) > 0.5  # clipping was active


@pytest.mark.multiproc
def test_flat_bf16_follows_fp32(tiny_base, tmp_path):
    common = dict(train__max_steps=3, eval__at_start=False, train__micro_batch_size=2)
    ref, _ = train_ok(tiny_base, tmp_path / "fp32", **common)
    got, _ = train_ok(tiny_base, tmp_path / "bf16", train__precision="bf16", **common)
    for a, b in zip([r["task_loss"] for r in ref], [r["task_loss"] for r in got], strict=True):
        assert abs(a - b) / a < 0.02
