"""The flat optimizer (pace_llm/flat_optim.py) against torch.optim.AdamW on separate tensors,
the engine choice (pace_llm/stepper.py), and the flat engine against DeepSpeed's own engine in
real runs (fp32 on 1 and 2 ranks at ZeRO-0, 1 and 2; bf16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pace_llm.dsconfig import engine_for
from pace_llm.errors import UserError
from pace_llm.flat_optim import FlatAdamW
from tests.launch import DS, argv, rel_close, run, train_ok

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
    shard = {k: v.clone() for k, v in flat.shard_state().items()}  # as saved to disk
    saved = {k: v.clone() for k, v in flat.state[flat.master].items()}
    master = flat.master.clone()
    other_ps = params(torch.bfloat16, seed=1)
    other = FlatAdamW(other_ps, lr=1e-3, weight_decay=0.0, max_grad_norm=0.0)
    other.load_shard_state(shard)
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


def test_the_engine_choice():
    assert engine_for("auto", 0, "bf16", False) == engine_for("flat", 0, "fp32", False) == "flat"
    assert engine_for("auto", 2, "bf16", False) == "flat"
    assert engine_for("auto", 3, "bf16", False) == "deepspeed"
    assert engine_for("auto", 0, "fp16", False) == engine_for("auto", 1, "fp32", True) == \
        "deepspeed"
    assert engine_for("deepspeed", 0, "bf16", False) == "deepspeed"
    assert engine_for("auto", 0, "bf16", False, uniform=False) == "deepspeed"
    with pytest.raises(UserError, match="optimizer_path: flat needs ZeRO-0/1/2.*ZeRO-3"):
        engine_for("flat", 3, "bf16", False)


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
@pytest.mark.parametrize("world,stage", [(1, 0), (2, 0), (2, 1), (2, 2)])
def test_flat_path_follows_deepspeeds_path(tiny_base, tmp_path, world, stage):
    """fp32: the flat engine's loss and grad-norm curves are DeepSpeed's own engine's at the
    same ZeRO stage (its ZeRO-1 and ZeRO-2 optimizers on two ranks; clipping on, weight decay
    on, accumulation of two micro-batches); at ZeRO-1/2 on two ranks the flat engine shards its
    state. Each run records, and says at its start, which engine ran."""
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
    ds_record = json.loads((tmp_path / "ds" / "engine.json").read_text())
    received = json.loads((tmp_path / "ds" / "ds_config.json").read_text())
    assert ds_record["engine"] == "deepspeed" and ds_record["deepspeed_config"] == received
    assert received["zero_optimization"]["stage"] == stage and received["bf16"]["enabled"] is False
    flat_record = json.loads((tmp_path / "flat" / "engine.json").read_text())
    assert flat_record["engine"] == "flat" and flat_record["deepspeed_config"] is None
    assert not (tmp_path / "flat" / "ds_config.json").exists()
    sharded = world if stage in (1, 2) else 1
    assert flat_record["adapter_optimizer"]["state_sharded_over"] == sharded
    assert flat_record["requested"]["zero_stage"] == stage
    assert flat_record["versions"]["deepspeed"] and flat_record["versions"]["torch"]
    log = (tmp_path / "flat-logs" / "rank0.log").read_text()
    assert f"engine flat (torch.distributed; DeepSpeed not initialized) for ZeRO-{stage}" in log
    assert ("AdamW state sharded over 2 ranks" in log) == (sharded == 2)
    assert f"engine DeepSpeed (ZeRO-{stage}, fp32" in (tmp_path / "ds-logs" / "rank0.log"
                                                       ).read_text()


@pytest.mark.multiproc
def test_flat_bf16_follows_fp32(tiny_base, tmp_path):
    common = dict(train__max_steps=3, eval__at_start=False, train__micro_batch_size=2)
    ref, _ = train_ok(tiny_base, tmp_path / "fp32", **common)
    got, _ = train_ok(tiny_base, tmp_path / "bf16", train__precision="bf16", **common)
    for a, b in zip([r["task_loss"] for r in ref], [r["task_loss"] for r in got], strict=True):
        assert abs(a - b) / a < 0.02


# ------------------------------------------------------------------ the DeepSpeed version
def test_deepspeed_outside_the_tested_range_is_refused_with_the_way_out(monkeypatch):
    from pace_llm import stepper

    zero3 = {"zero_optimization": {"stage": 3}}
    for bad in ("0.18.9", "0.16.9", "0.20.0"):
        monkeypatch.setattr(stepper, "_version", lambda name, v=bad: v)
        with pytest.raises(UserError) as err:
            stepper.require_deepspeed("deepspeed", zero3, "bf16")
        msg = str(err.value)
        assert f"deepspeed {bad} is installed" in msg and "(ZeRO-3, bf16)" in msg
        assert "pip install 'deepspeed>=0.19.8,<0.20'" in msg
        assert "flat engine (torch.distributed only" in msg  # the fallback, named
        stepper.require_deepspeed("flat", {"zero_optimization": {"stage": 2}}, "bf16")
    for good in ("0.19.8", "0.19.12", "0.19.9+cu124"):
        monkeypatch.setattr(stepper, "_version", lambda name, v=good: v)
        stepper.require_deepspeed("deepspeed", zero3, "bf16")


def test_pyproject_declares_exactly_the_tested_deepspeed_range():
    import tomllib

    from pace_llm.ds_engine import TESTED

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    low, high = TESTED
    assert f"deepspeed>={low},<{high}" in project["project"]["dependencies"]


@pytest.mark.multiproc
def test_an_untested_deepspeed_stops_a_zero3_run_before_anything_is_written(
        tiny_base, tmp_path, monkeypatch):
    """The forked ranks inherit the patched version; ZeRO-0 (the flat engine) still runs."""
    from pace_llm import stepper

    monkeypatch.setattr(stepper, "_version", lambda name: "0.18.9")
    codes, log = run(argv(tiny_base, tmp_path / "z3", deepspeed=DS / "zero3.json"), 1,
                     tmp_path / "z3-logs")
    assert codes == [2], log
    assert "error: deepspeed 0.18.9 is installed" in log and "Traceback" not in log
    assert not (tmp_path / "z3").exists()
    train_ok(tiny_base, tmp_path / "z0", train__max_steps=2, eval__at_start=False)


def test_flat_engine_params_are_views_of_its_buffer_on_the_engine_device():
    """The engine moves the model to its device before the flat buffer exists, so every trainable
    param is a view of that buffer there (a move afterwards would leave the optimizer stepping
    a buffer the model no longer reads)."""
    from pace_llm.flat_engine import FlatStepper
    from pace_llm.schema import TrainArgs

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    stepper = FlatStepper(model, trainable, TrainArgs(lr=1e-2), max_steps=4,
                          device=torch.device("cpu"), world=1, shard=False)
    buffer = stepper.optimizer.flat.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == buffer for p in trainable)
    assert model[0].weight.untyped_storage().data_ptr() != buffer
    before = [p.detach().clone() for p in trainable]
    model(torch.ones(2, 4)).sum().backward()
    stepper.backward(torch.zeros((), requires_grad=True))  # folds the grads left on the params
    stepper.step(torch.tensor(False))
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, trainable))
