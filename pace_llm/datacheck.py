"""`pace-llm data-check --recipe X [--example N] [--section.key value ...]`.

Builds the recipe's tokenizer and task exactly as training would (for a ``model.build`` recipe
the tokenizer is trained in a temporary directory, as the demo does), then prints one
rendered training example with the supervised tokens between ``[SUP]`` and ``[/SUP]`` (with
``prompt_style: chat``, the conversation as the chat template renders it, after a line naming
the template), one evaluation prompt, and the data statistics. Bad input prints one message
and exits 2.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from pace_llm import console
from pace_llm.config import parse_command
from pace_llm.data.build import build_task, task_texts
from pace_llm.data.examples import IGNORE, TaskData
from pace_llm.data.templates import describe
from pace_llm.errors import UserError, run_command
from pace_llm.model import load_tokenizer
from pace_llm.schema import Recipe
from pace_llm.tinymodel import DEFAULT_VOCAB, train_tokenizer

SUP_OPEN, SUP_CLOSE = "[SUP]", "[/SUP]"


def render_example(tok: Any, example: dict[str, Any]) -> str:
    """A training example as text; causal: supervised runs wrapped in [SUP]...[/SUP]."""
    if "labels" not in example:
        return f"{tok.decode(example['input_ids'])}\n  -> label {example['label']}"
    out, run, sup = [], [], False
    for token, label in zip(example["input_ids"], example["labels"]):
        if (label != IGNORE) != sup and run:
            out.append(_run(tok, run, sup))
            run = []
        sup = label != IGNORE
        run.append(token)
    if run:
        out.append(_run(tok, run, sup))
    return "".join(out)


def _run(tok: Any, ids: list[int], sup: bool) -> str:
    text = tok.decode(ids)
    return f"{SUP_OPEN}{text}{SUP_CLOSE}" if sup else text


def report(task: TaskData, tok: Any, index: int = 0) -> str:
    """The data-check report: one example, one eval input, the statistics."""
    if not 0 <= index < len(task.train):
        raise UserError(f"--example {index}: the training set has {len(task.train)} examples; "
                        f"give 0..{len(task.train) - 1}")
    lines = [f"task: {task.name} ({task.kind}" + (f", {task.num_labels} labels)" if
                                                  task.num_labels else ")"),
             f"--- training example {index} ---", render_example(tok, task.train[index])]
    if task.eval:
        first = task.eval[0]
        lines.append("--- first evaluation input ---")
        if "prompt_ids" in first:
            lines += [tok.decode(first["prompt_ids"]), f"  reference: {first['reference']!r}"]
        else:
            lines.append(render_example(tok, first))
    lines.append("--- statistics ---")
    lines += [f"{key}: {value}" for key, value in task.stats.items()]
    for name, rows in task.extra_eval.items():
        lines.append(f"eval_rows[{name}]: {len(rows)}")
    return "\n".join(lines)


def check(recipe: Recipe, index: int = 0) -> str:
    """Build tokenizer and task as training would; return the report."""
    if recipe.model.build is not None:
        with tempfile.TemporaryDirectory() as tmp:
            vocab = int(recipe.model.build.get("vocab_size", DEFAULT_VOCAB))
            tok = train_tokenizer(task_texts(recipe.data), Path(tmp), vocab)
    else:
        tok = load_tokenizer(recipe.model.name_or_path, recipe, need_model=False)
    task = build_task(recipe.data, tok)
    text = report(task, tok, index)
    if recipe.data.prompt_style == "chat" and task.kind == "causal_lm":
        head, _, rest = text.partition("\n")
        text = f"{head}\nchat template: {describe(recipe.data.chat_template)}\n{rest}"
    return text


EXAMPLES = """examples:
  pace-llm data-check --recipe recipes/demo.yaml
  pace-llm data-check --recipe recipes/gsm8k.yaml --example 3 --data.limit 100"""


def main(argv: list[str] | None = None) -> int:
    """Run the data check; 0 on success, 2 (one message on stderr) on bad input."""
    from jsonargparse.typing import NonNegativeInt

    console.configure()
    example = {"type": NonNegativeInt, "default": 0,
               "help": "Index of the training example to render."}

    def body() -> None:
        command = parse_command(argv, prog="pace-llm data-check", description=EXAMPLES,
                                training=False, extra={"--example": example})
        print(check(command.recipe, command.extra["example"]))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
