"""What a command shows besides its own output: pace_llm's log records, set up once per process
by each entry point (``train``, ``export``, ``data-check``).

Rank 0 shows info lines (``[pace_llm] task cache hit: ...``, the hold-out notice, what a
start builds) and warnings (``warning: ...``) on stderr, written through tqdm so that a progress
bar is not torn; every other rank shows only errors, so N ranks do not print N copies. Only the
``pace_llm`` loggers are set up: libraries keep their own settings.
"""

from __future__ import annotations

import logging
import os
import sys

PACKAGE = "pace_llm"
INFO_PREFIX = "[pace_llm] "
WARNING_PREFIX = "warning: "


class _Formatter(logging.Formatter):
    """Info lines as ``[pace_llm] message``; warnings and errors as ``warning: message``
    (a message that already starts so is left as it is)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno < logging.WARNING:
            return INFO_PREFIX + message
        if message.lower().startswith(("warning", "error")):
            return message
        return WARNING_PREFIX + message


class _ConsoleHandler(logging.Handler):
    """Writes to the process's stderr of the moment (a forked child or a test may replace
    it), through ``tqdm.write`` so that a progress bar on the terminal stays whole."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def rank() -> int:
    """This process's rank as a launcher sets it (RANK; 0 without a launcher)."""
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() else 0


def configure() -> None:
    """Show pace_llm's log records on this process's console: info and up on rank 0, errors
    only on the others. Calling it again replaces the earlier setup (one handler at most)."""
    logger = logging.getLogger(PACKAGE)
    for handler in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(handler)
    handler = _ConsoleHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank() == 0 else logging.ERROR)
