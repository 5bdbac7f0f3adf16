"""The length policy (``data.on_too_long``) and the statistics every task reports."""

from __future__ import annotations

from pace_llm.data.examples import IGNORE
from pace_llm.errors import UserError

Outcome = tuple[int, int, bool, int]
"""One training example's fate: (tokens kept, supervised tokens, truncated, original length if
dropped else -1)."""


class LengthPolicy:
    """Applies ``data.on_too_long`` to training examples and counts what it did.

    ``truncate`` keeps the first ``max_length`` tokens (a causal example left with no
    supervised token is dropped instead); ``drop`` skips the example; ``error`` raises a
    UserError naming the row. :meth:`finish` raises if every example was dropped.

    With ``record``, :attr:`events` gets one :data:`Outcome` per example, in order (the task
    cache tokenizes in batches and sums these afterwards: :meth:`from_outcomes`).
    """

    def __init__(self, max_length: int, on_too_long: str, source: str, record: bool = False):
        self.max_length = max_length
        self.mode = on_too_long
        self.source = source
        self.stats = {"rows": 0, "tokens": 0, "supervised_tokens": 0, "truncated": 0, "dropped": 0}
        self.shortest_dropped: int | None = None
        self.events: list[Outcome] | None = [] if record else None

    @classmethod
    def from_outcomes(cls, max_length: int, on_too_long: str, source: str, kept: int,
                      tokens: int, supervised: int, truncated: int, dropped: int,
                      shortest_dropped: int | None) -> LengthPolicy:
        """A policy holding the sums of many examples' outcomes (for :meth:`finish`)."""
        policy = cls(max_length, on_too_long, source)
        policy.stats = {"rows": kept, "tokens": tokens, "supervised_tokens": supervised,
                        "truncated": truncated, "dropped": dropped}
        policy.shortest_dropped = shortest_dropped
        return policy

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
        if self.events is not None:
            self.events.append((0, 0, False, n_tokens))

    def causal(self, example: dict[str, list[int]], where: str) -> dict[str, list[int]] | None:
        """The example within max_length, or None if dropped."""
        n = len(example["input_ids"])
        cut = self.too_long(n, where)
        if cut:
            if self.mode == "drop":
                self._drop(n)
                return None
            labels = example["labels"][: self.max_length]
            if all(t == IGNORE for t in labels):
                self._drop(n)
                return None
            example = {"input_ids": example["input_ids"][: self.max_length], "labels": labels}
        self._keep(len(example["input_ids"]), sum(t != IGNORE for t in example["labels"]), cut)
        return example

    def keep_classification(self, n_tokens: int, truncated: bool) -> None:
        """Count a kept classification example (one supervised label)."""
        self._keep(n_tokens, 1, truncated)

    def drop_classification(self, n_tokens: int) -> None:
        """Count a dropped classification example."""
        self._drop(n_tokens)

    def _keep(self, n_tokens: int, n_supervised: int, truncated: bool) -> None:
        self.stats["rows"] += 1
        self.stats["tokens"] += n_tokens
        self.stats["supervised_tokens"] += n_supervised
        self.stats["truncated"] += bool(truncated)
        if self.events is not None:
            self.events.append((n_tokens, n_supervised, bool(truncated), -1))

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

