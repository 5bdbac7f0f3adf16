"""Instruction task: every row format, assistant-only masks, multi-turn, templates, bad rows."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from conftest import DATA, runs
from PIL import Image

from pace_llm.schema import DataArgs
from pace_llm.errors import UserError
from pace_llm.data.build import build_task
from pace_llm.tasks.instruct import text_metrics
from pace_llm.data.tokens import DEFAULT_CHAT_TEMPLATE
from pace_llm.tinymodel import tokenizer_from_sentencepiece
from tests.launch import cli

ROOT = Path(__file__).resolve().parents[1]

SPM = DATA / "tokenizers" / "llama2c_tinystories_bpe512_bytefallback.model"
SEED_TASKS = DATA / "instruct" / "self_instruct_seed_tasks.jsonl"
# ChatML-like, EOS closes each assistant turn, then a newline the model need not learn
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>' + (eos_token if m['role'] == 'assistant' else '') + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": "2 + 3 = 5"}]


@pytest.fixture
def tok(tmp_path):
    t = tokenizer_from_sentencepiece(SPM, tmp_path / "tok")
    t.chat_template = CHATML
    return t


def supervised_runs(tok, example: dict) -> list[str]:
    return [text for sup, text in runs(tok, example) if sup]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(tok, path: Path, **kw):
    return build_task(DataArgs(task="instruct", path=str(path), prompt_style="chat", **kw), tok)


def test_alpaca_rows_supervise_only_the_output(tok, tmp_path):
    rows = [{"instruction": "Name a color.", "input": "", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[1:])
    task = build(tok, tmp_path)
    assert task.kind == "causal_lm" and task.stats["rows"] == 2
    assert supervised_runs(tok, task.train[0]) == ["Blue.<|im_end|></s>"]
    assert supervised_runs(tok, task.train[1]) == ["5<|im_end|></s>"]
    prompt = tok.decode([t for t, y in zip(task.train[1]["input_ids"], task.train[1]["labels"])
                         if y == -100])
    assert prompt == ("<s> <|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert task.eval[0]["reference"] == "5"
    n_prompt = task.train[1]["labels"].count(-100)
    assert task.eval[0]["prompt_ids"] == task.train[1]["input_ids"][:n_prompt]


def test_multi_turn_messages_mask_every_user_turn(tok, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])
    write_jsonl(tmp_path / "test.jsonl", [{"messages": CONVERSATION}])
    task = build(tok, tmp_path)
    ex = task.train[0]
    assert supervised_runs(tok, ex) == ["Hello! How can I help?<|im_end|></s>",
                                        "2 + 3 = 5<|im_end|></s>"]
    unsupervised = " ".join(text for sup, text in runs(tok, ex) if not sup)
    assert "Hi there" in unsupervised and "Add 2 and 3." in unsupervised
    assert ex["labels"][-1] == tok.eos_token_id  # trailing newline after EOS is not kept
    # eval: everything up to the last assistant turn is the prompt
    ev = task.eval[0]
    assert ev["reference"] == "2 + 3 = 5"
    assert tok.decode(ev["prompt_ids"]).endswith("Add 2 and 3.<|im_end|>\n<|im_start|>assistant\n")
    assert ev["prompt_ids"] + ev["target_ids"] == ex["input_ids"]
    assert tok.decode(ev["target_ids"]) == "2 + 3 = 5<|im_end|></s>"


def test_sharegpt_equals_messages(tok, tmp_path):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    share = {"conversations": [{"from": names[m["role"]], "value": m["content"]}
                               for m in CONVERSATION]}
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}, share])
    write_jsonl(tmp_path / "test.jsonl", [share])
    task = build(tok, tmp_path)
    assert task.train[0] == task.train[1]


def test_trl_prompt_completion_rows(tok, tmp_path):
    """TRL's prompt-completion rows, as text (= an alpaca row) or as conversations (= the
    messages of prompt then completion)."""
    trl = [{"prompt": "Add the numbers.\n\n2 and 3", "completion": "5"},
           {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}]
    peers = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
             {"messages": CONVERSATION}]
    write_jsonl(tmp_path / "train.jsonl", trl + peers)
    write_jsonl(tmp_path / "test.jsonl", trl)
    task = build(tok, tmp_path)
    assert task.train[0] == task.train[2] and task.train[1] == task.train[3]
    assert [e["reference"] for e in task.eval] == ["5", "2 + 3 = 5"]


def test_self_instruct_seed_tasks(tok):
    rows = [json.loads(line) for line in SEED_TASKS.read_text().splitlines()]
    task = build(tok, SEED_TASKS, max_length=8192)
    # 175 tasks x 1 instance; no eval split beside it: the last 5% (8) are held out
    assert task.stats["rows"] + task.stats["dropped"] == 167 and task.stats["eval_rows"] == 8
    assert task.stats["dropped"] == 0
    first = rows[0]["instances"][0]
    assert supervised_runs(tok, task.train[0]) == [first["output"] + "<|im_end|></s>"]
    assert task.eval[-1]["reference"] == rows[-1]["instances"][0]["output"]
    assert task.main_metric == "token_f1"


def test_default_template_when_tokenizer_has_none(tmp_path, caplog):
    tok = tokenizer_from_sentencepiece(SPM, tmp_path / "tok")
    assert not tok.chat_template
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])
    write_jsonl(tmp_path / "test.jsonl", [{"messages": CONVERSATION}])
    with caplog.at_level(logging.WARNING):
        task = build(tok, tmp_path)
    assert "no chat template; setting pace_llm's default template" in caplog.text
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert supervised_runs(tok, task.train[0]) == ["Hello! How can I help?</s>", "2 + 3 = 5</s>"]
    assert [text for sup, text in runs(tok, task.train[0]) if not sup][1] == (
        "\n\n### User:\nAdd 2 and 3.\n\n### Assistant:\n")


def test_plain_style_uses_default_layout_even_with_a_template(tok, tmp_path):
    rows = [{"instruction": "Say hi.", "output": "Hi!"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows)
    task = build_task(DataArgs(task="instruct", path=str(tmp_path), prompt_style="plain"), tok)
    assert [text for _, text in runs(tok, task.train[0])] == [
        "<s> ### User:\nSay hi.\n\n### Assistant:\n", "Hi!</s>"]
    # the tokenizer's own is replaced by the layout the rows were rendered with: the exported
    # model's tokenizer (and the adapter's chat_template.jinja) serve what was trained
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE


def test_template_without_eos_gets_eos_on_the_last_turn(tok, tmp_path):
    tok.chat_template = CHATML.replace("(eos_token if m['role'] == 'assistant' else '')", "''")
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])
    write_jsonl(tmp_path / "test.jsonl", [{"messages": CONVERSATION}])
    task = build(tok, tmp_path)
    assert supervised_runs(tok, task.train[0]) == ["Hello! How can I help?<|im_end|>\n",
                                                   "2 + 3 = 5<|im_end|>\n</s>"]


def test_prefix_inconsistent_template_is_refused(tok, tmp_path):
    tok.chat_template = ("{{ messages | length }}{% for m in messages %}{{ m['content'] }}"
                         "{% endfor %}")
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}] * 2)
    with pytest.raises(UserError, match=r"train\.jsonl row 1: the chat template is not "
                                        "prefix-consistent"):
        build(tok, tmp_path / "train.jsonl")


def test_bad_rows_name_file_and_row(tok, tmp_path):
    good = {"instruction": "Say hi.", "output": "Hi!"}
    cases = [
        ({"messages": [{"role": "robot", "content": "x"}]},
         r"row 2: messages\[1\]\.role = 'robot' is not a known role"),
        ({"messages": [{"role": "user", "content": "x"}]},
         r"row 2: the conversation has no assistant turn"),
        ({"messages": [{"role": "assistant", "content": "x"}]},
         r"row 2: the conversation starts with an assistant turn"),
        ({"conversations": [{"from": "human"}]},
         r"row 2: conversations\[1\] needs fields 'from' and 'value'"),
        ({"instruction": "Say hi."}, r"row 2: missing field 'output' \(the row has: instruction\)"),
        ({"query": "x", "response": "y"},
         r"row 2: not an instruction row \(the row has: query, response\); expected "
         r"instruction/input/output, instruction/instances, messages, conversations or "
         r"prompt/completion; if they hold the task's fields, map them with --data.columns "
         r"'\{instruction: query, output: response\}'"),
        ({"instruction": "Say hi.", "reply": "Hi!"},
         r"row 2: missing field 'output' \(the row has: instruction, reply\); if they hold the "
         r"task's fields, map them with --data.columns '\{output: reply\}'"),
        ({"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]},
         r"row 2: fields 'prompt' and 'completion' must both be text or both lists of \{role, "
         r"content\} turns \(TRL's formats\); got str and list"),
        ({"prompt": [{"role": "user", "content": "x"}], "completion": []},
         r"row 2: the completion has no assistant turn to train on"),
    ]
    for bad, message in cases:
        path = write_jsonl(tmp_path / "train.jsonl", [good, bad, good])
        with pytest.raises(UserError, match=rf"{path} {message}"):
            build(tok, path)
    with pytest.raises(UserError, match=r"data file '.*/absent\.jsonl' does not exist"):
        build(tok, tmp_path / "absent.jsonl")
    path = write_jsonl(tmp_path / "train.jsonl", [])
    with pytest.raises(UserError, match=rf"{path}: the dataset is empty"):
        build(tok, path)
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "x" * 400, "output": "y"}] * 3)
    with pytest.raises(UserError, match="every example \\(2\\) is longer than data.max_length=64"):
        build(tok, path, max_length=64)


def test_text_metrics():
    assert text_metrics(["Blue.", "the cat sat"], ["Blue.", "a cat sat down"]) == {
        "exact_match": 0.5, "token_f1": pytest.approx((1.0 + 2 * 2 / (3 + 4)) / 2)}


def test_trl_rows_train_through_the_cli(tiny_base, tmp_path):
    """`pace-llm train` on TRL rows with no evaluation split: data.holdout's share is held out
    (the notice shows), the run trains; the same start again reads the task cache and says so;
    rows under other names train once data.columns maps them, as the refusal proposes."""
    rows = [{"prompt": f"Say {w}.", "completion": w} for w in ("hi", "bye", "yes", "no")]
    rows += [{"prompt": [{"role": "user", "content": f"Spell {w}."}],
              "completion": [{"role": "assistant", "content": " ".join(w)}]}
             for w in ("cat", "dog", "sun", "sky")]
    data = write_jsonl(tmp_path / "trl.jsonl", rows)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["train", "--model.name_or_path", str(tiny_base), "--data.task", "instruct",
            "--data.path", str(data), "--data.holdout", "0.25", "--data.max_length", "128",
            "--data.cache_dir", str(tmp_path / "cache"), "--train.max_steps", "1",
            "--train.micro_batch_size", "2", "--train.precision", "fp32", "--lora.r", "2",
            "--eval.max_new_tokens", "2", "--eval.at_start", "false",
            "--deepspeed", str(ROOT / "ds_configs" / "zero0.json"),
            "--train.output_dir", str(tmp_path / "run"), "--train.overwrite", "true"]
    first = cli(args, tmp_path, env)
    assert first.returncode == 0, first.stderr[-3000:]
    notice = (f"[pace_llm] no eval split: holding out the last 2 of 8 examples of {data} for "
              "evaluation (data.holdout 0.25)")
    assert notice in first.stderr.splitlines() and "task cache hit" not in first.stderr
    evals = [json.loads(x)["eval"] for x in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines() if '"eval"' in x]
    assert evals[-1]["examples"] == 2
    # what the console says: the run's length in epochs, the eval loss, what to do next
    assert "1 steps of 2 examples = 0.333 epoch(s) of 6 examples;" in first.stdout
    assert f"eval at step 1: exact_match {evals[-1]['metrics']['exact_match']:.4g}, " in first.stdout
    assert f"eval_loss {evals[-1]['eval_loss']:.4g}\n" in first.stdout
    steps = first.stdout.split("[pace_llm] next steps:\n")[1].splitlines()
    assert steps[0].startswith(f"  pace-llm data-check --recipe {tmp_path / 'run' / 'recipe.yaml'}")
    assert steps[2].startswith("  vllm serve ") and "--chat-template" in steps[2], steps
    with Image.open(tmp_path / "run" / "curves.png") as png:
        assert png.text["Description"].endswith("| eval loss (held-out answers)")
    again = cli(args, tmp_path, env)
    assert again.returncode == 0, again.stderr[-3000:]
    hit = [line for line in again.stderr.splitlines() if "task cache hit: " in line]
    assert len(hit) == 1 and hit[0].startswith(f"[pace_llm] task cache hit: {tmp_path / 'cache'}")
    assert notice in again.stderr.splitlines()  # the build's notices, replayed
    renamed = write_jsonl(tmp_path / "qa.jsonl", [{"query": r["prompt"], "response": r["completion"]}
                                                  for r in rows[:4]])
    args[args.index(str(data))] = str(renamed)
    refused = cli(args, tmp_path, env)
    hint = "--data.columns '{instruction: query, output: response}'"
    assert refused.returncode == 2 and hint in refused.stderr, refused.stderr
    mapped = cli([*args, "--data.columns", "{instruction: query, output: response}"], tmp_path,
                 env)
    assert mapped.returncode == 0, mapped.stderr[-3000:]
