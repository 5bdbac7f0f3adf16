"""The one exception type for bad user input, and the one place that turns it into exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

PREFIX = "error: "
"""Every command (train, export, data-check) starts its one message with this."""


class UserError(Exception):
    """A problem in the user's recipe, data or paths. Printed without a traceback, exit code 2."""

    exit_code = 2


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
