"""data.chat_template: built-in family templates against their published formats, masking with
each, Jinja files, bad names and files, data-check showing the rendered template; through the
CLI, a chat run scored on its reply's content and exported with its template."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DATA, SMALL, runs, save_fixture_tokenizer

from pace_llm import datacheck
from pace_llm.data import templates
from pace_llm.data.build import build_task
from pace_llm.data.tokens import (chat_segments, encode_continuation, generation_example,
                                  segments_to_example)
from pace_llm.errors import UserError
from pace_llm.schema import DataArgs
from tests.launch import cli

SEED_TASKS = DATA / "instruct" / "self_instruct_seed_tasks.jsonl"
SYSTEM, USER1, REPLY1, USER2, REPLY2 = ("Be brief.", "Hi there", "Hello! How can I help?",
                                        "Add 2 and 3.", "2 + 3 = 5")
CONVERSATION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER1},
                {"role": "assistant", "content": REPLY1}, {"role": "user", "content": USER2},
                {"role": "assistant", "content": REPLY2}]

# Each family's special tokens, as its own tokenizer defines them (passed to the template the
# way the tokenizer's special_tokens_map would be).
SPECIAL = {"llama-3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
           "mistral": {"bos_token": "<s>", "eos_token": "</s>"},
           "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"}}

# The published formats, written out by hand: (the two-turn conversation, the generation prompt
# for the conversation up to the second user turn).
REFERENCE = {
    "chatml": (
        ("<|im_start|>system\nBe brief.<|im_end|>\n"
         "<|im_start|>user\nHi there<|im_end|>\n"
         "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
         "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
         "<|im_start|>assistant\n2 + 3 = 5<|im_end|>\n"),
        ("<|im_start|>system\nBe brief.<|im_end|>\n"
         "<|im_start|>user\nHi there<|im_end|>\n"
         "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
         "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
         "<|im_start|>assistant\n")),
    "llama-3": (
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nAdd 2 and 3.<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n2 + 3 = 5<|eot_id|>"),
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nAdd 2 and 3.<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n")),
    "mistral": (  # no system role: it opens the first user message, then a blank line
        ("<s>[INST] Be brief.\n\nHi there [/INST]Hello! How can I help?</s>"
         "[INST] Add 2 and 3. [/INST]2 + 3 = 5</s>"),
        ("<s>[INST] Be brief.\n\nHi there [/INST]Hello! How can I help?</s>"
         "[INST] Add 2 and 3. [/INST]")),
    "phi-3": (
        ("<|system|>\nBe brief.<|end|>\n"
         "<|user|>\nHi there<|end|>\n"
         "<|assistant|>\nHello! How can I help?<|end|>\n"
         "<|user|>\nAdd 2 and 3.<|end|>\n"
         "<|assistant|>\n2 + 3 = 5<|end|>\n"),
        ("<|system|>\nBe brief.<|end|>\n"
         "<|user|>\nHi there<|end|>\n"
         "<|assistant|>\nHello! How can I help?<|end|>\n"
         "<|user|>\nAdd 2 and 3.<|end|>\n"
         "<|assistant|>\n")),
    "gemma": (  # no system role: it opens the first user turn, then a blank line
        ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
         "<start_of_turn>model\nHello! How can I help?<end_of_turn>\n"
         "<start_of_turn>user\nAdd 2 and 3.<end_of_turn>\n"
         "<start_of_turn>model\n2 + 3 = 5<end_of_turn>\n"),
        ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
         "<start_of_turn>model\nHello! How can I help?<end_of_turn>\n"
         "<start_of_turn>user\nAdd 2 and 3.<end_of_turn>\n"
         "<start_of_turn>model\n")),
}
REFERENCE["qwen"] = REFERENCE["chatml"]  # a system message given: exactly ChatML

# What closes an assistant turn in each layout: the text the template puts after the reply. With
# a tokenizer whose EOS is not that marker, the whole closing text is supervised (the template's
# newline after the marker too) and EOS is appended to the last reply; see the test with a
# Qwen-like vocabulary below for a tokenizer whose EOS is the marker.
END_OF_TURN = {"chatml": "<|im_end|>\n", "qwen": "<|im_end|>\n", "llama-3": "<|eot_id|>",
               "mistral": "</s>", "phi-3": "<|end|>\n", "gemma": "<end_of_turn>\n"}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    save_fixture_tokenizer(out)
    return out


@pytest.fixture
def tok(tok_dir):
    """A fresh tokenizer per test (templates are set on it)."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok_dir)
    assert not t.chat_template and (t.bos_token, t.eos_token) == ("<s>", "</s>")
    return t


def render(tok, name: str, messages: list[dict], generation: bool = False) -> str:
    return tok.apply_chat_template(messages, chat_template=templates.resolve(name, tok),
                                   tokenize=False, add_generation_prompt=generation,
                                   **SPECIAL.get(name, {}))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_builtin_has_a_reference():
    assert set(REFERENCE) == set(templates.BUILTINS) == set(END_OF_TURN)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_builtin_renders_the_published_format(tok, name):
    conversation, generation = REFERENCE[name]
    assert render(tok, name, CONVERSATION) == conversation
    assert render(tok, name, CONVERSATION[:4], generation=True) == generation
    # without a generation prompt the conversation ends after the user turn (Mistral's prompt
    # already ends with [/INST], its generation prompt)
    without = render(tok, name, CONVERSATION[:4])
    assert generation.startswith(without)
    assert (without == generation) == (name == "mistral")


def test_qwen_adds_its_default_system_message_and_chatml_does_not(tok):
    chat = CONVERSATION[1:3]
    assert render(tok, "qwen", chat) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n")
    assert render(tok, "chatml", chat) == (
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n")


@pytest.mark.parametrize("name", ["mistral", "gemma"])
def test_system_less_families_without_a_system_message(tok, name):
    expected = {"mistral": "<s>[INST] Hi there [/INST]Hello! How can I help?</s>",
                "gemma": "<bos><start_of_turn>user\nHi there<end_of_turn>\n"
                         "<start_of_turn>model\nHello! How can I help?<end_of_turn>\n"}
    assert render(tok, name, CONVERSATION[1:3]) == expected[name]


@pytest.mark.parametrize("name", list(REFERENCE))
def test_only_assistant_turns_and_their_end_of_turn_are_supervised(tok, name):
    """With a real sentencepiece tokenizer (whose EOS is </s> and which lacks the families'
    special tokens): each reply plus its end of turn is supervised, EOS after the last one."""
    template = templates.resolve(name, tok)
    eos = tok.eos_token_id
    example = segments_to_example(tok, chat_segments(tok, CONVERSATION, template, "row 1"), eos)
    end = END_OF_TURN[name]
    last = end if end.endswith("</s>") else end + "</s>"
    assert [text for sup, text in runs(tok, example) if sup] == [REPLY1 + end, REPLY2 + last]
    unsupervised = " ".join(text for sup, text in runs(tok, example) if not sup)
    for text in (SYSTEM, USER1, USER2):
        assert text in unsupervised
    assert REPLY1 not in unsupervised and REPLY2 not in unsupervised
    # BOS once at most: the fixture tokenizer adds none itself; a template that renders
    # bos_token gets it as the first token, parsed as the special token (not doubled)
    starts_with_bos = "{{- bos_token }}" in template
    assert (example["input_ids"][0] == tok.bos_token_id) == starts_with_bos
    assert example["input_ids"].count(tok.bos_token_id) == int(starts_with_bos)
    assert example["labels"][-1] == eos


def test_end_of_turn_token_as_eos_ends_supervision(tok, caplog):
    """A Qwen-like vocabulary (<|im_start|>, <|im_end|> special; EOS = <|im_end|>): each reply is
    supervised up to and including <|im_end|>, the template's newline after it is not."""
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    with caplog.at_level(logging.WARNING):
        template = templates.resolve("qwen", tok)
    assert "no single token" not in caplog.text
    eos = tok.eos_token_id
    example = segments_to_example(tok, chat_segments(tok, CONVERSATION, template, "row 1"), eos)
    assert [text for sup, text in runs(tok, example) if sup] == [REPLY1 + "<|im_end|>",
                                                                 REPLY2 + "<|im_end|>"]
    unsupervised = [text for sup, text in runs(tok, example) if not sup]
    assert unsupervised[1].startswith("\n<|im_start|>")  # the newline after <|im_end|>
    assert example["labels"][-1] == eos and example["labels"].count(eos) == 2


def test_instruct_task_with_a_named_template(tok, tmp_path, caplog):
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])
    write_jsonl(tmp_path / "test.jsonl", [{"messages": CONVERSATION}])
    data = DataArgs(task="instruct", path=str(tmp_path), prompt_style="chat",
                    chat_template="chatml")
    with caplog.at_level(logging.WARNING):
        task = build_task(data, tok)
    warnings = [r for r in caplog.records if "no single token" in r.getMessage()]
    assert len(warnings) == 1 and "<|im_start|>, <|im_end|>" in warnings[0].getMessage()
    assert [text for sup, text in runs(tok, task.train[0]) if sup] == [
        REPLY1 + "<|im_end|>\n", REPLY2 + "<|im_end|>\n</s>"]
    assert tok.decode(task.eval[0]["prompt_ids"]).endswith(
        "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n")
    # set on the tokenizer, so a tokenizer saved with the merged model serves this layout
    assert tok.chat_template == templates.CHATML


def test_gsm8k_chat_with_a_named_template(tok, tmp_path):
    rows = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows)
    data = DataArgs(task="gsm8k", path=str(tmp_path), prompt_style="chat",
                    chat_template="llama-3")
    task = build_task(data, tok)
    assert [text for sup, text in runs(tok, task.train[0]) if sup] == [
        "2 + 3 = 5\n#### 5<|eot_id|></s>"]
    assert tok.decode(task.eval[0]["prompt_ids"]).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("task", ["instruct", "gsm8k"])
def test_a_named_template_needs_prompt_style_chat(tok, tmp_path, task):
    rows = {"instruct": {"instruction": "Say hi.", "output": "Hi!"},
            "gsm8k": {"question": "1 + 1?", "answer": "#### 2"}}[task]
    write_jsonl(tmp_path / "train.jsonl", [rows])
    write_jsonl(tmp_path / "test.jsonl", [rows])
    data = DataArgs(task=task, path=str(tmp_path), prompt_style="plain", chat_template="gemma")
    with pytest.raises(UserError, match="data.chat_template is 'gemma' but data.prompt_style "
                                        "is 'plain'.*set data.prompt_style: chat"):
        build_task(data, tok)


def test_tokenizer_keyword_and_none_keep_todays_behaviour(tok, caplog):
    with caplog.at_level(logging.WARNING):
        assert templates.resolve(None, tok) == templates.DEFAULT_CHAT_TEMPLATE
    assert "no chat template; setting pace_llm's default template" in caplog.text
    assert tok.chat_template == templates.DEFAULT_CHAT_TEMPLATE
    tok.chat_template = templates.PHI_3
    assert templates.resolve("tokenizer", tok) == templates.resolve(None, tok) == templates.PHI_3
    assert templates.resolve("ChatML", tok) == templates.CHATML  # names are case-insensitive


def test_a_jinja_file(tok, tmp_path):
    path = tmp_path / "house.jinja"
    path.write_text("{% for m in messages %}\n"
                    "{{ '## ' + m['role'] + ' →\\n' + m['content'] + '\\n<END>\\n' }}"
                    "{% endfor %}\n"
                    "{% if add_generation_prompt %}{{ '## assistant →\\n' }}{% endif %}\n",
                    encoding="utf-8")
    text = templates.resolve(str(path), tok)
    assert text == path.read_text(encoding="utf-8")
    assert tok.apply_chat_template(CONVERSATION[1:4], chat_template=text, tokenize=False,
                                   add_generation_prompt=True) == (
        "## user →\nHi there\n<END>\n## assistant →\nHello! How can I help?\n<END>\n"
        "## user →\nAdd 2 and 3.\n<END>\n## assistant →\n")
    example = segments_to_example(tok, chat_segments(tok, CONVERSATION, text, "row 1"),
                                  tok.eos_token_id)
    assert [t for sup, t in runs(tok, example) if sup] == [
        REPLY1 + "\n<END>\n", REPLY2 + "\n<END>\n</s>"]


def bad_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.jinja"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_bad_names_and_files_are_user_errors(tok, tmp_path):
    key = "data.chat_template"
    with pytest.raises(UserError, match=rf"{key}: unknown template 'llama3' \(did you mean "
                                        r"'llama-3'\?\); give a built-in name \(chatml, llama-3, "
                                        r"mistral, phi-3, gemma, qwen\)"):
        templates.resolve("llama3", tok)
    with pytest.raises(UserError, match=rf"{key}: unknown template 'vicuna'; give a built-in"):
        templates.resolve("vicuna", tok)
    missing = tmp_path / "absent.jinja"
    with pytest.raises(UserError, match=rf"{key}: '{missing}' is not a built-in name and no "
                                        "such file exists"):
        templates.resolve(str(missing), tok)
    with pytest.raises(UserError, match=rf"{key}: '{tmp_path}' is a directory"):
        templates.resolve(str(tmp_path), tok)
    syntax = bad_file(tmp_path, "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(UserError, match=rf"{key}: '{syntax}' line 2: the Jinja template does "
                                        "not parse: unexpected '}'"):
        templates.resolve(syntax, tok)
    raises = bad_file(tmp_path, "{% for m in messages %}{{ m['content'] }}\n"
                                "{% if m['role'] == 'assistant' and loop.last %}\n"
                                "{{ raise_exception('no replies here') }}\n"
                                "{% endif %}{% endfor %}")
    with pytest.raises(UserError, match=rf"{key}: '{raises}' line 3: the template fails on a "
                                        r"two-turn conversation \(user, assistant, user, "
                                        r"assistant\): TemplateError: no replies here"):
        templates.resolve(raises, tok)
    undefined = bad_file(tmp_path, "{% for m in messages %}\n{{ m['content'] + m.nope.x }}"
                                   "{% endfor %}")
    with pytest.raises(UserError, match=rf"'{undefined}' line 2: .*UndefinedError: .*'nope'"):
        templates.resolve(undefined, tok)
    silent = bad_file(tmp_path, "{% for m in messages %}{{ m['role'] }}{% endfor %}")
    with pytest.raises(UserError, match=r"renders a two-turn conversation without the text of 4 "
                                        r"of its 4 messages"):
        templates.resolve(silent, tok)
    with pytest.raises(UserError, match=r"is empty"):
        templates.resolve(bad_file(tmp_path, "  \n"), tok)
    (tmp_path / "bin.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(UserError, match=r"bin\.jinja' is not UTF-8 text"):
        templates.resolve(str(tmp_path / "bin.jinja"), tok)


@pytest.fixture
def instruct_recipe(tok_dir, tmp_path) -> Path:
    path = tmp_path / "recipes" / "r.yaml"
    path.parent.mkdir()
    path.write_text(f"model:\n  name_or_path: {tok_dir}\n"
                    f"data:\n  task: instruct\n  path: {SEED_TASKS}\n  limit: 4\n"
                    "  max_length: 4096\n")
    return path


def test_data_check_prints_the_rendered_template_with_sup_marks(instruct_recipe, capsys):
    argv = ["--recipe", str(instruct_recipe), "--data.prompt_style", "chat",
            "--data.chat_template", "chatml"]
    assert datacheck.main(argv) == 0
    out = capsys.readouterr().out
    first = json.loads(SEED_TASKS.read_text().splitlines()[0])
    assert out.startswith("task: instruct (causal_lm)\nchat template: chatml (built-in)\n"
                          "--- training example 0 ---\n")
    example = out.split("--- training example 0 ---\n")[1].split("\n--- first evaluation")[0]
    assert example == (f"<|im_start|>user\n{first['instruction']}<|im_end|>\n"
                       f"<|im_start|>assistant\n[SUP]{first['instances'][0]['output']}"
                       "<|im_end|>\n</s>[/SUP]")
    assert "--- first evaluation input ---\n<|im_start|>user\n" in out


def test_data_check_resolves_a_template_file_beside_the_recipe(instruct_recipe, tmp_path,
                                                               monkeypatch, capsys):
    (instruct_recipe.parent / "house.jinja").write_text(
        "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + ' [end]\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
    instruct_recipe.write_text(instruct_recipe.read_text()
                               + "  prompt_style: chat\n  chat_template: house.jinja\n")
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    assert datacheck.main(["--recipe", str(instruct_recipe)]) == 0
    out = capsys.readouterr().out
    assert f"chat template: file {instruct_recipe.parent / 'house.jinja'}\n" in out
    assert "[user] Is there anything I can eat" in out
    assert " [end]\n[/SUP]" not in out and " [end]\n</s>[/SUP]" in out


def test_data_check_bad_template_exits_2_with_one_message(instruct_recipe, capsys):
    argv = ["--recipe", str(instruct_recipe), "--data.prompt_style", "chat",
            "--data.chat_template", "chatm"]
    assert datacheck.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.chat_template: unknown template 'chatm' (did you mean "
                          "'chatml'?)") and err.count("\n") == 1 and "Traceback" not in err


# ------------------------------------------------------------------ through the CLI: a chat run
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
HELLO = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello"}]


def answering_base(out: Path, template: str, messages: list[dict], after: str) -> Path:
    """A tiny Llama (the fixture's marker-less tokenizer) that answers ``messages``' last reply
    when prompted with the rest in ``template``, as pace_llm tokenizes it: trained here on that
    one sequence until greedy decoding gives the reply, then ``after`` (its end of turn and a
    next turn: the model runs on unless generation stops it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = save_fixture_tokenizer(out)
    prompt = generation_example(tok, chat_segments(tok, messages, template, "row 1"),
                                tok.eos_token_id, "")["prompt_ids"]
    answer = encode_continuation(tok, messages[-1]["content"] + after)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL, "vocab_size": len(tok),
                                            "bos_token_id": tok.bos_token_id,
                                            "eos_token_id": tok.eos_token_id,
                                            "max_position_embeddings": 512}))
    ids, labels = torch.tensor([prompt + answer]), torch.tensor([[-100] * len(prompt) + answer])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    greedy = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=len(answer),
                            do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    assert greedy == answer, tok.decode(greedy)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> dict[str, Path]:
    """A chatml instruct run (pace-llm train) on a marker-less tokenizer whose base answers
    "hello<|im_end|>" and runs on into a next user turn; one step at a negligible lr, with the
    merged model written."""
    w = tmp_path_factory.mktemp("chat_run")
    base = answering_base(w / "base", templates.CHATML, HELLO,
                          "<|im_end|>\n<|im_start|>user\nSay hello again.<|im_end|>")
    write_jsonl(w / "train.jsonl", [{"messages": HELLO}])
    write_jsonl(w / "test.jsonl", [{"messages": HELLO}])
    run = w / "run"
    res = cli(["train", "--model.name_or_path", str(base), "--data.task", "instruct",
               "--data.path", str(w / "train.jsonl"), "--data.eval_path", str(w / "test.jsonl"),
               "--data.prompt_style", "chat", "--data.chat_template", "chatml",
               "--data.max_length", "128", "--train.max_steps", "1",
               "--train.micro_batch_size", "1", "--train.lr", "1e-7", "--train.precision",
               "fp32", "--pace.mode", "off", "--lora.r", "2", "--lora.alpha", "4",
               "--eval.limit", "1", "--eval.max_new_tokens", "48", "--eval.batch_size", "1",
               "--deepspeed", str(ROOT / "ds_configs" / "zero0.json"), "--export.merge", "true",
               "--train.output_dir", str(run)], w, ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    return {"w": w, "base": base, "run": run, "stdout": res.stdout}


def test_a_chatml_run_scores_the_reply_that_answers(chat_run):
    """The model answers "hello", closes its turn with <|im_end|> (text: the tokenizer has no
    such token) and would run on: generation stops at the end of turn, the prediction is
    "hello", exact match 1.0 before and after training (what early stopping ranks by)."""
    evals = [json.loads(line)["eval"] for line in
             (chat_run["run"] / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(evals) == 2
    for record in evals:
        assert record["metrics"]["exact_match"] == 1.0, record
        assert record["samples"] == [{"prediction": "hello", "reference": "hello"}]


def test_the_export_carries_the_training_template(chat_run):
    """The adapter directory holds the template; the run's merged model and `pace-llm export
    --merge`'s render a conversation exactly as training did; the vLLM check passes it to the
    server and refuses an adapter of a chat run that lost it."""
    from transformers import AutoTokenizer

    run, w = chat_run["run"], chat_run["w"]
    assert (run / "adapter" / "chat_template.jinja").read_text() == templates.CHATML
    res = cli(["export", "--run", str(run), "--merge", "--out", str(w / "merged")], w, ENV)
    assert res.returncode == 0, res.stderr
    base_tok = AutoTokenizer.from_pretrained(chat_run["base"])
    trained = render(base_tok, "chatml", HELLO)  # the training text of the row
    for merged in (run / "merged", w / "merged"):
        tok = AutoTokenizer.from_pretrained(merged)
        assert tok.apply_chat_template(HELLO, tokenize=False) == trained, merged
    res = cli(["export", "--run", str(run), "--check", "vllm"], w, ENV)
    assert res.returncode == 0, res.stderr
    template = (run / "adapter" / "chat_template.jinja").resolve()
    serve = [line for line in res.stdout.splitlines() if "serve: vllm serve" in line]
    assert len(serve) == 1 and serve[0].endswith(f"--chat-template {template}"), res.stdout
    shutil.copytree(run / "adapter", w / "lost")
    (w / "lost" / "chat_template.jinja").unlink()
    res = cli(["export", "--adapter", str(w / "lost"), "--check", "vllm"], w, ENV)
    assert res.returncode == 2 and "no chat_template.jinja, but the adapter was trained on " \
        "conversations rendered with a chat template (data.task 'instruct', data.prompt_style " \
        "'chat'" in res.stderr, res.stderr
