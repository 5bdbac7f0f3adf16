"""The length policy (``data.on_too_long``) and the statistics every task reports."""

from __future__ import annotations

from typing import Any

from pace_llm.data import IGNORE
from pace_llm.errors import UserError


class LengthPolicy:
    """Applies ``data.on_too_long`` to training examples and counts what it did.

    ``truncate`` keeps the first ``max_length`` tokens (a causal example left with no
    supervised token is dropped instead); ``drop`` skips the example; ``error`` raises a
    UserError naming the row. :meth:`finish` raises if every example was dropped.
    """

    def __init__(self, max_length: int, on_too_long: str, source: str):
        self.max_length = max_length
        self.mode = on_too_long
        self.source = source
        self.stats = {"rows": 0, "tokens": 0, "supervised_tokens": 0, "truncated": 0, "dropped": 0}
        self.shortest_dropped: int | None = None

    def too_long(self, n_tokens: int, where: str) -> bool:
        """True when an example of ``n_tokens`` must be cut or dropped; raises in error mode."""
        if n_tokens <= self.max_length:
            return False
        if self.mode == "error":
            raise UserError(f"{where}: {n_tokens} tokens, longer than data.max_length="
                            f"{self.max_length}; raise data.max_length or set "
                            "data.on_too_long: truncate | drop")
        return True

    def _drop(self, n_tokens: int) -> None:
        self.stats["dropped"] += 1
        self.shortest_dropped = min(n_tokens, self.shortest_dropped or n_tokens)

    def causal(self, example: dict[str, list[int]], where: str) -> dict[str, list[int]] | None:
        """The example within max_length, or None if dropped."""
        n = len(example["input_ids"])
        if self.too_long(n, where):
            if self.mode == "drop":
                self._drop(n)
                return None
            labels = example["labels"][: self.max_length]
            if all(t == IGNORE for t in labels):
                self._drop(n)
                return None
            example = {"input_ids": example["input_ids"][: self.max_length], "labels": labels}
            self.stats["truncated"] += 1
        self._keep(len(example["input_ids"]), sum(t != IGNORE for t in example["labels"]))
        return example

    def keep_classification(self, n_tokens: int, truncated: bool) -> None:
        """Count a kept classification example (one supervised label)."""
        self.stats["truncated"] += truncated
        self._keep(n_tokens, 1)

    def drop_classification(self, n_tokens: int) -> None:
        """Count a dropped classification example."""
        self._drop(n_tokens)

    def _keep(self, n_tokens: int, n_supervised: int) -> None:
        self.stats["rows"] += 1
        self.stats["tokens"] += n_tokens
        self.stats["supervised_tokens"] += n_supervised

    def finish(self) -> dict[str, int]:
        """The statistics; a UserError if no example survived."""
        if self.stats["rows"] == 0:
            if self.stats["dropped"]:
                fix = ("truncating would cut away every target; raise data.max_length"
                       if self.mode == "truncate" else
                       "raise data.max_length or set data.on_too_long: truncate")
                raise UserError(
                    f"{self.source}: every example ({self.stats['dropped']}) is longer than "
                    f"data.max_length={self.max_length} (the shortest has "
                    f"{self.shortest_dropped} tokens); {fix}")
            raise UserError(f"{self.source}: the dataset is empty (no rows)")
        return dict(self.stats)


def count_eval(stats: dict[str, int], eval_examples: list[Any]) -> dict[str, int]:
    """Add the eval row count to the train statistics."""
    return {**stats, "eval_rows": len(eval_examples)}
