"""pace_llm/checks.py: every cheap recipe check runs when the recipe is parsed, before anything
is built, and every problem comes back in one message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pace_llm import quant as Q
from pace_llm.checks import DeepSpeedJSON, optimizer_path_problems
from pace_llm.config import load_recipe, parse_command
from pace_llm.errors import RecipeError, problems_error
from pace_llm.schema import Recipe, TrainArgs

ROOT = Path(__file__).resolve().parents[1]
DS = ROOT / "ds_configs"


def train_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "pace_llm" / "train.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


def test_flat_optimizer_with_zero3_is_refused_before_anything_is_built(tmp_path):
    """The demo builds its base (tokenizer training, random init) first thing in setup: the
    refusal comes before, from the recipe and the DeepSpeed JSON alone."""
    res = train_cli("--recipe", str(ROOT / "recipes" / "demo.yaml"), "--deepspeed",
                    str(DS / "zero3.json"), "--train.optimizer_path", "flat",
                    "--train.output_dir", str(tmp_path / "run"), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip() == (
        "error: train.optimizer_path: flat needs ZeRO-0/1/2, bf16 or fp32 and no CPU offload "
        f"(this run: ZeRO-3 (deepspeed: {DS / 'zero3.json'}), train.precision fp32); use auto "
        "or deepspeed")
    assert list(tmp_path.iterdir()) == []  # no run directory, no base model


def test_every_problem_of_a_command_in_one_message(tmp_path):
    """A bad key in the file, a bad value, a missing model directory and the optimizer path:
    one error, every problem listed (the model path among them, not after them)."""
    (tmp_path / "r.yaml").write_text("lora: {rank: 8}\npace: {sigma: -1}\n")
    res = train_cli("--recipe", str(tmp_path / "r.yaml"), "--model.name_or_path",
                    str(tmp_path / "no_model"), "--deepspeed", str(DS / "zero3.json"),
                    "--train.optimizer_path", "flat", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    head, *rest = res.stderr.strip().splitlines()
    assert head == "error: 4 problem(s) in recipe:", res.stderr
    needles = ["unknown key 'lora.rank' in", "pace.sigma: -1.0 must be >= 0",
               "train.optimizer_path: flat needs ZeRO-0/1/2",
               f"model.name_or_path: '{tmp_path / 'no_model'}' does not exist"]
    assert len(rest) == len(needles), res.stderr
    for needle, line in zip(needles, rest):
        assert line.startswith("  - ") and needle in line, res.stderr


@pytest.mark.parametrize(("path", "stage", "precision", "refused"), [
    ("zero0.json", 0, "auto", False), ("zero2.json", 2, "bf16", False),
    ("zero3.json", 3, "auto", True), ("zero2.json", 2, "fp16", True),
    ("zero3_offload.json", 3, "fp32", True), (None, 0, "fp32", False)])
def test_optimizer_path_rule(path, stage, precision, refused):
    ds = DeepSpeedJSON.read(str(DS / path) if path else None)
    assert (ds.problems, ds.stage, ds.offload) == ([], stage, path == "zero3_offload.json")
    flat = TrainArgs(optimizer_path="flat", precision=precision)
    assert bool(optimizer_path_problems(flat, ds)) == refused
    for other in ("auto", "deepspeed"):  # only an explicit flat is refused
        assert optimizer_path_problems(TrainArgs(optimizer_path=other, precision=precision),
                                       ds) == []


def test_optimizer_path_rule_waits_for_a_readable_stage(tmp_path):
    """A DeepSpeed JSON whose stage cannot be read reports that alone."""
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": 3}))
    ds = DeepSpeedJSON.read(str(tmp_path / "ds.json"))
    assert ds.stage is None and len(ds.problems) == 1
    assert optimizer_path_problems(TrainArgs(optimizer_path="flat"), ds) == []


def _qlora_recipe(tmp_path: Path, bits: int, ds: str) -> list[str]:
    (tmp_path / "model").mkdir(exist_ok=True)  # a local base (a hub id: the hub's rules too)
    (tmp_path / "r.yaml").write_text(json.dumps({
        "model": {"name_or_path": str(tmp_path / "model")}, "quant": {"bits": bits},
        "deepspeed": ds}))
    return ["--recipe", str(tmp_path / "r.yaml")]


def test_qlora_rules_at_parse_time(tmp_path, monkeypatch):
    """QLoRA's rules run when a command about to run parses its recipe (they used to wait for
    setup); loading a recipe to read it (export, tests) does not ask for bitsandbytes."""
    monkeypatch.setattr(Q, "bnb_available", lambda: True)
    argv = _qlora_recipe(tmp_path, 8, str(DS / "zero3.json"))
    with pytest.raises(RecipeError) as err:
        parse_command(argv)
    assert str(err.value).startswith("quant.bits: 8 is not supported with ZeRO-3 (deepspeed: ")
    assert parse_command(argv + ["--deepspeed", str(DS / "zero2.json")]).recipe.quant.bits == 8
    monkeypatch.setattr(Q, "bnb_available", lambda: False)
    argv = _qlora_recipe(tmp_path, 4, str(DS / "zero2.json"))
    with pytest.raises(RecipeError, match=r"quant.bits: 4 needs bitsandbytes.*pace-llm\[quant\]"):
        parse_command(argv)
    assert load_recipe(argv).quant.bits == 4


def test_qlora_rules_on_the_command_line(tmp_path):
    """Through the real CLI: exit 2 naming the key, before the demo's base is built (on a
    machine without bitsandbytes its absence is listed too)."""
    res = train_cli("--recipe", str(ROOT / "recipes" / "demo.yaml"), "--quant.bits", "8",
                    "--deepspeed", str(DS / "zero3.json"), "--train.output_dir",
                    str(tmp_path / "run"), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "quant.bits: 8 is not supported with ZeRO-3" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_model_path_only_for_a_command_about_to_run(tmp_path):
    argv = ["--model.name_or_path", str(tmp_path / "nope")]
    assert load_recipe(argv).model.name_or_path == str(tmp_path / "nope")
    with pytest.raises(RecipeError, match=r"model.name_or_path: '.*nope' does not exist"):
        parse_command(argv)


def test_inert_keys_are_warnings_of_a_command_about_to_run(caplog, tmp_path):
    argv = ["--model.name_or_path", str(tmp_path), "--pace.lazy_interval", "4"]
    load_recipe(argv)
    assert not caplog.records
    parse_command(argv)
    assert [r.getMessage() for r in caplog.records] == [
        ("warning: pace.lazy_interval = 4 has no effect: pace.mode is 'full' (only lazy uses "
         "it); remove it, or set --pace.mode lazy")]


def test_one_problem_format():
    assert str(problems_error("2 problem(s) in x", ["a"])) == "a"
    assert str(problems_error("2 problem(s) in x", ["a", "b"])) == (
        "2 problem(s) in x:\n  - a\n  - b")
    assert str(RecipeError(["a", "b"], source="f.yaml")) == "2 problem(s) in f.yaml:\n  - a\n  - b"



def test_hub_ids_offline_are_read_from_the_cache(tmp_path, monkeypatch):
    """Offline (this session), a hub id is fine when the cache holds it: the hub cache's repo
    folder, or the datasets library's prepared copy; every id it lacks is named at once. A
    local path, the synthetic task and a model.build base name no hub id."""
    from huggingface_hub import constants

    from pace_llm.checks import hub_ids, hub_problems

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    recipe = Recipe()
    recipe.model.name_or_path, recipe.data.task, recipe.data.path = "org/model", "gsm8k", "o/gsm"
    assert hub_ids(recipe) == [("model.name_or_path", "org/model", "model"),
                               ("data.path", "o/gsm", "dataset")]
    [problem] = hub_problems(recipe)
    assert "no copy of model.name_or_path 'org/model' or data.path 'o/gsm'" in problem
    (tmp_path / "hub" / "models--org--model").mkdir(parents=True)
    (tmp_path / "datasets" / "o___gsm").mkdir(parents=True)
    assert hub_problems(recipe) == []
    recipe.data.mix = [{"path": str(tmp_path / "x.jsonl")}, {"path": "o/other", "weight": 2}]
    assert hub_ids(recipe)[1:] == [("data.mix[1].path", "o/other", "dataset")]
    recipe.model.build, recipe.model.name_or_path = {"model_type": "llama"}, ""
    recipe.data.mix, recipe.data.task = None, "synthetic"
    assert hub_ids(recipe) == []
