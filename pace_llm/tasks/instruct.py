"""Instruction tuning: conversations rendered with a chat template, loss on assistant turns only.

Row formats (detected per row):

- alpaca: ``{instruction, input, output}`` -> user = instruction (+ ``\\n\\n`` + input when
  non-empty), assistant = output;
- self-instruct seed tasks: ``{instruction, instances: [{input, output}, ...]}`` -> one alpaca
  example per instance;
- ``messages``: ``[{role, content}, ...]`` with roles system / user / assistant;
- sharegpt: ``conversations: [{from, value}, ...]`` with from human/user, gpt/assistant, system.

``prompt_style: chat`` renders with ``data.chat_template``: the tokenizer's own by default (a
tokenizer without one gets :data:`~pace_llm.tasks.tokens.DEFAULT_CHAT_TEMPLATE`, logged), a
built-in family template or a Jinja file (:mod:`pace_llm.tasks.templates`); ``plain`` always
uses that default layout. Every assistant turn is supervised (up to and including its EOS or
end-of-turn text), every system and user turn is not. Evaluation generates the last assistant
turn from everything before it; without ``data.eval_path`` (or a test/validation file beside
the data) the last 5% of rows (at least 1, at most 200) are held out for it.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pace_llm.config import DataArgs
from pace_llm.errors import UserError
from pace_llm.tasks import TaskData
from pace_llm.tasks.examples import LengthPolicy, count_eval
from pace_llm.tasks.sources import Rows, load_splits
from pace_llm.tasks.tokens import (chat_segments, chat_template, eos_id,
                                   generation_example, render_default, segments_to_example)

log = logging.getLogger(__name__)

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "model": "assistant"}
HOLDOUT_FRACTION, HOLDOUT_MAX = 0.05, 200

Conversation = tuple[str, list[dict[str, str]]]  # (where, messages)


def _turns(rows: Rows, n: int, row: dict[str, Any], key: str, role_key: str,
           text_key: str) -> list[dict[str, str]]:
    turns = rows.get(n, row, key, list)
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise UserError(f"{rows.where(n)}: {key}[{i}] needs fields '{role_key}' and "
                            f"'{text_key}', got {turn!r:.80}")
        role = ROLES.get(str(turn[role_key]).lower())
        if role is None:
            raise UserError(f"{rows.where(n)}: {key}[{i}].{role_key} = {turn[role_key]!r} is not "
                            f"a known role; expected one of {', '.join(ROLES)}")
        if not isinstance(turn[text_key], str):
            raise UserError(f"{rows.where(n)}: {key}[{i}].{text_key} must be a string")
        messages.append({"role": role, "content": turn[text_key]})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{rows.where(n)}: the conversation has no assistant turn to train on")
    return messages


def _alpaca(instruction: str, inp: str, output: str) -> list[dict[str, str]]:
    user = instruction + ("\n\n" + inp if inp.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def conversations(rows: Rows) -> list[Conversation]:
    """Every row as (where, messages); a row in no known format raises naming the row."""
    out: list[Conversation] = []
    for n, row in rows.nonempty().items:
        where = rows.where(n)
        if "messages" in row:
            out.append((where, _turns(rows, n, row, "messages", "role", "content")))
        elif "conversations" in row:
            out.append((where, _turns(rows, n, row, "conversations", "from", "value")))
        elif "instances" in row:
            instruction = rows.get(n, row, "instruction")
            for i, inst in enumerate(rows.get(n, row, "instances", list), start=1):
                if not isinstance(inst, dict) or not isinstance(inst.get("output"), str):
                    raise UserError(f"{where}: instances[{i}] missing field 'output'")
                out.append((f"{where} instance {i}",
                            _alpaca(instruction, str(inst.get("input") or ""), inst["output"])))
        elif "instruction" in row or "output" in row:
            out.append((where, _alpaca(rows.get(n, row, "instruction"),
                                       str(row.get("input") or ""), rows.get(n, row, "output"))))
        else:
            have = ", ".join(sorted(row)) or "nothing"
            raise UserError(f"{where}: not an instruction row (the row has: {have}); expected "
                            "instruction/input/output, instruction/instances, messages or "
                            "conversations")
    return out


def _split(data: DataArgs) -> tuple[list[Conversation], list[Conversation]]:
    train_rows, eval_rows = load_splits(data.path, data.eval_path, data.hub_config, None)
    train = conversations(train_rows)
    if eval_rows is not None:
        return train[: data.limit], conversations(eval_rows)
    hold = min(HOLDOUT_MAX, max(1, int(len(train) * HOLDOUT_FRACTION)))
    if len(train) < 2:
        raise UserError(f"{train_rows.source}: {len(train)} example(s) cannot be split into "
                        "train and eval; add rows or set data.eval_path")
    log.info("no eval split: holding out the last %d of %d examples of %s for evaluation",
             hold, len(train), train_rows.source)
    return train[:-hold][: data.limit], train[-hold:]


def eval_example(tok: Any, where: str, messages: list[dict[str, str]], template: str,
                 eos: int) -> dict[str, Any]:
    """Prompt = the conversation up to the last assistant turn; reference = that turn's text."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    segments = chat_segments(tok, messages[: last + 1], template, where)
    return generation_example(tok, segments, eos, messages[last]["content"])


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def text_metrics(generated: list[str], references: list[str]) -> dict[str, float]:
    """exact_match (whitespace-stripped) and token_f1 (bag-of-words F1, SQuAD-style), means."""
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generations for {len(references)} references")
    if not generated:
        return {"exact_match": 0.0, "token_f1": 0.0}
    em = f1 = 0.0
    for gen, ref in zip(generated, references):
        em += gen.strip() == ref.strip()
        g, r = _words(gen), _words(ref)
        common = sum(min(g.count(w), r.count(w)) for w in set(g))
        f1 += 2 * common / (len(g) + len(r)) if common else float(not g and not r)
    return {"exact_match": em / len(generated), "token_f1": f1 / len(generated)}


def build(data: DataArgs, tok: Any) -> TaskData:
    """Instruction data as causal_lm TaskData."""
    eos = eos_id(tok, "the instruct task")
    template = chat_template(tok, data.prompt_style, data.chat_template)
    train_convs, eval_convs = _split(data)
    policy = LengthPolicy(data.max_length, data.on_too_long, data.path)
    train = []
    for where, messages in train_convs:
        segments = chat_segments(tok, messages, template, where)
        example = policy.causal(segments_to_example(tok, segments, eos), where)
        if example is not None:
            train.append(example)
    stats = policy.finish()
    evals = [eval_example(tok, where, messages, template, eos) for where, messages in eval_convs]
    return TaskData(kind="causal_lm", train=train, eval=evals, num_labels=None,
                    stats=count_eval(stats, evals), metric=text_metrics, name="instruct",
                    main_metric="token_f1")


def texts(data: DataArgs) -> list[str]:
    """Training conversations in the default layout (for training an offline tokenizer)."""
    train, _ = _split(data)
    return [render_default(messages) for _, messages in train]
