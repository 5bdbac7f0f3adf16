"""Hostile input through the real CLI: every bad recipe, data file, model, DeepSpeed JSON, export
and data-check argument is ONE `error: ...` line (a multi-problem list: its summary line, then
`  - ` lines), exit code 2 and no traceback. A finished run sits under every train case
(`--train.output_dir` it, `--train.overwrite true`): no bad input may change one byte of it.
Keys that have no effect in the chosen mode are warnings (exit 0), not errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA, save_fixture_tokenizer, save_tiny_base

from pace_llm.hub import OFFLINE_FORM
from tests.launch import cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT)}

# a tiny, valid training command; each case adds (and so overrides with) its bad input
TINY = ["--data.max_length", "128", "--train.max_steps", "1", "--train.micro_batch_size", "2",
        "--train.precision", "fp32", "--eval.limit", "2", "--eval.max_new_tokens", "2",
        "--eval.batch_size", "2", "--lora.r", "2", "--lora.alpha", "4",
        "--deepspeed", "{ds}/zero0.json", "--train.output_dir", "{run}",
        "--train.overwrite", "true"]
GLUE = ["--data.task", "glue", "--data.glue_task", "sst2"]


def pace_llm(args: list[str], cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    """``pace-llm ARGS`` in ``cwd``: a child forked from the test process (tests/launch.cli)."""
    return cli(args, cwd, ENV, timeout)


def train(*args: str, model: bool = True, synthetic: bool = True) -> list[str]:
    """A train command: [--recipe FILE,] the tiny flags, then the case's own flags."""
    args_ = list(args)
    head = args_[:2] if args_[:1] == ["--recipe"] else []
    rest = args_[len(head):]
    return (["train", *head, *TINY] + (["--model.name_or_path", "{base}"] if model else [])
            + (["--data.num_examples", "32"] if synthetic else []) + rest)


def check(*args: str) -> list[str]:
    """A data-check command on the tiny base (it reads data exactly as training does)."""
    return ["data-check", "--model.name_or_path", "{base}", *args]


def gsm8k(path: str, eval_path: str | None = None) -> list[str]:
    return ["--data.task", "gsm8k", "--data.path", path, "--data.eval_path", eval_path or path]


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------- the world
def _write_files(w: Path, base: Path, run: Path) -> None:
    """Every bad file the cases point at (the finished run is only ever copied)."""
    good = {"question": "1 + 1?", "answer": "#### 2"}
    line = json.dumps(good) + "\n"
    files: dict[str, str | bytes] = {
        # recipes
        "unknown_key.yaml": "lora: {rank: 8}\n", "unknown_section.yaml": "trian: {lr: 0.1}\n",
        "bad_type.yaml": "train: {micro_batch_size: four}\n", "bad_enum.yaml": "pace: {mode: ful}\n",
        "empty.yaml": "", "comments.yaml": "# nothing but a comment\n", "list.yaml": "- a\n- b\n",
        "binary.yaml": b"\x00\x01\x02\xff recipe", "broken.yaml": "model: {name_or_path: x\n  bad: [\n",
        "latin1.yaml": "model: {name_or_path: caf\xe9}\n".encode("latin-1"),
        "values.yaml": "pace: {sigma: -0.5, consistency_weight: -2}\ntrain: {warmup_steps: -1}\n",
        "packing.yaml": "data: {packing: true}\n",
        # gsm8k data
        "binary.jsonl": b"\x00\x01\x02\xff\xfe",
        "latin1.jsonl": (line + '{"question": "caf\xe9?", "answer": "#### 1"}\n').encode("latin-1"),
        "corrupt.parquet": b"PAR1 this is not parquet at all", "empty.jsonl": "",
        "no_answer.jsonl": line + json.dumps({"question": "2 + 2?"}) + "\n",
        "int_answer.jsonl": line + json.dumps({"question": "q", "answer": 7}) + "\n",
        "not_json.jsonl": line + "{not json\n",
        "no_train/test.jsonl": line,
        # glue (sst2 as jsonl) and instruct
        "glue_missing.jsonl": json.dumps({"sentense": "fine", "label": 1}) + "\n",
        "glue_label.jsonl": json.dumps({"sentence": "fine", "label": 7}) + "\n",
        "glue_latin1.jsonl": '{"sentence": "tr\xe8s bien", "label": 1}\n'.encode("latin-1"),
        "instruct_missing.jsonl": json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n"
        + json.dumps({"instruction": "Say bye."}) + "\n",
        "instruct_binary.jsonl": b"\x89PNG\r\n\x1a\n\x00\x00",
        "instruct.parquet": b"\x00" * 64,
        # DeepSpeed JSON
        "ds_list.json": "[1, 2]", "ds_types.json": json.dumps({"zero_optimization": 3, "bf16": True}),
        "ds_unknown.json": json.dumps({"zero_optimisation": {"stage": 2}}),
        "ds_zero_key.json": json.dumps({"zero_optimization": {"stage": 2, "overlap_comms": True}}),
        "ds_batch.json": json.dumps({"train_micro_batch_size_per_gpu": 8}),
        "ds_optimizer.json": json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1}}}),
        "ds_not_json.json": "{\"zero_optimization\": {\"stage\": 2},}",
        "a_file.txt": "not a directory",
        # chat templates, trackers
        "bad.jinja": "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}",
        "no_wandb/wandb/__init__.py": "raise ModuleNotFoundError(\"No module named 'wandb'\", "
                                      "name='wandb')\n",
        "fake_wandb/wandb/__init__.py": FAKE_WANDB,
    }
    for name, body in files.items():
        path = w / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body) if isinstance(body, bytes) else path.write_text(body)
    (w / "a_dir").mkdir()
    (w / "empty_dir").mkdir()
    # models
    noconf = w / "no_config"
    noconf.mkdir()
    for f in base.glob("tokenizer*"):
        shutil.copy(f, noconf)
    shutil.copytree(base, w / "truncated")
    weights = (w / "truncated" / "model.safetensors").read_bytes()
    (w / "truncated" / "model.safetensors").write_bytes(weights[:1000])
    shutil.copytree(base, w / "bad_config")
    (w / "bad_config" / "config.json").write_text("{not json")
    # adapters: copies of the finished run's adapter with a broken adapter_config.json
    for name, text in {"ad_not_json": "{r: 2", "ad_list": "[1]",
                       "ad_no_r": _adapter_config(run, drop="r"),
                       "ad_alpha": _adapter_config(run, lora_alpha="sixteen")}.items():
        shutil.copytree(run / "adapter", w / name)
        (w / name / "adapter_config.json").write_text(text)


FAKE_WANDB = """
import os


class Table:
    def __init__(self, columns, data):
        pass


class _Run:
    id, project, entity = "fake-run", "pace-llm", None

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, data):
        with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
            f.write(str(data.get("step")) + "\\n")

    def finish(self, exit_code=0):
        pass


def init(**kwargs):  # as W&B: a key is needed; "unreachable": the key is fine, the network not
    if not os.environ.get("WANDB_API_KEY"):
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=...)")
    if os.environ["WANDB_API_KEY"] == "unreachable":
        raise ConnectionError("cannot reach https://api.wandb.ai")
    return _Run()
"""


def _adapter_config(run: Path, drop: str | None = None, **changes) -> str:
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    config.pop(drop, None)
    return json.dumps({**config, **changes})


def _gpt2(out: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = save_fixture_tokenizer(out)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2,
                               n_head=2, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id)).save_pretrained(out)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny base, a finished run (and its hashes), and every bad input, built once."""
    w = tmp_path_factory.mktemp("bad_inputs")
    base = save_tiny_base(w / "base")
    save_tiny_base(w / "small_vocab", vocab_size=100)  # fewer embedding rows than the tokenizer
    _gpt2(w / "gpt2")
    paths = {"w": w, "base": base, "run": w / "run", "ds": ROOT / "ds_configs",
             "gsm8k": DATA / "gsm8k"}
    res = pace_llm([a.format(**paths) for a in train()], cwd=w, timeout=300)
    assert res.returncode == 0 and (w / "run" / "adapter").is_dir(), res.stderr[-3000:]
    _write_files(w, base, w / "run")
    (w / "cwd").mkdir()
    return {**paths, "hashes": hashes(w / "run")}  # type: ignore[dict-item]


# --------------------------------------------------------------------------------- the cases
CASES = [
    # recipes
    ("recipe-unknown-key", train("--recipe", "{w}/unknown_key.yaml"),
     "unknown key 'lora.rank' in {w}/unknown_key.yaml: did you mean 'r'?"),
    ("recipe-unknown-section", train("--recipe", "{w}/unknown_section.yaml"),
     "unknown section 'trian'"),
    ("recipe-bad-type", train("--recipe", "{w}/bad_type.yaml"),
     "train.micro_batch_size: 'four' is not allowed; expected int"),
    ("recipe-bad-enum", train("--recipe", "{w}/bad_enum.yaml"), "pace.mode: 'ful' is not allowed"),
    ("recipe-empty", train("--recipe", "{w}/empty.yaml"), "recipe file '{w}/empty.yaml' is empty"),
    ("recipe-only-comments", train("--recipe", "{w}/comments.yaml"), "is empty"),
    ("recipe-yaml-list", train("--recipe", "{w}/list.yaml"),
     "must hold a mapping of sections, got list"),
    ("recipe-binary", train("--recipe", "{w}/binary.yaml"), "binary.yaml line 1: binary data"),
    ("recipe-latin1", train("--recipe", "{w}/latin1.yaml"), "latin1.yaml line 1: not UTF-8 text"),
    ("recipe-broken-yaml", train("--recipe", "{w}/broken.yaml"),
     "broken.yaml is not valid YAML (line 2"),
    ("recipe-missing", train("--recipe", "{w}/nope.yaml"), ("recipe file '{w}/nope.yaml' does not "
                                                           "exist")),
    ("recipe-directory", train("--recipe", "{w}/a_dir"), "is a directory; give a YAML file"),
    ("recipe-values", train("--recipe", "{w}/values.yaml"), "3 problem(s) in recipe", True),
    ("flag-typo", train("--pace.sigmaa", "1"), "--pace.sigmaa: did you mean 'sigma'?"),
    # keys users bring from peers: where their meaning lives here
    ("peer-load-in-4bit", train("--model.load_in_4bit", "true"),
     "--model.load_in_4bit: 4-bit loading is quant.bits here: --quant.bits 4"),
    ("peer-val-set-size", train("--data.val_set_size", "0.1"),
     "--data.val_set_size: the evaluation hold-out is data.holdout here: the fraction of the "
     "training rows held out when there is no evaluation split"),
    ("peer-packing", train("--data.packing", "true"),
     "--data.packing: pace_llm does not pack examples into one sequence: each global batch is "
     "grouped by length"),
    ("peer-packing-in-a-recipe", train("--recipe", "{w}/packing.yaml"),
     "unknown key 'data.packing' in {w}/packing.yaml: pace_llm does not pack examples"),
    ("holdout-range", train("--data.holdout", "5"),
     "data.holdout: 5.0 must be a fraction between 0 and 1"),
    # data (gsm8k, glue, instruct): through train (its finished run underneath) or data-check
    ("data-missing", check(*gsm8k("{w}/missing.jsonl")),
     "data file '{w}/missing.jsonl' does not exist"),
    ("data-eval-directory", check(*gsm8k("{gsm8k}/train.jsonl", "{w}/a_dir")),
     "data file '{w}/a_dir' is a directory; give a file"),
    ("data-dir-without-train", check(*gsm8k("{w}/no_train", "{w}/no_train/test.jsonl")),
     "has no train.jsonl, train.json or train.parquet (it holds: test.jsonl)"),
    ("data-not-utf8", train(*gsm8k("{w}/latin1.jsonl"), synthetic=False),
     "latin1.jsonl line 2: not UTF-8 text (byte 0xe9"),
    ("data-binary", check(*gsm8k("{w}/binary.jsonl")), "binary.jsonl line 1: binary data"),
    ("data-corrupt-parquet", check(*gsm8k("{w}/corrupt.parquet")),
     "corrupt.parquet: could not be read as parquet"),
    ("data-empty", check(*gsm8k("{w}/empty.jsonl")), "empty.jsonl: the dataset is empty"),
    ("data-missing-field", train(*gsm8k("{w}/no_answer.jsonl"), synthetic=False),
     "no_answer.jsonl row 2: missing field 'answer' (the row has: question)"),
    ("data-wrong-type", check(*gsm8k("{w}/int_answer.jsonl")),
     "int_answer.jsonl row 2: field 'answer' is int 7; expected str"),
    ("data-not-json", check(*gsm8k("{w}/not_json.jsonl")), "not_json.jsonl row 2: not valid JSON"),
    ("data-hub-offline", check("--data.task", "gsm8k", "--data.path", "nobody/no-dataset"),
     "HF_HUB_OFFLINE is set and the hub cache holds no copy of data.path 'nobody/no-dataset'; "
     "give local copies"),
    ("glue-missing-field", check(*GLUE, "--data.path", "{w}/glue_missing.jsonl",
                                 "--data.eval_path", "{w}/glue_missing.jsonl"),
     "glue_missing.jsonl row 1: missing field 'sentence'"),
    ("glue-bad-label", train(*GLUE, "--data.path", "{w}/glue_label.jsonl", "--data.eval_path",
                             "{w}/glue_label.jsonl", synthetic=False),
     "label 7 is outside the label set"),
    ("glue-not-utf8", check(*GLUE, "--data.path", "{w}/glue_latin1.jsonl", "--data.eval_path",
                            "{w}/glue_latin1.jsonl"), "glue_latin1.jsonl line 1: not UTF-8 text"),
    ("glue-bad-task", train("--data.task", "glue", "--data.glue_task", "colaa", "--data.path",
                            "{w}/glue_label.jsonl", synthetic=False),
     "data.glue_task: 'colaa' is not allowed"),
    ("instruct-missing-field", train("--data.task", "instruct", "--data.path",
                                     "{w}/instruct_missing.jsonl", synthetic=False),
     "instruct_missing.jsonl row 2: missing field 'output'"),
    ("instruct-binary", check("--data.task", "instruct", "--data.path",
                              "{w}/instruct_binary.jsonl"),
     "instruct_binary.jsonl line 1: binary data"),
    ("instruct-corrupt-parquet", check("--data.task", "instruct", "--data.path",
                                       "{w}/instruct.parquet"),
     "instruct.parquet: could not be read as parquet"),
    # models
    ("model-missing-dir", train("--model.name_or_path", "{w}/no_such_model"),
     "model.name_or_path: '{w}/no_such_model' does not exist"),
    ("model-is-a-file", train("--model.name_or_path", "{base}/config.json"),
     "is a file; give the model directory"),
    ("model-without-config", train("--model.name_or_path", "{w}/no_config"),
     "directory '{w}/no_config' has no config.json"),
    ("model-config-not-json", train("--model.name_or_path", "{w}/bad_config"),
     "bad_config/config.json is not valid JSON"),
    ("model-truncated-weights", train("--model.name_or_path", "{w}/truncated"),
     "truncated/model.safetensors: the weights cannot be read"),
    ("model-attn-implementation", train("--model.attn_implementation", "fast_attention"),
     "model.attn_implementation: 'fast_attention' is not allowed"),
    ("model-hub-offline", train("--model.name_or_path", "nobody/no-model"),
     "HF_HUB_OFFLINE is set and the hub cache holds no copy of model.name_or_path "
     "'nobody/no-model'; give local copies"),
    ("hub-offline-model-and-data", train("--model.name_or_path", "nobody/no-model",
                                         "--data.task", "gsm8k", "--data.path", "openai/gsm8k",
                                         synthetic=False),
     "no copy of model.name_or_path 'nobody/no-model' or data.path 'openai/gsm8k'"),
    ("model-build-typo", train("--recipe", "{root}/recipes/demo.yaml", "--model.build",
                               "{{model_type: lama, hidden_size: 32}}", model=False),
     "model.build: model_type 'lama' is not a transformers model type; did you mean 'llama'?"),
    ("model-dir-and-build", train("--recipe", "{root}/recipes/demo.yaml"),
     "--model.build null"),
    ("model-gpt2-conv1d", train("--model.name_or_path", "{w}/gpt2"),
     "GPT-2's Conv1D layers are not supported"),
    # DeepSpeed JSON
    ("ds-top-level-list", train("--deepspeed", "{w}/ds_list.json"),
     "ds_list.json: the top level must be a JSON object"),
    ("ds-section-types", train("--deepspeed", "{w}/ds_types.json"),
     "2 problem(s) in recipe", True),
    ("ds-unknown-key", train("--deepspeed", "{w}/ds_unknown.json"),
     "unknown top-level key 'zero_optimisation': did you mean 'zero_optimization'?"),
    ("ds-unknown-zero-key", train("--deepspeed", "{w}/ds_zero_key.json"),
     "zero_optimization.overlap_comms: unknown key; did you mean 'overlap_comm'?"),
    ("ds-contradicting-batch", train("--deepspeed", "{w}/ds_batch.json"),
     "train_micro_batch_size_per_gpu = 8 contradicts the recipe"),
    ("ds-optimizer-section", train("--deepspeed", "{w}/ds_optimizer.json"),
     "remove 'optimizer'/'scheduler'"),
    ("ds-not-json", train("--deepspeed", "{w}/ds_not_json.json"), "as JSON (line 1"),
    ("ds-missing", train("--deepspeed", "{w}/nope.json"), "nope.json' does not exist"),
    # export
    ("export-missing-run", ["export", "--run", "{w}/no_run", "--check", "vllm"],
     "run directory {w}/no_run does not exist"),
    ("export-no-source", ["export", "--out", "{w}/x"], "give exactly one source"),
    ("export-base-without-config", ["export", "--run", "{run}", "--base", "{w}/empty_dir",
                                    "--out", "{w}/x"], "--base {w}/empty_dir has no config.json"),
    ("export-adapter-not-json", ["export", "--adapter", "{w}/ad_not_json", "--check", "vllm"],
     "ad_not_json/adapter_config.json is not valid JSON"),
    ("export-adapter-list", ["export", "--adapter", "{w}/ad_list", "--merge", "--out", "{w}/x"],
     "ad_list/adapter_config.json must hold a JSON object"),
    ("export-adapter-no-r", ["export", "--adapter", "{w}/ad_no_r", "--merge", "--out", "{w}/x"],
     "ad_no_r/adapter_config.json: missing key(s) r"),
    ("export-adapter-alpha-type", ["export", "--adapter", "{w}/ad_alpha", "--check", "vllm"],
     "key 'lora_alpha' is 'sixteen'; expected a positive number"),
    ("export-adapter-is-a-file", ["export", "--adapter", "{w}/a_file.txt", "--check", "vllm"],
     "is a file; give the directory"),
    ("export-bad-dtype", ["export", "--run", "{run}", "--dtype", "int8", "--out", "{w}/x"],
     "--dtype"),
    ("export-step-missing", ["export", "--run", "{run}", "--step", "99", "--out", "{w}/x"],
     "step-99/adapter does not exist"),
    # chat templates and mixtures
    ("template-unknown", train(*gsm8k("{gsm8k}/train.jsonl"), "--data.prompt_style", "chat",
                               "--data.chat_template", "llama3", synthetic=False),
     "data.chat_template: unknown template 'llama3' (did you mean 'llama-3'?)"),
    ("template-bad-jinja", train(*gsm8k("{gsm8k}/train.jsonl"), "--data.prompt_style", "chat",
                                 "--data.chat_template", "{w}/bad.jinja", synthetic=False),
     "data.chat_template: '{w}/bad.jinja' line 2: the Jinja template does not parse"),
    ("mix-weight-zero", train("--data.task", "gsm8k", "--data.mix",
                              '[{{"path": "{gsm8k}/train.jsonl", "weight": 0}}]', synthetic=False),
     "data.mix[0].weight: 0 must be a number > 0"),
    ("mix-fields-do-not-fit", train("--data.task", "gsm8k", "--data.mix",
                                    '[{{"path": "{w}/instruct_missing.jsonl", "eval_path": '
                                    '"{gsm8k}/test.jsonl"}}]', synthetic=False),
     "data.mix[0] (instruct_missing): {w}/instruct_missing.jsonl row 1: missing field "
     "'question'"),
    ("streaming-without-max-steps", train(*gsm8k("{gsm8k}/train.jsonl"), "--data.streaming",
                                          "true", "--train.max_steps", "0", synthetic=False),
     "data.streaming needs train.max_steps > 0"),
    # data-check
    ("datacheck-example-range", check(*gsm8k("{gsm8k}/train.jsonl", "{gsm8k}/test.jsonl"),
                                      "--data.limit", "5", "--example", "99"),
     "--example 99: the training set has 5 examples; give 0..4"),
    ("datacheck-example-negative", ["data-check", "--recipe", "{root}/recipes/demo.yaml",
                                    "--example", "-1"], "NonNegativeInt: -1"),
    ("datacheck-bad-recipe", ["data-check", "--recipe", "{w}/unknown_key.yaml",
                              "--model.name_or_path", "{base}"], "unknown key 'lora.rank'"),
    # run directories and checkpoints (pace_llm.rundir, pace_llm.checkpoint; more in
    # tests/test_rundir.py: the lock, a planted pickle, a changed checkpoint, a full disk)
    ("rundir-parent-is-a-file", train("--train.output_dir", "{w}/a_file.txt/run"),
     "a parent of {w}/a_file.txt/run is a file"),
    ("rundir-output-is-a-file", train("--train.output_dir", "{w}/a_file.txt"),
     "train.output_dir: {w}/a_file.txt is a file"),
    ("resume-not-a-checkpoint", train("--train.resume", "{w}/empty_dir", "--train.overwrite",
                                      "false", "--train.output_dir", "{w}/resume_target"),
     "train.resume: {w}/empty_dir is not a complete checkpoint: no MANIFEST.json"),
    # after the model loads (pace_llm.model.check_model, before DeepSpeed starts)
    ("preflight-vocab", train("--model.name_or_path", "{w}/small_vocab"), "100 embedding rows"),
    ("preflight-positions", train("--data.max_length", "1024"),
     "data.max_length: 1024 is beyond the model's 512 positions"),
]


@pytest.mark.parametrize(("args", "needle", "multi"),
                         [(c[1], c[2], len(c) > 3) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_message_and_exit_2(world, args, needle, multi):
    fill = {**world, "root": ROOT}
    res = pace_llm([a.format(**fill) for a in args], cwd=world["w"] / "cwd")
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr  # earlier lines may be logged notices, never errors
    first, rest = lines[errors[0]], lines[errors[0] + 1:]
    assert needle.format(**fill) in first, res.stderr
    if multi:
        assert len(rest) >= 2 and all(line.startswith("  - ") for line in rest), res.stderr
    else:
        assert not rest, res.stderr


def test_a_tracker_that_is_not_installed(world):
    res = subprocess.run([sys.executable, "-m", "pace_llm.cli", *[a.format(**world) for a in train(
        "--train.report_to", "[wandb]")]], capture_output=True, check=False, text=True,
        cwd=world["w"] / "cwd", timeout=180,
        env={**ENV, "PYTHONPATH": f"{world['w'] / 'no_wandb'}:{ROOT}"})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (
        "error: train.report_to: wandb is not installed; pip install 'pace-llm[wandb]'")


def test_an_unreachable_hub_fails_in_seconds(world):
    """The mission command (recipes/gsm8k.yaml: a hub model and a hub dataset) where the hub
    cannot be reached and HF_HUB_OFFLINE is not set (a real process: the hub libraries read it
    at import): exit 2 in seconds, both hub ids in one message that points at the offline
    form, no retries, nothing written."""
    env = {k: v for k, v in ENV.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: no network
    out = world["w"] / "mission"
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pace_llm.cli", "train", "--recipe",
                          str(ROOT / "recipes" / "gsm8k.yaml"), "--train.output_dir", str(out)],
                         capture_output=True, check=False, text=True, cwd=world["w"] / "cwd",
                         timeout=120, env=env)
    elapsed = time.monotonic() - started
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "Retrying" not in res.stderr + res.stdout and elapsed < 30, (elapsed, res.stderr)
    assert res.stderr.strip().splitlines() == [
        "error: the Hugging Face hub (http://127.0.0.1:9) cannot be reached ([Errno 111] "
        "Connection refused), and the recipe names hub ids: model.name_or_path "
        f"'microsoft/Phi-3-mini-4k-instruct', data.path 'openai/gsm8k'; {OFFLINE_FORM}"]
    assert not out.exists()


def test_keys_without_effect_are_warnings(world):
    res = pace_llm(["train", "--model.name_or_path", str(world["base"]), "--pace.mode", "full",
                    "--pace.lazy_interval", "4", "--quant.type", "fp4", "--data.glue_task",
                    "cola", "--print_config"], cwd=world["w"] / "cwd")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("model:\n") and "lazy_interval: 4" in res.stdout
    warnings = res.stderr.strip().splitlines()
    assert warnings == [
        ("warning: pace.lazy_interval = 4 has no effect: pace.mode is 'full' (only lazy uses it); "
        "remove it, or set --pace.mode lazy"),
        ("warning: data.glue_task = 'cola' has no effect: data.task is 'synthetic', not glue; "
        "remove it, or set --data.task glue"),
        ("warning: quant.type = 'fp4' has no effect: quant.bits is 'none' (no quantization); "
        "remove it, or set --quant.bits 4")], res.stderr
    res = pace_llm(["train", "--model.name_or_path", str(world["base"]), "--pace.mode", "off",
                    "--pace.sigma", "0.5", "--pace.consistency_weight", "0.1", "--data.task",
                    "gsm8k", "--data.path", "x.jsonl", "--data.num_examples", "10",
                    "--print_config"], cwd=world["w"] / "cwd")
    assert res.returncode == 0, res.stderr
    assert [line.split(" has no effect")[0] for line in res.stderr.strip().splitlines()] == [
        "warning: pace.sigma = 0.5", "warning: pace.consistency_weight = 0.1",
        "warning: data.num_examples = 10"], res.stderr


def test_check_model_lists_every_problem():
    """model.check_model on its own: ids beyond the embedding rows, lengths beyond the
    position table, both in one message; a model that fits passes."""
    from conftest import tiny_llama

    from pace_llm.errors import UserError
    from pace_llm.model import check_model
    from pace_llm.schema import Recipe
    from pace_llm.data.examples import TaskData

    class Tok:
        def __len__(self) -> int:
            return 512

    model = tiny_llama(vocab_size=128, max_position_embeddings=256)  # 128 rows, 256 positions
    task = TaskData(kind="causal_lm", train=[{"input_ids": [1, 300], "labels": [1, 300]}],
                    eval=[{"prompt_ids": list(range(300)), "reference": "", "target_ids": [2]}],
                    num_labels=None, stats={}, metric=lambda g, r: {}, name="t")
    recipe = Recipe()  # data.max_length 1024
    with pytest.raises(UserError) as err:
        check_model(recipe, model, Tok(), task)
    text = str(err.value)
    assert text.startswith("3 problem(s) with this model:\n"), text
    assert "ids reach 511 (len(tokenizer) = 512; the task's examples use ids up to 300)" in text
    assert "128 embedding rows" in text
    assert "data.max_length: 1024 is beyond the model's 256 positions" in text
    assert "--data.max_length 256" in text and "an evaluation input has 300 tokens" in text
    recipe.data.max_length = 128
    small = TaskData(kind="causal_lm", train=[{"input_ids": [1, 5], "labels": [1, 5]}],
                     eval=[{"prompt_ids": [1, 2], "reference": "", "target_ids": [2]}],
                     num_labels=None, stats={}, metric=lambda g, r: {}, name="t")
    Tok.__len__ = lambda self: 128
    check_model(recipe, model, Tok(), small)


def test_a_failed_tracker_start_leaves_the_folder_and_the_fixed_command_runs(world):
    """W&B without a login is refused before anything is built or written; a tracker that
    cannot start after the run was built (W&B's network) undoes the start, putting back the
    run it was to replace; the fixed command (logged in) then trains in the same folder."""
    tracked = world["w"] / "tracked"
    fake = world["w"] / "fake_wandb"
    log = world["w"] / "wandb-steps.txt"

    def start(key: str | None, out: Path, overwrite: bool) -> subprocess.CompletedProcess:
        env = {k: v for k, v in ENV.items() if k != "WANDB_API_KEY"}
        env.update({"FAKE_WANDB_LOG": str(log)}, **({"WANDB_API_KEY": key} if key else {}))
        args = train("--train.report_to", "[wandb]", "--train.output_dir", str(out),
                     "--train.overwrite", str(overwrite).lower())
        return cli([a.format(**world) for a in args], world["w"] / "cwd", env, path=[fake])

    res = start(None, tracked, overwrite=False)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith(
        "error: train.report_to: wandb has no login here (no WANDB_API_KEY"), res.stderr
    assert "run `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline" in res.stderr
    assert not tracked.exists()
    res = start("unreachable", world["run"], overwrite=True)
    assert res.returncode == 2 and "wandb could not start a run (cannot reach" in res.stderr
    assert hashes(world["run"]) == world["hashes"]  # the run it was to replace: back in place
    res = start("a-key", tracked, overwrite=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tracked / "adapter" / "adapter_config.json").is_file()
    assert log.read_text().split() == ["0", "1", "1"]  # eval at 0, the step, the last eval


def test_the_finished_run_is_untouched(world):
    """Last: every train case above pointed --train.output_dir at this run, with overwrite."""
    assert hashes(world["run"]) == world["hashes"]
    for left in (".run.new", ".run.old"):  # no half-built replacement, no run kept aside
        assert not (world["w"] / left).exists()
