"""Recipe parsing and validation: every problem at once, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pace_llm.config import load_recipe
from pace_llm.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]


def train_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "pace_llm" / "train.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def cli(tmp_path: Path, recipe: str, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    return train_cli("--recipe", str(path), *extra, cwd=tmp_path)


def rejects(tmp_path, recipe: str, *needles: str, extra: tuple[str, ...] = ()) -> str:
    res = cli(tmp_path, recipe, *extra)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr
    assert not (tmp_path / "runs").exists()  # nothing written
    return res.stderr


BASE = "model: {name_or_path: some/model}\n"


def test_negative_rank(tmp_path):
    rejects(tmp_path, BASE + "lora: {r: 0}\n", "lora.r: 0 must be a positive integer")


def test_negative_alpha_and_sigma_and_lambda_all_reported(tmp_path):
    """...and the hub id this offline session cannot get: every problem of a start at once."""
    err = rejects(tmp_path, BASE + "lora: {alpha: -1}\npace: {sigma: -0.5, consistency_weight: -2}\n",
                  "lora.alpha: -1", "pace.sigma: -0.5 must be >= 0",
                  "pace.consistency_weight: -2", "4 problem(s)",
                  "HF_HUB_OFFLINE is set and the hub cache holds no copy of model.name_or_path "
                  "'some/model'")
    assert err.count("\n  - ") == 4


def test_unknown_preset(tmp_path):
    rejects(tmp_path, BASE + "lora: {targets: attention}\n", "unknown preset 'attention'",
            "attn, mlp, attn+mlp, all-linear")


def test_unknown_key_names_the_nearest(tmp_path):
    rejects(tmp_path, BASE + "lora: {rank: 8}\ntrain: {learning_rate: 1.0e-4}\n",
            "unknown key 'lora.rank'", "did you mean 'r'?", "unknown key 'train.learning_rate'")


def test_unknown_section(tmp_path):
    rejects(tmp_path, BASE + "trian: {lr: 0.1}\n", "unknown section 'trian'", "did you mean 'train'?")


def test_bad_enum_value(tmp_path):
    rejects(tmp_path, BASE + "pace: {mode: ful}\n", "pace.mode: 'ful' is not allowed",
            "'off', 'full', 'lazy', 'fast'")


def test_fast_mode_for_causal_lm_gives_the_memory_estimate(tmp_path):
    rejects(tmp_path, BASE + "pace: {mode: fast}\ndata: {task: gsm8k}\n",
            "pace.mode: 'fast' needs a classification", "GB", "Use pace.mode: full or lazy")


def test_wrong_type(tmp_path):
    rejects(tmp_path, BASE + "train: {micro_batch_size: four}\n",
            "train.micro_batch_size: 'four' is not allowed; expected int")


def test_bad_override_on_the_command_line(tmp_path):
    rejects(tmp_path, BASE, "--pace.sigmaa", "did you mean 'sigma'?", extra=("--pace.sigmaa", "1"))


def test_quant_bits(tmp_path):
    rejects(tmp_path, BASE + "quant: {bits: 3}\n", "quant.bits: 3 is not allowed")


def test_missing_recipe_file(tmp_path):
    res = train_cli("--recipe", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_help_lists_keys_with_docstrings():
    res = train_cli("--help")
    assert res.returncode == 0
    assert "--pace.sigma SIGMA" in res.stdout and "z ~ N(1, sigma^2)" in res.stdout


def test_overrides_and_print_config(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(BASE + "lora: {r: 4}\n")
    recipe = load_recipe(["--recipe", str(path), "--lora.r", "16", "--pace.mode", "off"])
    assert recipe.lora.r == 16 and recipe.pace.mode == "off" and recipe.model.name_or_path == "some/model"
    res = train_cli("--recipe", str(path), "--print_config")
    assert res.returncode == 0 and "name_or_path: some/model" in res.stdout


def test_local_rank_from_the_deepspeed_launcher_is_accepted(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(BASE)
    assert load_recipe(["--recipe", str(path), "--local_rank=1"]).model.name_or_path == "some/model"


def test_load_recipe_raises_with_every_problem():
    with pytest.raises(RecipeError) as exc:
        load_recipe(["--lora.r", "-1", "--pace.sigma", "-1"])
    assert len(exc.value.problems) == 3  # r, sigma, and the missing model


def test_schema_task_names_are_the_task_modules():
    """schema.TASKS (the allowed data.task names, the schema imports nothing of the package)
    agrees with pace_llm/tasks: every name is a task module, of the same model kind."""
    import importlib

    from pace_llm import schema, tasks

    assert set(schema.TASKS) == set(tasks.MODULES)
    for name, module in tasks.MODULES.items():
        assert module is importlib.import_module(f"pace_llm.tasks.{name}")
        assert callable(module.task_spec) and callable(module.texts), name
