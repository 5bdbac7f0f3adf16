"""The one exception type for bad user input, the one place that turns it into exit code 2,
and the helpers every message is written with (a shortened list, an exception's first line, a
text file read with its bad line named)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path

PREFIX = "error: "
"""Every command (train, export, data-check) starts its one message with this."""


class UserError(Exception):
    """A problem in the user's recipe, data or paths. Printed without a traceback, exit code 2."""

    exit_code = 2


def bulleted(title: str, items: Iterable[str]) -> str:
    """``title:`` then one ``  - item`` line per item: the list format of every message that
    reports several problems at once."""
    return f"{title}:\n" + "\n".join(f"  - {item}" for item in items)


def problems_message(title: str, problems: list[str]) -> str:
    """A problem alone is the whole message; several are listed under ``title``."""
    return problems[0] if len(problems) == 1 else bulleted(title, problems)


def problems_error(title: str, problems: list[str]) -> UserError:
    """One UserError for every problem found (see :func:`problems_message`)."""
    return UserError(problems_message(title, problems))


class RecipeError(UserError):
    """One or more problems in a recipe; ``str()`` is the one problem, or lists them all."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        super().__init__(problems_message(f"{len(problems)} problem(s) in {source}", problems))


def run_command(body: Callable[[], int | None],
                finish: Callable[[bool], None] | None = None) -> int:
    """Run a command's body; a UserError becomes one message on stderr and exit code 2.

    ``finish(ok)`` runs afterwards either way (train leaves its process group there).
    """
    try:
        code = body() or 0
    except UserError as exc:
        print(f"{PREFIX}{exc}", file=sys.stderr, flush=True)
        if finish is not None:
            finish(False)
        return exc.exit_code
    if finish is not None:
        finish(True)
    return code


def listing(names: list[str], first: int = 5) -> str:
    """``a, b, c and 4 more``: a long list shortened for a message (``nothing`` if empty)."""
    shown = ", ".join(names[:first])
    return f"{shown} and {len(names) - first} more" if len(names) > first else shown or "nothing"


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line, cut to ``limit`` characters (for a one-line message)."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()),
                type(exc).__name__)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_text(path: Path) -> str:
    """A text file's contents; one that is not UTF-8, or is binary, is named with its line."""
    data = path.read_bytes()
    if b"\x00" not in data:
        with suppress(UnicodeDecodeError):
            return data.decode("utf-8-sig")  # a leading byte-order mark is dropped
    check_text(path)  # raises, naming the line
    raise AssertionError(f"{path}: not text, yet no line was found to name")


def check_text(path: Path) -> None:
    """UserError naming the first line that is not UTF-8 text (binary: a NUL byte anywhere),
    read line by line, without holding the file."""
    bad = None
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if b"\x00" in raw:
                raise _text_error(path, bad[0] if bad else n, True)
            if bad is None:
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad = (n, exc.start + 1, raw[exc.start])
    if bad:
        raise _text_error(path, bad[0], False, bad[1], bad[2])


def _text_error(path: Path, line: int, binary: bool, column: int = 0, byte: int = 0) -> UserError:
    if binary:
        return UserError(f"{path} line {line}: binary data (NUL bytes), not UTF-8 text; check the "
                         "path (recipes, jsonl, json, csv and tsv files are text)")
    return UserError(f"{path} line {line}: not UTF-8 text (byte 0x{byte:02x} at column {column}); "
                     "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 in > out)")
