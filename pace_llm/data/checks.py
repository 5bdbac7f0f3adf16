"""The data section's cross-field checks (``config.validate`` reports them with the rest)."""

from __future__ import annotations

from typing import Any

from pace_llm.tasks.mix import mix_problems


def data_problems(recipe: Any) -> list[str]:
    """Every problem of ``recipe.data`` and of how it meets the other sections."""
    d, t = recipe.data, recipe.train
    p: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.append(msg)

    need(d.max_length >= 8, f"data.max_length: {d.max_length} must be >= 8")
    if d.task == "glue":
        from pace_llm.tasks.glue import GLUE_TASKS

        need(d.glue_task in GLUE_TASKS, f"data.glue_task: {d.glue_task!r} is not allowed; "
             f"expected one of {', '.join(GLUE_TASKS)}")
    need(d.num_examples > 0, f"data.num_examples: {d.num_examples} must be > 0")
    need(d.limit is None or d.limit > 0, f"data.limit: {d.limit} must be > 0 or null")
    need(d.pad_to_multiple_of is None or d.pad_to_multiple_of >= 1,
         f"data.pad_to_multiple_of: {d.pad_to_multiple_of} must be >= 1 (1 = no rounding)")
    need(d.shuffle_buffer >= 1, f"data.shuffle_buffer: {d.shuffle_buffer} must be >= 1 "
         "(1 = file order)")
    if d.streaming:
        need(t.max_steps > 0, "data.streaming needs train.max_steps > 0: a stream has no known "
             "length, so train.epochs cannot be turned into steps")
        need(recipe.pace.mode != "fast", "pace.mode 'fast' keeps an output per training example "
             "and cannot stream; use full or lazy, or data.streaming: false")
        need(d.task != "synthetic", "data.streaming: the synthetic task is generated in memory; "
             "stream a file or hub dataset (data.task gsm8k, instruct or glue)")
    return p + mix_problems(d)
