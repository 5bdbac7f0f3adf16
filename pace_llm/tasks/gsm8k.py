"""GSM8K: grade-school math word problems, trained as prompt -> worked solution ending ``#### N``.

Layout (``data.prompt_style: plain``, the paper's prompt)::

    [BOS] Answer below question. First think step-by-step and then answer the final number:\\n\\n
    <question>\\n\\n | <worked solution ... #### N> <EOS>

The prompt ends with the separator ``\\n\\n``; everything after ``|`` is supervised. Prompt and
target are tokenized separately and concatenated, so generation from the prompt ids sees
exactly the training prefix. ``prompt_style: chat`` sends the same prompt (without the
separator) as the user message through the chat template (``data.chat_template``: the
tokenizer's own by default) and supervises the assistant reply. The metric is exact match of
the extracted final numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from pace_llm.data.length import LengthPolicy
from pace_llm.data.sources import Rows, load_splits
from pace_llm.data.spec import Splits, TaskSpec
from pace_llm.data.tokens import (Segment, chat_segments, chat_template,
                                  check_prompt_style, eos_id, generation_example, render_default,
                                  reply_format, segments_to_example)
from pace_llm.errors import UserError

if TYPE_CHECKING:
    from pace_llm.schema import DataArgs

PAPER_PROMPT = ("Answer below question. First think step-by-step and then answer the final "
                "number:\n\n{question}")
SEPARATOR = "\n\n"
HUB_CONFIG = "main"

# A number: optional sign (not when a digit or letter precedes it, as in ``5-3``), then
# either thousands groups (2,125 / 1,000,000) or plain digits, then an optional decimal part.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<!\d)\.\d+")


def normalize_number(text: str) -> str | None:
    """Canonical form of a number string: no commas, no trailing zeros (``5.0`` -> ``5``)."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: the first number after the last ``####``, else the
    last number in the text; normalised (commas stripped, sign kept, ``5.0`` == ``5``)."""
    head, sep, tail = text.rpartition("####")
    if sep:
        match = _NUMBER.search(tail)
        if match:
            return normalize_number(match.group())
        text = head
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def exact_match(generated: list[str], references: list[str]) -> dict[str, float]:
    """Fraction of generations whose extracted answer equals the reference's."""
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generations for {len(references)} references")
    if not generated:
        return {"exact_match": 0.0}
    hits = 0
    for gen, ref in zip(generated, references):
        answer = extract_answer(gen)
        hits += answer is not None and answer == extract_answer(ref)
    return {"exact_match": hits / len(generated)}


def segments(tok: Any, question: str, answer: str, prompt_style: str, template: str | None,
             where: str) -> list[Segment]:
    """(text, supervised) segments of one problem in the chosen prompt style."""
    prompt = PAPER_PROMPT.format(question=question)
    if prompt_style == "plain":
        return [(prompt + SEPARATOR, False), (answer, True)]
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return chat_segments(tok, messages, template, where)


@dataclass(frozen=True)
class Ctx:
    """What turns a problem into tokens, besides the tokenizer."""

    prompt_style: str
    template: str | None
    eos: int


RECORD = {"where": "string", "question": "string", "answer": "string"}
FIELDS = ("question", "answer")
"""A row's fields (data.columns maps other names to them)."""


def records(rows: Rows, limit: int | None = None) -> Iterator[dict[str, str]]:
    """Validated {where, question, answer} records of the first ``limit`` rows."""
    for n, row in rows.nonempty().head(limit):
        yield {"where": rows.where(n), "question": rows.get(n, row, "question", fields=FIELDS),
               "answer": rows.get(n, row, "answer", fields=FIELDS)}


def train_examples(tok: Any, ctx: Ctx, records: list[dict], policy: LengthPolicy
                   ) -> list[dict | None]:
    """One training example per record (None: dropped by the length policy)."""
    out = []
    for r in records:
        segs = segments(tok, r["question"], r["answer"], ctx.prompt_style, ctx.template,
                        r["where"])
        out.append(policy.causal(segments_to_example(tok, segs, ctx.eos), r["where"]))
    return out


def eval_examples(tok: Any, ctx: Ctx, records: list[dict]) -> list[dict]:
    """One generation example per record (chat: with where its reply stops)."""
    reply = reply_format(tok, ctx.template) if ctx.template is not None else None
    return [generation_example(tok, segments(tok, r["question"], r["answer"], ctx.prompt_style,
                                             ctx.template, r["where"]), ctx.eos, r["answer"],
                               reply)
            for r in records]


def task_spec_from_rows(read: Callable[[], tuple[Rows, Rows]], data: DataArgs, tok: Any,
                        name: str) -> TaskSpec:
    """The spec of a question/answer task (GSM8K and the synthetic task share this)."""
    eos = eos_id(tok, f"the {name} task")
    check_prompt_style(data.prompt_style, data.chat_template)
    template = (chat_template(tok, "chat", data.chat_template) if data.prompt_style == "chat"
                else None)

    def splits() -> Splits:
        train, evals = read()
        return Splits(train=records(train, data.limit), source=train.source,
                      eval=lambda: list(records(evals)))

    return TaskSpec(kind="causal_lm", name=name, num_labels=None, metric=exact_match,
                    main_metric="exact_match", read=splits, schema=RECORD, train_fn=train_examples,
                    eval_fn=eval_examples, ctx=Ctx(data.prompt_style, template, eos),
                    key={"template": template, "eos": eos})


def _splits(data: DataArgs) -> tuple[Rows, Rows]:
    train, evals = load_splits(data.path, data.eval_path, data.hub_config or HUB_CONFIG, "test",
                               columns=data.columns, streaming=data.streaming)
    if evals is None:
        raise UserError(f"data.path {data.path!r}: no evaluation split found (looked for a "
                        "test/validation/dev file beside it); set data.eval_path")
    return train, evals


def task_spec(data: DataArgs, tok: Any) -> TaskSpec:
    """GSM8K from ``openai/gsm8k`` (config ``main``, splits train/test) or local files."""
    return task_spec_from_rows(lambda: _splits(data), data, tok, "gsm8k")


def render_text(question: str, answer: str, prompt_style: str) -> str:
    """One problem as text, as a tokenizer-less base would see it (no chat template yet)."""
    prompt = PAPER_PROMPT.format(question=question)
    if prompt_style == "plain":
        return prompt + SEPARATOR + answer
    return render_default([{"role": "user", "content": prompt},
                           {"role": "assistant", "content": answer}])


def texts(data: DataArgs) -> Iterator[str]:
    """Rendered training problems, as read (for training an offline base's tokenizer)."""
    train, _ = load_splits(data.path, data.eval_path, data.hub_config or HUB_CONFIG, "test",
                           columns=data.columns)
    return (render_text(r["question"], r["answer"], data.prompt_style)
            for r in records(train, data.limit))

