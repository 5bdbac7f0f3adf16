"""Every shipped recipe parses and validates, opens with its launch command, and says what the
project promises (models, LoRA targets, PACE settings, DeepSpeed config)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pace_llm.config import load_recipe
from pace_llm.tasks.glue import GLUE_TASKS

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name ds_configs/*.json relative to the repo root


def load(name: str):
    return load_recipe(["--recipe", f"recipes/{name}"])


def test_the_expected_recipes_exist():
    names = {p.name for p in RECIPES}
    expected = {"gsm8k.yaml", "gsm8k_qwen.yaml", "glue_sst2_llama.yaml", "instruct_alpaca.yaml",
                "demo.yaml"} | {f"glue_{t}.yaml" for t in GLUE_TASKS}
    assert expected <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_opens_with_its_launch_command(path):
    recipe = load_recipe(["--recipe", str(path.relative_to(REPO))])
    first = path.read_text().splitlines()[0]
    launch = re.fullmatch(r"# (?:Launch: )?((?:deepspeed|python|torchrun) .*)", first)
    assert launch and f" --recipe recipes/{path.name}" in launch.group(1), first
    assert recipe.deepspeed is not None and (REPO / recipe.deepspeed).is_file()


def test_gsm8k_recipe_is_the_papers_setup():
    r = load("gsm8k.yaml")
    assert r.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct"
    assert (r.lora.r, r.lora.targets, r.pace.mode) == (16, "attn+mlp", "full")
    assert (r.data.task, r.data.path, r.data.prompt_style) == ("gsm8k", "openai/gsm8k", "plain")
    assert (r.deepspeed, r.train.precision) == (str(REPO / "ds_configs/zero2.json"), "bf16")
    q = load("gsm8k_qwen.yaml")
    assert q.model.name_or_path.startswith("Qwen/Qwen2.5") and q.data.prompt_style == "chat"


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_glue_recipes(task):
    r = load(f"glue_{task}.yaml")
    assert r.model.name_or_path == "FacebookAI/roberta-base"
    assert (r.lora.targets, r.lora.r) == (["query", "value"], 8)
    assert (r.data.task, r.data.glue_task, r.data.path) == ("glue", task, "nyu-mll/glue")
    assert r.pace.mode == "full" and r.pace.sigma in (0.1, 0.5, 1, 1.5, 2)
    assert r.pace.consistency_weight in (0.02, 0.05, 0.1, 0.2, 0.5, 1)


def test_decoder_classifier_and_instruct_recipes():
    llama = load("glue_sst2_llama.yaml")
    assert llama.model.name_or_path == "meta-llama/Llama-3.2-1B" and llama.data.glue_task == "sst2"
    alpaca = load("instruct_alpaca.yaml")
    assert (alpaca.data.task, alpaca.data.path) == ("instruct", "tatsu-lab/alpaca")
    assert alpaca.model.name_or_path.startswith("Qwen/Qwen2.5")


def test_demo_is_offline_and_small():
    r = load("demo.yaml")
    b = r.model.build
    assert r.model.name_or_path == "" and b["model_type"] == "llama"
    assert b["hidden_size"] // b["num_attention_heads"] >= 32 and 2 <= b["num_hidden_layers"] <= 4
    assert (r.data.task, r.pace.mode, r.train.precision) == ("synthetic", "full", "fp32")
    assert r.deepspeed == str(REPO / "ds_configs/zero0.json")
