"""Synthetic GSM8K-format problems for bench/gpu_suite.py (standard library only, seeded).

Each row is ``{"question": ..., "answer": "...\\n#### N"}`` as in openai/gsm8k: a question of
``k`` facts and a worked answer of ``k`` steps with ``<<a*b=c>>`` calculator marks, ``k`` drawn
from 1..7, so rows run from about 100 to 470 tokens (272 on average, 240 different lengths in
2000 rows, with the suite's tokenizer: digits are split one per token) and a batch has many
different lengths, as real GSM8K has. pace_llm's gsm8k task reads the written ``train.jsonl``
and ``test.jsonl`` like the real files; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "Tina", "Mark",
         "Carla", "Joy", "Randy", "Jasmine", "Ali", "Rose", "Tom", "Maria", "Kylie", "Sam"]
ITEMS = ["apples", "books", "pencils", "cookies", "marbles", "stickers", "cupcakes", "shirts",
         "tickets", "flowers", "candles", "notebooks", "oranges", "toy cars", "bottles", "boxes"]
PLACES = ["the market", "the school fair", "a bakery", "the mall", "a garage sale", "the store"]


def problem(rng: random.Random) -> dict[str, str]:
    """One problem: k purchases, then the total spent."""
    k = rng.randint(1, 7)
    name = rng.choice(NAMES)
    facts, steps, costs = [], [], []
    for _ in range(k):
        item, place = rng.choice(ITEMS), rng.choice(PLACES)
        count, price = rng.randint(2, 40), rng.randint(2, 25)
        cost = count * price
        facts.append(f"At {place}, {name} buys {count} {item} that cost ${price} each.")
        steps.append(f"The {item} from {place} cost {count} * {price} = "
                     f"<<{count}*{price}={cost}>>{cost} dollars.")
        costs.append(cost)
    total = sum(costs)
    question = " ".join(facts) + f" How many dollars does {name} spend in all?"
    plus = "+".join(str(c) for c in costs)
    answer = "\n".join(steps) + (f"\nIn all {name} spends {' + '.join(map(str, costs))} = "
                                 f"<<{plus}={total}>>{total} dollars.\n#### {total}")
    return {"question": question, "answer": answer}


def write(folder: Path, n_train: int, n_test: int = 32, seed: int = 0) -> Path:
    """Write ``train.jsonl`` and ``test.jsonl`` into ``folder``; returns the train file."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps(problem(rng)) + "\n")
    return folder / "train.jsonl"
