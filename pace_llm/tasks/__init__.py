"""The task definitions: how each ``data.task`` reads its rows, turns them into examples and is
scored. Each module gives ``spec(data, tokenizer) -> TaskSpec`` and ``texts(data) -> list[str]``
(its training text, for an offline base's tokenizer); :mod:`pace_llm.data.build` builds them.
"""

from __future__ import annotations

from types import ModuleType

from pace_llm.tasks import glue, gsm8k, instruct, synthetic

MODULES: dict[str, ModuleType] = {"gsm8k": gsm8k, "glue": glue, "instruct": instruct,
                                  "synthetic": synthetic}
"""``data.task`` name -> its definition (the names and the model kind each trains are
``schema.TASKS``; a test keeps the two tables in step)."""

__all__ = ["MODULES"]
