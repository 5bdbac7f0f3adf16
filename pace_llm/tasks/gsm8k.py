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
from decimal import Decimal, InvalidOperation
from typing import Any

from pace_llm.config import DataArgs
from pace_llm.errors import UserError
from pace_llm.tasks import TaskData
from pace_llm.tasks.examples import LengthPolicy, count_eval
from pace_llm.tasks.sources import Rows, load_splits
from pace_llm.tasks.tokens import (Segment, chat_segments, chat_template, check_prompt_style,
                                   eos_id, generation_example, render_default,
                                   segments_to_example)

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


def build_from_rows(train_rows: Rows, eval_rows: Rows, data: DataArgs, tok: Any,
                    name: str) -> TaskData:
    """TaskData from question/answer rows (GSM8K and the synthetic task share this)."""
    eos = eos_id(tok, f"the {name} task")
    check_prompt_style(data.prompt_style, data.chat_template)
    template = (chat_template(tok, "chat", data.chat_template) if data.prompt_style == "chat"
                else None)
    policy = LengthPolicy(data.max_length, data.on_too_long, train_rows.source)
    train = []
    for n, row in train_rows.nonempty().head(data.limit).items:
        question, answer = train_rows.get(n, row, "question"), train_rows.get(n, row, "answer")
        segs = segments(tok, question, answer, data.prompt_style, template, train_rows.where(n))
        example = policy.causal(segments_to_example(tok, segs, eos), train_rows.where(n))
        if example is not None:
            train.append(example)
    stats = policy.finish()
    evals = []
    for n, row in eval_rows.nonempty().items:
        question, answer = eval_rows.get(n, row, "question"), eval_rows.get(n, row, "answer")
        segs = segments(tok, question, answer, data.prompt_style, template, eval_rows.where(n))
        evals.append(generation_example(tok, segs, eos, answer))
    return TaskData(kind="causal_lm", train=train, eval=evals, num_labels=None,
                    stats=count_eval(stats, evals), metric=exact_match, name=name,
                    main_metric="exact_match")


def _splits(data: DataArgs) -> tuple[Rows, Rows]:
    train, evals = load_splits(data.path, data.eval_path, data.hub_config or HUB_CONFIG, "test")
    if evals is None:
        raise UserError(f"data.path {data.path!r}: no evaluation split found (looked for a "
                        "test/validation/dev file beside it); set data.eval_path")
    return train, evals


def build(data: DataArgs, tok: Any) -> TaskData:
    """GSM8K from ``openai/gsm8k`` (config ``main``, splits train/test) or local files."""
    train, evals = _splits(data)
    return build_from_rows(train, evals, data, tok, "gsm8k")


def render_text(question: str, answer: str, prompt_style: str) -> str:
    """One problem as text, as a tokenizer-less base would see it (no chat template yet)."""
    prompt = PAPER_PROMPT.format(question=question)
    if prompt_style == "plain":
        return prompt + SEPARATOR + answer
    return render_default([{"role": "user", "content": prompt},
                           {"role": "assistant", "content": answer}])


def texts(data: DataArgs) -> list[str]:
    """Rendered training problems (for training an offline base's tokenizer)."""
    train, _ = load_splits(data.path, data.eval_path, data.hub_config or HUB_CONFIG, "test")
    return [render_text(train.get(n, r, "question"), train.get(n, r, "answer"), data.prompt_style)
            for n, r in train.nonempty().head(data.limit).items]

