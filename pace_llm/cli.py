"""`pace-llm <command>`: train, export, data-check. Bad input exits 2 with one clear message."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": ("pace_llm.train", "fine-tune with a recipe (same as deepspeed pace_llm/train.py)"),
    "export": ("pace_llm.export", "export / check / merge a run's adapter"),
    "data-check": ("pace_llm.datacheck", "print one rendered, masked example and data statistics"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items())
        print(f"usage: pace-llm <command> [args]\n\ncommands:\n{lines}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = __import__(COMMANDS[argv[0]][0], fromlist=["main"])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
