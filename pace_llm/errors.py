"""The one exception type for bad user input, and the one place that turns it into exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

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
