"""The one parser of dtype names (``"float32"``, ``"bfloat16"``, ``"float16"``) used by configs, layers and loaders.

This module imports only torch.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,  # for verification: exact comparisons of parallel layouts, reference checks
}
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
            "fp64": "float64", "double": "float64"}


def parse_dtype(value: torch.dtype | str, *, name: str = "dtype") -> torch.dtype:
    """A floating torch.dtype from a dtype or its name (``"float32"``, ``"bfloat16"``, ``"float16"``, or
    ``"torch.float32"`` as transformers' config.json writes it).

    Raises:
        TypeError: ``value`` is neither a str nor a floating torch.dtype (the message names ``name``).
        ValueError: an unknown name (the message lists the valid ones).
    """
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a dtype name such as 'float32', got {type(value).__name__} {value!r}")
    key = value.strip().lower().removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {value!r}")
    return DTYPES[key]
