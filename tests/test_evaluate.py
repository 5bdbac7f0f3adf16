"""Evaluation: greedy generation reports its progress batch by batch."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pace_llm.evaluate import greedy_generate
from tests.conftest import tiny_llama


def test_generation_reports_each_batch():
    model = tiny_llama()
    tok = SimpleNamespace(eos_token_id=None, pad_token_id=0)
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10], [1, 11], [1, 12, 13]]
    seen: list[int] = []
    out = greedy_generate(model, prompts, tok, max_new_tokens=3, batch_size=2,
                          device=torch.device("cpu"), on_batch=seen.append)
    assert seen == [2, 2, 1] and len(out) == 5 and all(len(r) == 3 for r in out)
