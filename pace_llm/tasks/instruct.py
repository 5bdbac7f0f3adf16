"""Instruction tuning: conversations rendered with a chat template, loss on assistant turns only.

Row formats (detected per row):

- alpaca: ``{instruction, input, output}`` -> user = instruction (+ ``\\n\\n`` + input when
  non-empty), assistant = output;
- self-instruct seed tasks: ``{instruction, instances: [{input, output}, ...]}`` -> one alpaca
  example per instance;
- ``messages``: ``[{role, content}, ...]`` with roles system / user / assistant;
- sharegpt: ``conversations: [{from, value}, ...]`` with from human/user, gpt/assistant, system;
- TRL's prompt-completion: ``{prompt, completion}``, both text (user = prompt, assistant =
  completion) or both conversations (``[{role, content}, ...]``: the prompt's turns, then the
  completion's).

``prompt_style: chat`` renders with ``data.chat_template``: the tokenizer's own by default (a
tokenizer without one gets :data:`~pace_llm.data.tokens.DEFAULT_CHAT_TEMPLATE`, logged), a
built-in family template or a Jinja file (:mod:`pace_llm.data.templates`); ``plain`` always
uses that default layout. Every assistant turn is supervised (up to and including its EOS or
end-of-turn text), every system and user turn is not. Evaluation generates the last assistant
turn from everything before it; without ``data.eval_path`` (or a test/validation file beside
the data) the last ``data.holdout`` of the rows (5% by default; at least 1, at most 200) are
held out for it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pace_llm.data.length import LengthPolicy
from pace_llm.data.sources import Rows, columns_hint, load_splits
from pace_llm.data.spec import Splits, TaskSpec, split_records
from pace_llm.data.tokens import (Reply, chat_segments, chat_template, eos_id,
                                  generation_example, render_default, reply_format,
                                  segments_to_example)
from pace_llm.errors import UserError

if TYPE_CHECKING:
    from pace_llm.schema import DataArgs

log = logging.getLogger(__name__)

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "model": "assistant"}
HOLDOUT_MAX = 200

Conversation = tuple[str, list[dict[str, str]]]  # (where, messages)


def _turns(rows: Rows, n: int, row: dict[str, Any], key: str, role_key: str,
           text_key: str, whole: bool = True) -> list[dict[str, str]]:
    """``row[key]``'s turns as messages; ``whole``: they are the whole conversation (it needs an
    assistant turn)."""
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
    if whole and not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{rows.where(n)}: the conversation has no assistant turn to train on")
    return messages


def _alpaca(instruction: str, inp: str, output: str) -> list[dict[str, str]]:
    user = instruction + ("\n\n" + inp if inp.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


ALPACA = ("instruction", "output")
FORMATS = ("instruction/input/output, instruction/instances, messages, conversations or "
           "prompt/completion")


def _prompt_completion(rows: Rows, n: int, row: dict[str, Any]) -> list[dict[str, str]]:
    """TRL's prompt-completion row: two texts, or two lists of {role, content} turns."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, list) and isinstance(completion, list):
        messages = (_turns(rows, n, row, "prompt", "role", "content", whole=False)
                    + _turns(rows, n, row, "completion", "role", "content", whole=False))
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{rows.where(n)}: the completion has no assistant turn to train on")
        return messages
    raise UserError(f"{rows.where(n)}: fields 'prompt' and 'completion' must both be text or "
                    f"both lists of {{role, content}} turns (TRL's formats); got "
                    f"{type(prompt).__name__} and {type(completion).__name__}")


def each_conversation(rows: Rows) -> Iterator[Conversation]:
    """Every row as (where, messages), as read; a row in no known format raises naming it."""
    for n, row in rows.nonempty():
        where = rows.where(n)
        if "messages" in row:
            yield where, _turns(rows, n, row, "messages", "role", "content")
        elif "conversations" in row:
            yield where, _turns(rows, n, row, "conversations", "from", "value")
        elif "instances" in row:
            instruction = rows.get(n, row, "instruction")
            for i, inst in enumerate(rows.get(n, row, "instances", list), start=1):
                if not isinstance(inst, dict) or not isinstance(inst.get("output"), str):
                    raise UserError(f"{where}: instances[{i}] missing field 'output'")
                yield (f"{where} instance {i}",
                       _alpaca(instruction, str(inst.get("input") or ""), inst["output"]))
        elif "prompt" in row and "completion" in row:
            yield where, _prompt_completion(rows, n, row)
        elif "instruction" in row or "output" in row:
            yield where, _alpaca(rows.get(n, row, "instruction", fields=ALPACA),
                                 str(row.get("input") or ""),
                                 rows.get(n, row, "output", fields=ALPACA))
        else:
            have = ", ".join(sorted(row)) or "nothing"
            raise UserError(f"{where}: not an instruction row (the row has: {have}); expected "
                            f"{FORMATS}" + columns_hint(row, ALPACA))


def conversations(rows: Rows) -> list[Conversation]:
    """Every row as (where, messages)."""
    return list(each_conversation(rows))


RECORD = {"where": "string", "messages": "messages"}


def _read(data: DataArgs) -> Splits:
    """Training conversations (streamed) and evaluation ones: data.eval_path, a test/validation
    file beside the data, or the last data.holdout of the training rows (at least 1, at most
    200)."""
    train_rows, eval_rows = load_splits(data.path, data.eval_path, data.hub_config, None,
                                        columns=data.columns, streaming=data.streaming)
    train = ({"where": w, "messages": m} for w, m in each_conversation(train_rows))
    if eval_rows is not None:
        return Splits(train, data.path, lambda: [{"where": w, "messages": m}
                                                 for w, m in conversations(eval_rows)],
                      limit=data.limit)

    def holdout(n: int) -> int:
        hold = min(HOLDOUT_MAX, max(1, int(n * data.holdout)))
        if n < 2:
            raise UserError(f"{train_rows.source}: {n} example(s) cannot be split into "
                            "train and eval; add rows or set data.eval_path")
        log.info("no eval split: holding out the last %d of %d examples of %s for evaluation "
                 "(data.holdout %g)", hold, n, train_rows.source, data.holdout)
        return hold
    return Splits(train, data.path, None, holdout=holdout, limit=data.limit)


@dataclass(frozen=True)
class Ctx:
    template: str
    eos: int


def train_examples(tok: Any, ctx: Ctx, records: list[dict], policy: LengthPolicy
                   ) -> list[dict | None]:
    """One training example per conversation record (None: dropped by the length policy)."""
    return [policy.causal(segments_to_example(
        tok, chat_segments(tok, r["messages"], ctx.template, r["where"]), ctx.eos), r["where"])
        for r in records]


def eval_examples(tok: Any, ctx: Ctx, records: list[dict]) -> list[dict]:
    reply = reply_format(tok, ctx.template)  # where generation stops, what is scored
    return [eval_example(tok, r["where"], r["messages"], ctx.template, ctx.eos, reply)
            for r in records]


def eval_example(tok: Any, where: str, messages: list[dict[str, str]], template: str,
                 eos: int, reply: Reply) -> dict[str, Any]:
    """Prompt = the conversation up to the last assistant turn; reference = that turn's text;
    ``reply``: where its generation stops (the template's end of turn)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    segments = chat_segments(tok, messages[: last + 1], template, where)
    return generation_example(tok, segments, eos, messages[last]["content"],
                              reply)


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


def task_spec(data: DataArgs, tok: Any) -> TaskSpec:
    """Instruction data as a causal_lm spec (sets the chat template on the tokenizer)."""
    eos = eos_id(tok, "the instruct task")
    template = chat_template(tok, data.prompt_style, data.chat_template)
    return TaskSpec(kind="causal_lm", name="instruct", num_labels=None, metric=text_metrics,
                    main_metric="token_f1", read=lambda: _read(data), schema=RECORD,
                    train_fn=train_examples, eval_fn=eval_examples, ctx=Ctx(template, eos),
                    key={"template": template, "eos": eos, "holdout": data.holdout})


def texts(data: DataArgs) -> Iterator[str]:
    """Training conversations in the default layout (for training an offline tokenizer)."""
    splits = _read(data)
    train, _ = split_records(splits, list(splits.train))
    return (render_default(r["messages"]) for r in train)
