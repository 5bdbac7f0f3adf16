"""The dtype names recipes and the CLI use, and the torch dtypes they stand for (one table)."""

from __future__ import annotations

import torch

FLOAT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                        "float16": torch.float16}
"""Weight / export dtypes by name (``model.dtype``, ``export.dtype``, ``quant.compute_dtype``)."""
PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                            "fp16": torch.float16}
"""Training precisions (``train.precision`` once resolved) by name."""
DTYPES: dict[str, torch.dtype] = {**FLOAT_DTYPES, **PRECISION_DTYPES, "uint8": torch.uint8}
"""Every name above, plus ``uint8`` (``quant.storage_dtype``)."""


def resolve(name: str, precision: str) -> torch.dtype:
    """``name``'s dtype, where ``auto`` means the training precision's."""
    return DTYPES[precision if name == "auto" else name]
