"""The training record of metrics.jsonl: the steps between two log lines, summarised."""

from __future__ import annotations

import time
from typing import Any

import torch


class Window:
    """Accumulates step stats between two log lines. A step's values may be device tensors
    (the trainer does not read them per step): :meth:`settle` reads them all at once."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def add(self, stats: dict[str, Any]) -> None:
        self.steps.append(stats)

    def settle(self) -> None:
        """Every tensor value of the window's steps becomes a Python float (a bool for bool
        tensors), in place: one stack and one ``.tolist()`` per device. The read waits for the
        device work the host queued; that wait belongs to the last step's time (a step's
        ``time`` is host time: without it an asynchronous device would look faster)."""
        started = time.perf_counter()
        settle(self.steps)
        if self.steps:
            self.steps[-1]["time"] += time.perf_counter() - started

    def record(self, step: int) -> dict[str, Any]:
        """The metrics.jsonl record of the window (settled first)."""
        self.settle()
        n = len(self.steps)
        mean = lambda k: sum(s[k] for s in self.steps) / n  # noqa: E731
        paired = [s for s in self.steps if s["paired"]]
        task = mean("task_loss")
        cons = sum(s["consistency"] for s in paired) / len(paired) if paired else 0.0
        elapsed = sum(s["time"] for s in self.steps)
        tokens = sum(s["tokens"] for s in self.steps)
        return {"step": step, "task_loss": task, "consistency_loss": cons,
                "loss_ratio": cons / task if task else None, "grad_norm": mean("grad_norm"),
                "clean_grad_norm": next((s["clean_grad_norm"] for s in reversed(self.steps)
                                         if s["clean_grad_norm"] is not None), None),
                "lr": self.steps[-1]["lr"], "tokens_per_s": tokens / elapsed if elapsed else None,
                "step_time_s": elapsed / n, "peak_memory_mb": _peak_memory_mb(),
                "skipped_steps": sum(1 for s in self.steps if s["skipped"]),
                **self._by_source()}

    def _by_source(self) -> dict[str, Any]:
        """``data.mix``: the window's training examples per source."""
        counts: dict[str, int] = {}
        for s in self.steps:
            for name, n in (s.get("sources") or {}).items():
                counts[name] = counts.get(name, 0) + n
        return {"examples_by_source": counts} if counts else {}


def settle(steps: list[dict[str, Any]]) -> None:
    """Replace the tensor values of ``steps`` (dicts) by Python numbers: one host read per
    device for all of them."""
    slots: dict[torch.device, list[tuple[dict[str, Any], str]]] = {}
    for s in steps:
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                slots.setdefault(v.device, []).append((s, k))
    for items in slots.values():
        values = torch.stack([s[k].detach().reshape(()).double() for s, k in items]).tolist()
        for (s, k), value in zip(items, values):
            s[k] = bool(value) if s[k].dtype == torch.bool else value


def _peak_memory_mb() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
