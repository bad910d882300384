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


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on shared CPUs OpenMP spinning slows them 10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
