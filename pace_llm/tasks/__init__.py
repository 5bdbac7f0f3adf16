"""The task definitions: how each ``data.task`` reads its rows, turns them into examples and is
scored. Each module gives ``spec(data, tokenizer) -> TaskSpec`` and ``texts(data) -> list[str]``
(its training text, for an offline base's tokenizer); :mod:`pace_llm.data.build` builds them.
"""

from __future__ import annotations

from types import ModuleType

from pace_llm.data.examples import Kind
from pace_llm.tasks import glue, gsm8k, instruct, synthetic

MODULES: dict[str, ModuleType] = {"gsm8k": gsm8k, "glue": glue, "instruct": instruct,
                                  "synthetic": synthetic}
"""``data.task`` name -> its definition."""

TASKS: dict[str, Kind] = {"gsm8k": "causal_lm", "glue": "seq_cls", "instruct": "causal_lm",
                          "synthetic": "causal_lm"}
"""``data.task`` name -> the kind of model it trains; config's allowed task names derive from
this table."""

__all__ = ["MODULES", "TASKS"]
