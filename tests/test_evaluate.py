"""Evaluation: greedy generation reports its progress batch by batch, stops at a chat
template's end of turn, and the scored prediction is the reply's content."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import save_fixture_tokenizer, tiny_llama

from pace_llm.data import templates
from pace_llm.data.tokens import (
    chat_segments,
    encode_continuation,
    generation_example,
    reply_format,
    reply_text,
)
from pace_llm.evaluate import greedy_generate


def test_generation_reports_each_batch():
    model = tiny_llama()
    tok = SimpleNamespace(eos_token_id=None, pad_token_id=0)
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10], [1, 11], [1, 12, 13]]
    seen: list[int] = []
    out = greedy_generate(model, prompts, tok, max_new_tokens=3, batch_size=2,
                          device=torch.device("cpu"), on_batch=seen.append)
    assert seen == [2, 2, 1] and len(out) == 5 and all(len(r) == 3 for r in out)


# ------------------------------------------------------------------ chat layouts: stop, score
class Scripted:
    """A tiny Llama whose greedy generation emits ``script`` whatever the prompt: every forward
    of a generate call puts all the mass on the script's next token (the KV cache still runs)."""

    def __init__(self, vocab: int, script: list[int]):
        self.model = tiny_llama(vocab_size=vocab)
        self.script, self.k = script, 0
        real = self.model.forward

        def forward(*args, **kwargs):
            out = real(*args, **kwargs)
            token = self.script[min(self.k, len(self.script) - 1)]
            self.k += 1
            out.logits[:, -1, :] = -1e9
            out.logits[:, -1, token] = 0.0
            return out

        self.model.forward = forward

    def generate(self, **kwargs):
        self.k = 0
        return self.model.generate(**kwargs)


HOUSE = ("{% for m in messages %}{{ '## ' + m['role'] + ' →\\n' + m['content'] + '\\n<END>\\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '## assistant →\\n' }}{% endif %}")
NO_GENERATION_PROMPT = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ;;\\n' }}{% endfor %}"
LAYOUTS = [*templates.BUILTINS, "tokenizer", "house.jinja", "no-generation-prompt.jinja"]
TURNS = [{"role": "user", "content": "Capital of France?"},
         {"role": "assistant", "content": "Paris"},
         {"role": "user", "content": "And of Italy?"},
         {"role": "assistant", "content": "Rome"}]


@pytest.fixture(scope="module")
def fixture_tok(tmp_path_factory):
    return save_fixture_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("name", LAYOUTS)
def test_generation_stops_at_the_end_of_turn_and_scores_the_content(fixture_tok, tmp_path, name):
    """Per built-in template, the tokenizer's own (pace_llm's default) and two Jinja files, on a
    tokenizer without the families' markers (they are text): a model that answers, closes its
    turn and runs on into the next one stops right after the end of turn, and the prediction
    is the answer alone."""
    tok = copy.deepcopy(fixture_tok)
    tok.pad_token = tok.unk_token  # as model.load_tokenizer pads
    files = {"house.jinja": HOUSE, "no-generation-prompt.jinja": NO_GENERATION_PROMPT}
    if name in files:
        (tmp_path / name).write_text(files[name])
        name = str(tmp_path / name)
    template = templates.resolve(name, tok)
    reply = reply_format(tok, template)
    segments = chat_segments(tok, TURNS[:2], template, "row 1")
    prompt = generation_example(tok, segments, tok.eos_token_id, "Paris", reply)["prompt_ids"]
    rendered = tok.apply_chat_template(TURNS, chat_template=template, tokenize=False)
    before = tok.apply_chat_template(TURNS[:1], chat_template=template, tokenize=False,
                                     add_generation_prompt=True)
    onwards = rendered[len(before):]  # "Paris<end of turn>" and the next turns
    assert onwards.startswith(reply["prefix"] + "Paris") and "Rome" in onwards
    model = Scripted(len(tok), encode_continuation(tok, onwards))
    [ids] = greedy_generate(model, [prompt], tok, max_new_tokens=60, batch_size=1,
                            device=torch.device("cpu"), ends=[reply["end"]])
    text = tok.decode(ids, skip_special_tokens=False)
    if reply["end"] in (tok.eos_token, ""):  # EOS ends the turn: it stops generation itself
        assert tok.eos_token_id not in ids and "Rome" not in text
    else:  # stopped right after the end-of-turn text, before the next turn
        assert text.endswith(reply["end"]) and text.count(reply["end"]) == 1, text
    assert reply_text(tok, ids, reply) == "Paris"


def test_the_console_line_of_an_evaluation():
    """The metrics, the held-out loss (the only signal while a metric is still 0) and every
    extra set (a mixture's sources, MNLI mismatched) as extra.<name>."""
    from pace_llm.trainer import eval_line

    record = {"metrics": {"exact_match": 0.0, "token_f1": 0.123456}, "eval_loss": 2.3456789,
              "extra": {"seed": {"token_f1": 0.5}, "mismatched": {"accuracy": 0.25}},
              "fp_distance": 0.1}
    assert eval_line(record) == ("exact_match 0, token_f1 0.1235, eval_loss 2.346; "
                                 "extra.seed: token_f1 0.5; extra.mismatched: accuracy 0.25")
    assert eval_line({"metrics": {}}) == "no metric"
