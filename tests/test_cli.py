"""One CLI: every command's bad input is one `error: ...` message and exit code 2; the
resolved recipe is itself a recipe; recipe paths resolve the same from any directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pace_llm.config import load_recipe
from pace_llm.schema import dump_recipe

ROOT = Path(__file__).resolve().parents[1]


def pace_llm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pace_llm.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize(("args", "needle"), [
    (("train", "--recipe", "missing.yaml"), "recipe file 'missing.yaml' does not exist"),
    (("data-check", "--recipe", "missing.yaml"), "recipe file 'missing.yaml' does not exist"),
    (("export", "--run", "missing", "--check", "vllm"), "run directory missing does not exist"),
    (("export", "--dtype", "int8", "--run", "x"), "--dtype"),
    (("trian", "--recipe", "x.yaml"), "unknown command 'trian'; commands: train, export"),
    ((), "no command given"),
])
def test_one_message_format_for_every_command(tmp_path, args, needle):
    res = pace_llm(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_print_config_is_a_recipe_that_runs_from_anywhere(tmp_path):
    res = pace_llm("train", "--recipe", str(ROOT / "recipes" / "gsm8k.yaml"), "--lora.r", "4",
                   "--print_config", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "local_rank" not in res.stdout
    printed = tmp_path / "printed.yaml"
    printed.write_text(res.stdout)
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    again = pace_llm("train", "--recipe", str(printed), "--print_config", cwd=elsewhere)
    assert again.returncode == 0 and again.stdout == res.stdout, again.stderr
    recipe = load_recipe(["--recipe", str(printed)])
    assert recipe.lora.r == 4 and dump_recipe(recipe) == res.stdout


def test_recipe_paths_are_relative_to_the_recipe_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root
    demo = load_recipe(["--recipe", str(ROOT / "recipes" / "demo.yaml")])
    assert demo.deepspeed == str(ROOT / "ds_configs" / "zero0.json")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "data.jsonl").write_text("{}\n")
    (tmp_path / "cfg" / "r.yaml").write_text(
        "model: {name_or_path: org/model}\ndata: {task: gsm8k, path: data.jsonl}\n"
        "deepspeed: ../ds.json\n")
    (tmp_path / "ds.json").write_text("{}")
    r = load_recipe(["--recipe", "cfg/r.yaml"])
    assert r.data.path == str(tmp_path / "cfg" / "data.jsonl")  # exists there: a path
    assert r.model.name_or_path == "org/model"  # no such folder: a hub id, as given
    assert r.deepspeed == str(tmp_path / "ds.json")
    # on the command line a path is relative to the current directory
    r = load_recipe(["--recipe", "cfg/r.yaml", "--deepspeed", "ds.json"])
    assert r.deepspeed == str(tmp_path / "ds.json")


def test_train_help_leads_with_examples():
    res = subprocess.run([sys.executable, str(ROOT / "pace_llm" / "train.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    head = res.stdout.splitlines()
    assert head[0] == "usage: pace-llm train --recipe FILE [--section.key VALUE ...]"
    examples = res.stdout.split("--recipe RECIPE")[0]
    assert "\nexamples:\n  pace-llm train --recipe recipes/demo.yaml " in examples
    assert "\n  deepspeed pace_llm/train.py --recipe recipes/gsm8k.yaml " in examples
