"""Training runs on both engines (CPU, gloo): ZeRO equivalence, PACE modes, resume, signals and
bad input. Multi-rank runs are forked from the test process (tests/launch.py, which also holds
the tiny run's command line and record readers these tests share)."""

from __future__ import annotations

import json
import random
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import DS, Ranks, adapter_numel, argv, ckpt_exists, rel_close, run, train_ok


@pytest.mark.multiproc
def test_zero_stages_and_accumulation_give_the_same_curve(tiny_base, tmp_path):
    ref, ref_eval = train_ok(tiny_base, tmp_path / "z0", train__clean_grad_norm_every=1)
    # the eval record's clean gradient norm on the fixed rows (split across ranks below)
    fixed = [e["eval"]["clean_grad_norm"] for e in ref_eval]
    out_grad = [e["eval"]["output_grad_norm"] for e in ref_eval]
    assert fixed[-1] > 0 and out_grad[-1] > 0
    curve = [r["task_loss"] for r in ref]
    assert len(curve) == 10 and curve[-1] < curve[0]
    # without noise the clean task-gradient norm is the training gradient norm
    clean = [r["clean_grad_norm"] for r in ref]
    assert rel_close(clean, [r["grad_norm"] for r in ref])
    accum, _ = train_ok(tiny_base, tmp_path / "accum", train__micro_batch_size=2,
                        train__grad_accum=2)
    assert rel_close(curve, [r["task_loss"] for r in accum])
    for stage in (1, 2, 3):
        out = tmp_path / f"z{stage}"
        got, got_eval = train_ok(tiny_base, out, world=2, train__micro_batch_size=2,
                                 deepspeed=DS / f"zero{stage}.json", train__clean_grad_norm_every=1)
        assert rel_close(curve, [r["task_loss"] for r in got]), (stage, curve, got)
        assert rel_close(fixed, [e["eval"]["clean_grad_norm"] for e in got_eval], 1e-4), stage
        assert rel_close(out_grad, [e["eval"]["output_grad_norm"] for e in got_eval], 1e-4), stage
        assert rel_close(clean, [r["clean_grad_norm"] for r in got], 1e-4), stage
        record = json.loads((out / "engine.json").read_text())
        if stage < 3:  # fp32 at ZeRO-1/2: the flat engine, DeepSpeed not initialised (and said)
            assert record["engine"] == "flat" and record["deepspeed_config"] is None, stage
            assert not (out / "ds_config.json").exists()
            continue
        cfg = json.loads((out / "ds_config.json").read_text())  # what DeepSpeed received
        assert record["engine"] == "deepspeed" and record["deepspeed_config"] == cfg
        # "auto" gradient buckets hold the adapter, not DeepSpeed's default 5e8 elements
        assert cfg["zero_optimization"]["reduce_bucket_size"] == adapter_numel(out), stage
        # the tiny base really was partitioned
        assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    # full mode with sigma = 0: the task loss is plain LoRA's and the consistency term is 0
    zero_noise, _ = train_ok(tiny_base, tmp_path / "full0", pace__mode="full", pace__sigma=0.0)
    assert rel_close(curve, [r["task_loss"] for r in zero_noise])
    assert all(r["consistency_loss"] == 0.0 for r in zero_noise)


@pytest.mark.multiproc
def test_pace_noise_does_not_depend_on_the_world_size(tiny_base, tmp_path):
    """PACE full with noise and a consistency term: one process at ZeRO-0 and two at ZeRO-2 train
    the same curve, since an example's noise is keyed by (seed, step, position in the global
    batch, view) and not drawn from a per-rank stream (pace_llm/noise.py)."""
    common = dict(pace__mode="full", pace__sigma=0.5, pace__consistency_weight=0.5,
                  train__max_steps=4, lora__dropout=0.0, eval__at_start=False, eval__limit=2)
    one, _ = train_ok(tiny_base, tmp_path / "one", **common)
    two, _ = train_ok(tiny_base, tmp_path / "two", world=2, train__micro_batch_size=2,
                      deepspeed=DS / "zero2.json", **common)
    for key in ("task_loss", "consistency_loss", "grad_norm"):
        a, b = [r[key] for r in one], [r[key] for r in two]
        assert len(a) == 4 and rel_close(a, b), (key, a, b)
    assert all(r["consistency_loss"] > 0 for r in one[1:])  # B = 0 at step 1 only


@pytest.mark.multiproc
@pytest.mark.parametrize("mode", ["full", "lazy"])
def test_pace_modes_train_and_consistency_falls(tiny_base, tmp_path, mode):
    rows, evals = train_ok(tiny_base, tmp_path / mode, pace__mode=mode, train__max_steps=24,
                           train__lr=1e-2, pace__lazy_interval=2, pace__consistency_weight=1.0)
    cons = [r["consistency_loss"] for r in rows if r["consistency_loss"] > 0]
    assert len(cons) >= (20 if mode == "full" else 10)
    # B starts at zero, so the views agree at first; the term rises as the adapter grows and
    # then falls as training makes the adapter robust to the noise
    peak = max(range(len(cons)), key=cons.__getitem__)
    tail = cons[-3:]
    assert peak < len(cons) - 3 and sum(tail) / 3 < 0.8 * cons[peak], cons
    assert rows[-1]["task_loss"] < rows[0]["task_loss"]
    assert evals[-1]["eval"]["fp_distance"] > 0


@pytest.mark.multiproc
def test_mechanism_full_lowers_output_gradient_and_fp_distance(tiny_base, tmp_path):
    """The paper's claim on one run pair (same seed, steps, data): with PACE the adapter-weight
    gradient of the output, ‖∂f/∂θ‖ (what Thm 2 penalises and the paper plots), and the
    FP-distance to the base are lower at the end. The task-loss gradient norms are printed for
    the record: `full` has fitted less here, so its task gradient is the larger one
    (bench/RESULTS.md)."""
    common = dict(train__max_steps=30, train__lr=2e-3, pace__sigma=1.0,
                  pace__consistency_weight=1.0, train__log_every=5,
                  train__clean_grad_norm_every=5)
    off, off_eval = train_ok(tiny_base, tmp_path / "off", pace__mode="off", **common)
    full, full_eval = train_ok(tiny_base, tmp_path / "full", pace__mode="full", **common)
    end_off, end_full = off_eval[-1]["eval"], full_eval[-1]["eval"]
    print(f"output gradient norm at step 0 {off_eval[0]['eval']['output_grad_norm']:.4f}, "
          f"at the end off {end_off['output_grad_norm']:.4f} "
          f"full {end_full['output_grad_norm']:.4f}; "
          f"FP-distance off {end_off['fp_distance']:.5f} full {end_full['fp_distance']:.5f}; "
          f"task-loss gradient norm (fixed rows) off {end_off['clean_grad_norm']:.4f} "
          f"full {end_full['clean_grad_norm']:.4f}; training-loss grad norm "
          f"off {off[-1]['grad_norm']:.4f} full {full[-1]['grad_norm']:.4f}")
    # at step 0 (B = 0) both runs are the base model: same output gradient, FP-distance 0
    assert off_eval[0]["step"] == 0 and full_eval[0]["step"] == 0
    assert rel_close([off_eval[0]["eval"]["output_grad_norm"]],
                     [full_eval[0]["eval"]["output_grad_norm"]])
    assert off_eval[0]["eval"]["fp_distance"] == 0.0
    # LoRA raises the output's sensitivity to the adapter above the starting point; PACE pushes
    # it below (the starting point is the base model with B = 0)
    start = off_eval[0]["eval"]["output_grad_norm"]
    assert end_off["output_grad_norm"] > start > end_full["output_grad_norm"]
    assert end_off["output_grad_norm"] > 0
    assert end_full["output_grad_norm"] < 0.75 * end_off["output_grad_norm"]
    assert end_off["fp_distance"] > 0 and end_full["fp_distance"] < 0.5 * end_off["fp_distance"]


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [0, 2])
def test_sigkill_then_resume_is_bit_identical(tiny_base, tmp_path, stage):
    common = dict(deepspeed=DS / f"zero{stage}.json", train__micro_batch_size=2,
                  train__max_steps=12, train__save_every=3, pace__mode="full",
                  eval__limit=2)
    ref = tmp_path / "ref"
    train_ok(tiny_base, ref, world=2, **common)
    out = tmp_path / "killed"
    ranks = Ranks(argv(tiny_base, out, **common), 2, tmp_path / "killed-logs")
    kill_after = random.Random(stage).choice([3, 6])
    ranks.kill_when(ckpt_exists(out, kill_after))
    assert not (out / "adapter").exists()
    train_ok(tiny_base, out, world=2, train__resume="auto", **common)
    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.multiproc
def test_sigterm_saves_and_exits_zero(tiny_base, tmp_path):
    out = tmp_path / "run"
    ranks = Ranks(argv(tiny_base, out, train__max_steps=100000, pace__mode="full"), 1,
                  tmp_path / "logs")
    first_log = lambda: (out / "metrics.jsonl").exists() and "task_loss" in (out / "metrics.jsonl").read_text()  # noqa: E731
    import time

    deadline = time.time() + 120
    while not first_log() and time.time() < deadline:
        time.sleep(0.05)
    ranks.signal(signal.SIGTERM)
    assert ranks.wait(120) == [0]
    log = ranks.output()
    assert "--train.resume auto" in log
    steps = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")]
    assert len(steps) == 1 and steps[0] >= 1


@pytest.mark.multiproc
def test_truncated_checkpoint_is_skipped(tiny_base, tmp_path):
    out = tmp_path / "run"
    train_ok(tiny_base, out, train__max_steps=6, train__save_every=3, train__keep_last=3)
    newest = out / "checkpoints" / "step-6" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a save cut off mid-write
    codes, log = run(argv(tiny_base, out, train__max_steps=8, train__save_every=3,
                          train__resume="auto"), 1, tmp_path / "logs")
    assert codes == [0], log
    assert "skipping checkpoint" in log and "step-6" in log and "truncated" in log
    assert "resumed from" in log and "step-3" in log


def _fails(base, tmp_path, expect: str, world: int = 1, **overrides) -> str:
    out = overrides.pop("out", tmp_path / "run")
    codes, log = run(argv(base, out, **overrides), world, tmp_path / "logs")
    assert codes == [2] * world, log
    assert expect in log, log
    assert "Traceback" not in log
    return log


def test_non_empty_output_dir_is_refused_and_kept(tiny_base, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    _fails(tiny_base, tmp_path, "is not empty", out=out)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_ds_json_contradicting_the_recipe(tiny_base, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8,
                               "zero_optimization": {"stage": 2}}))
    _fails(tiny_base, tmp_path, "train_micro_batch_size_per_gpu = 8 contradicts", deepspeed=bad)
    assert not (tmp_path / "run").exists()


def test_fp16_on_cpu_is_refused(tiny_base, tmp_path):
    _fails(tiny_base, tmp_path, "fp16 needs a GPU", train__precision="fp16")
    assert not (tmp_path / "run").exists()


def test_resume_path_that_does_not_exist(tiny_base, tmp_path):
    _fails(tiny_base, tmp_path, "does not exist", train__resume=str(tmp_path / "nope"))


def test_nan_losses_are_skipped_then_stop(tiny_base, tmp_path):
    log = _fails(tiny_base, tmp_path, "consecutive steps had a NaN/inf loss", train__lr=1e30,
                 train__max_bad_steps=3, train__warmup_steps=0, train__max_grad_norm=0.0)
    assert "update skipped" in log
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_in_a_row"] for r in rows if r.get("skipped_step")] == [1, 2, 3]


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [1, 2])
def test_fast_mode_on_glue_classification(tiny_base, tmp_path, data_dir, world):
    """fast: no consistency while every example is unseen (epoch 1), then a falling term
    against last epoch's stored outputs; the head trains and exports as SEQ_CLS."""
    out = tmp_path / "fast"
    rows, evals = train_ok(tiny_base, out, world=world, data__task="glue", data__glue_task="cola",
                           data__path=data_dir / "glue" / "CoLA", data__limit=128,
                           data__max_length=64, train__max_steps=0, train__epochs=4,
                           train__micro_batch_size=8 // world, train__log_every=4,
                           train__lr=5e-3,
                           pace__mode="fast", pace__consistency_weight=0.5, eval__limit=64)
    per_epoch = 16  # 128 rows / 8
    first_epoch = [r["consistency_loss"] for r in rows if r["step"] <= per_epoch]
    later = [r["consistency_loss"] for r in rows if r["step"] > per_epoch]
    assert all(c == 0.0 for c in first_epoch) and all(c > 0 for c in later)
    assert sum(later[-3:]) / 3 < 0.7 * max(later), later
    assert set(evals[-1]["eval"]["metrics"]) == {"matthews", "accuracy"}
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]


@pytest.mark.multiproc
@pytest.mark.parametrize("stage,world", [(0, 1), (3, 2)])
def test_generation_eval_equals_hf_generate(tiny_base, tmp_path, stage, world):
    """The in-loop eval's greedy generations equal HF generate on base + exported adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pace_llm import LoraArgs, PaceArgs, inject_noisy_lora
    from pace_llm.merge import load_peft_adapter

    out = tmp_path / f"gen{stage}"
    _, evals = train_ok(tiny_base, out, world=world, deepspeed=DS / f"zero{stage}.json",
                        train__micro_batch_size=4 // world, train__max_steps=8, train__lr=2e-2,
                        eval__limit=3, eval__max_new_tokens=12, eval__batch_size=2)
    ours = [s["prediction"] for s in evals[-1]["eval"]["samples"]]
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    inject_noisy_lora(model, LoraArgs(r=4, alpha=8), PaceArgs(mode="off"))
    load_peft_adapter(model, out / "adapter")
    model.eval()
    from pace_llm.config import load_recipe
    from pace_llm.data.build import build_task

    recipe = load_recipe(["--recipe", str(out / "recipe.yaml"), "--deepspeed", "null"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    task = build_task(recipe.data, tok)
    theirs = []
    for e in task.eval[:3]:
        ids = torch.tensor([e["prompt_ids"]])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=12, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in gen:
            gen = gen[: gen.index(tok.eos_token_id)]
        theirs.append(tok.decode(gen, skip_special_tokens=True))
    assert ours == theirs
    assert any(t.strip() for t in theirs)


@pytest.mark.multiproc
def test_bf16_training_follows_fp32(tiny_base, tmp_path):
    """bf16 (ZeRO-2, DeepSpeed's bf16 path, as on a GPU) tracks the fp32 curve within bf16's
    precision and exports bf16 tensors by default (export.dtype auto). The flat path's bf16:
    tests/test_flat_optim.py."""
    common = dict(pace__mode="full", train__max_steps=4, deepspeed=DS / "zero2.json",
                  train__optimizer_path="deepspeed")
    ref, _ = train_ok(tiny_base, tmp_path / "fp32", **common)
    got, _ = train_ok(tiny_base, tmp_path / "bf16", train__precision="bf16", **common)
    for a, b in zip([r["task_loss"] for r in ref], [r["task_loss"] for r in got], strict=True):
        assert abs(a - b) / a < 0.02
    tensors = load_file(str(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


@pytest.mark.multiproc
def test_gradient_checkpointing_keeps_the_noisy_curve(tiny_base, tmp_path):
    common = dict(pace__mode="full", train__max_steps=6, pace__sigma=1.0)
    ref, _ = train_ok(tiny_base, tmp_path / "plain", **common)
    got, _ = train_ok(tiny_base, tmp_path / "gc", model__gradient_checkpointing=True, **common)
    assert [r["task_loss"] for r in ref] == [r["task_loss"] for r in got]
    assert [r["consistency_loss"] for r in ref] == [r["consistency_loss"] for r in got]
    assert any(r["consistency_loss"] > 0 for r in got)


@pytest.mark.multiproc
def test_mnli_mismatched_is_evaluated_too(tiny_base, tmp_path):
    from tests.test_tasks_glue import MNLI_HEADER, mnli_row

    labels = ["entailment", "neutral", "contradiction"]
    data = tmp_path / "mnli"
    data.mkdir()
    (data / "train.tsv").write_text(MNLI_HEADER + "".join(mnli_row(i, labels[i % 3])
                                                          for i in range(24)))
    (data / "dev_matched.tsv").write_text(MNLI_HEADER + "".join(mnli_row(i, labels[i % 3])
                                                                for i in range(6)))
    (data / "dev_mismatched.tsv").write_text(MNLI_HEADER + "".join(mnli_row(i, labels[i % 2])
                                                                   for i in range(5)))
    _, evals = train_ok(tiny_base, tmp_path / "run", world=2, data__task="glue",
                        data__glue_task="mnli", data__path=data, train__max_steps=2,
                        train__micro_batch_size=2, data__max_length=64, eval__limit=None)
    last = evals[-1]["eval"]
    assert last["examples"] == 6 and set(last["extra"]) == {"mismatched"}
    assert set(last["extra"]["mismatched"]) == {"accuracy"}


def test_bucket_sizes_follow_the_adapter():
    """"auto" buckets: the trainable element count, capped at DeepSpeed's default 5e8 (ZeRO-3:
    5e7); explicit values and stage-0 configs are left alone."""
    from pace_llm.dsconfig import size_buckets

    cfg = {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto",
                                 "allgather_bucket_size": 123}}
    assert size_buckets(cfg, 4_000_000) == {"reduce_bucket_size": 4_000_000}
    assert cfg["zero_optimization"]["allgather_bucket_size"] == 123
    big = {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}
    size_buckets(big, 10 ** 10)
    assert big["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    z3 = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}
    size_buckets(z3, 10 ** 9)
    assert z3["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    assert size_buckets({"zero_optimization": {"stage": 0}}, 5) == {}


def test_early_stopping_keeps_the_best_adapter(tiny_base, tmp_path):
    """The best evaluation's adapter becomes adapter/ at an early stop, which metrics.jsonl
    records. eval.save_best also keeps it as adapter-best/; patience alone shows no such
    directory (it was kept hidden, and moved into place). The two runs are the same run."""
    adapters = {}
    for save_best in (True, False):
        out = tmp_path / f"run-{save_best}"
        rows, evals = train_ok(tiny_base, out, train__max_steps=40, eval__every=2,
                               eval__patience=2, eval__save_best=save_best)
        # the tiny model's exact match stays at its first value: no gain in 2 evaluations
        assert [e["step"] for e in evals] == [0, 2, 4, 6] and rows[-1]["step"] == 6
        log = (tmp_path / f"run-{save_best}-logs" / "rank0.log").read_text()
        assert "early stop at step 6" in log and "best 0 at step 2" in log
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert last == {"step": 6, "early_stop": {"best_step": 2, "best_metric": 0.0,
                                                  "patience": 2, "evals_without_gain": 2}}
        adapters[save_best] = (out / "adapter" / "adapter_model.safetensors").read_bytes()
        assert (out / "adapter-best").is_dir() == save_best and not (out / ".adapter-best").exists()
        if save_best:
            assert (out / "adapter-best" / "adapter_model.safetensors").read_bytes() == \
                adapters[True]
        assert (out / "curves.png").is_file()
    assert adapters[False] == adapters[True]


def test_a_run_reports_to_tensorboard(tiny_base, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rows, evals = train_ok(tiny_base, out, train__max_steps=4, train__report_to="[tensorboard]")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/task_loss")]
    assert logged == [(r["step"], pytest.approx(r["task_loss"])) for r in rows]
    assert [e.step for e in events.Scalars("eval/fp_distance")] == [e["step"] for e in evals]
