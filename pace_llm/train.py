"""Entry point: the training story.

    recipe → run directory → distributed → DeepSpeed config → engine choice → tokenizer and data
    → base model → noisy LoRA → engine (flat or DeepSpeed) → train → export

    deepspeed pace_llm/train.py --recipe recipes/gsm8k.yaml [--section.key value ...]
    torchrun --nproc_per_node N pace_llm/train.py --recipe ...
    python pace_llm/train.py --recipe ...            (one process, no launcher)

Parse the recipe (pace_llm/config.py), start the run (pace_llm/setup.py: lock the directory,
build every component, resume if asked), train (pace_llm/trainer.py), finish (the adapter,
the merged model, the curves: pace_llm/results.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pace_llm import console
from pace_llm import distributed as D
from pace_llm.config import parse_command
from pace_llm.errors import run_command
from pace_llm.results import finish
from pace_llm.rundir import RunFinished
from pace_llm.schema import Recipe, dump_recipe
from pace_llm.setup import started


def main(argv: list[str] | None = None) -> int:
    """Run a recipe; bad input prints one message and returns 2 (no traceback)."""
    console.configure()

    def body() -> None:
        command = parse_command(argv)
        if command.print_config:
            print(dump_recipe(command.recipe), end="")
            return
        try:
            train(command.recipe)
        except RunFinished as done:
            if D.is_main():
                print(f"[pace_llm] {done}", flush=True)

    return run_command(body, finish=lambda ok: D.shutdown(clean=ok))


def train(recipe: Recipe) -> Path:
    """The training story. Returns the run directory."""
    with started(recipe) as trainer:
        trainer.train()
        if trainer.finished:
            finish(trainer.run, trainer.stopping, trainer.log)
    return trainer.run.out


if __name__ == "__main__":
    sys.exit(main())
