"""`pace-llm <command>`: one dispatcher for train, export and data-check.

Each command parses its own flags (jsonargparse) and runs through ``errors.run_command``, so
bad input is one ``error: ...`` message and exit code 2 whichever command gets it.
"""

from __future__ import annotations

import importlib
import sys

from pace_llm.errors import UserError, run_command

COMMANDS = {
    "train": ("pace_llm.train", "fine-tune with a recipe (same as deepspeed pace_llm/train.py)"),
    "export": ("pace_llm.export", "export / check / merge a run's adapter"),
    "data-check": ("pace_llm.datacheck", "print one rendered, masked example and data statistics"),
}

USAGE = "usage: pace-llm <command> [args]   (pace-llm <command> --help for its flags)"


def _usage() -> str:
    lines = "\n".join(f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items())
    return f"{USAGE}\n\ncommands:\n{lines}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if not argv or argv[0] not in COMMANDS:

        def refuse() -> None:
            given = f"unknown command {argv[0]!r}" if argv else "no command given"
            raise UserError(f"{given}; commands: {', '.join(COMMANDS)} (pace-llm --help)")

        return run_command(refuse)
    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
