"""Fixtures of tests/interop: tiny transformers checkpoints in temporary directories."""

from __future__ import annotations

from pathlib import Path

import pytest
from interop_tiny import tiny_hf_model


@pytest.fixture
def hf_dir(tmp_path: Path):
    """Factory: save a tiny transformers model and return (model, directory)."""

    def make(seed: int = 0, name: str = "hf", **overrides):
        model = tiny_hf_model(seed, **overrides)
        d = tmp_path / name
        model.save_pretrained(d)
        return model, d

    return make

