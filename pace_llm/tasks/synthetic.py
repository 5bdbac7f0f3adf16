"""Synthetic GSM8K-format word problems for the offline demo: seeded, small, learnable.

Each problem is one of a few templates (one- or two-step addition, subtraction,
multiplication with numbers below 10) with a worked answer, one equation per line, ending
``#### N`` exactly like GSM8K. Training and evaluation problems come from the same generator
with different seeds, and no evaluation question appears in the training set. Prompt,
target and metric are GSM8K's (:mod:`pace_llm.tasks.gsm8k`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pace_llm.data.sources import Rows
from pace_llm.data.spec import TaskSpec
from pace_llm.errors import UserError
from pace_llm.tasks.gsm8k import render_text, task_spec_from_rows

if TYPE_CHECKING:
    from pace_llm.schema import DataArgs

NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Zoe")
ITEMS = ("apples", "pens", "cards", "shells", "books", "coins")
EVAL_EXAMPLES = 200


def _add(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    a, b = r.randint(1, 9), r.randint(1, 9)
    question = (f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does "
                f"{name} have now?")
    return question, [f"{a} + {b} = {a + b}"], a + b


def _sub(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    a = r.randint(2, 9)
    b = r.randint(1, a - 1)
    question = (f"{name} has {a} {item}. {name} gives away {b} {item}. How many {item} does "
                f"{name} have left?")
    return question, [f"{a} - {b} = {a - b}"], a - b


def _mul(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    a, b = r.randint(2, 5), r.randint(2, 5)
    question = (f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} "
                "have?")
    return question, [f"{a} * {b} = {a * b}"], a * b


def _add_add(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    a, b, c = r.randint(1, 9), r.randint(1, 9), r.randint(1, 9)
    question = (f"{name} has {a} {item}. {name} buys {b} more and then finds {c} more. How many "
                f"{item} does {name} have now?")
    return question, [f"{a} + {b} = {a + b}", f"{a + b} + {c} = {a + b + c}"], a + b + c


def _mul_add(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    a, b, c = r.randint(2, 5), r.randint(2, 5), r.randint(1, 9)
    question = (f"{name} has {a} bags with {b} {item} in each bag and {c} loose {item}. How many "
                f"{item} does {name} have?")
    return question, [f"{a} * {b} = {a * b}", f"{a * b} + {c} = {a * b + c}"], a * b + c


TEMPLATES = (_add, _sub, _mul, _add_add, _mul_add)


def problem(r: random.Random) -> dict[str, str]:
    """One {question, answer} row; the answer's lines are the steps, then ``#### N``."""
    template = TEMPLATES[r.randrange(len(TEMPLATES))]
    question, steps, result = template(r, r.choice(NAMES), r.choice(ITEMS))
    return {"question": question, "answer": "\n".join(steps + [f"#### {result}"])}


def generate(n: int, seed: int, exclude: set[str] | None = None) -> list[dict[str, str]]:
    """``n`` problems from ``seed`` (repeats allowed, questions in ``exclude`` skipped)."""
    r = random.Random(seed)
    exclude = exclude or set()
    rows: list[dict[str, str]] = []
    for _ in range(100 * n):
        row = problem(r)
        if row["question"] not in exclude:
            rows.append(row)
            if len(rows) == n:
                return rows
    raise UserError(f"data.num_examples: cannot draw {n} synthetic problems outside the "
                    f"{len(exclude)} excluded ones; lower data.num_examples")


def splits(data: DataArgs) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, eval) problems: num_examples from data.seed, 200 unseen ones from seed + 1."""
    train = generate(data.num_examples, data.seed)
    evals = generate(EVAL_EXAMPLES, data.seed + 1, exclude={row["question"] for row in train})
    return train, evals


def task_spec(data: DataArgs, tok: Any) -> TaskSpec:
    """The synthetic task (GSM8K prompt, target and metric); problems drawn on a cache miss."""
    def read() -> tuple[Rows, Rows]:
        train, evals = splits(data)
        return (Rows("synthetic:train", list(enumerate(train, 1))),
                Rows("synthetic:eval", list(enumerate(evals, 1))))
    return task_spec_from_rows(read, data, tok, "synthetic")


def texts(data: DataArgs) -> Iterator[str]:
    """Rendered training problems (the demo trains its tokenizer on them)."""
    return (render_text(row["question"], row["answer"], data.prompt_style)
            for row in splits(data)[0][: data.limit])
