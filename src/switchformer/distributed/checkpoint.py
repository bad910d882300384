"""Training checkpoints of parallelized models through torch.distributed.checkpoint (DCP), reshardable across layouts.

Work in progress: the signatures are final, the bodies follow.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["export_pretrained", "load_distributed_checkpoint", "save_distributed_checkpoint"]


def save_distributed_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module,
                                optimizer: torch.optim.Optimizer | None, train_state: dict, config_toml: str, *,
                                keep: int) -> Path:
    """Collective: every rank calls it. Writes RUN_DIR/checkpoints/step_XXXXXX atomically; returns that folder."""
    raise NotImplementedError


def load_distributed_checkpoint(path: str | os.PathLike, model: nn.Module,
                                optimizer: torch.optim.Optimizer | None = None, *,
                                restore_rng: bool = True) -> dict:
    """Collective: load checkpoint folder ``path`` (distributed or single-process) into ``model`` at any layout;
    returns the train state."""
    raise NotImplementedError


def export_pretrained(checkpoint_or_run_dir: str | os.PathLike, out_dir: str | os.PathLike, **save_kwargs) -> Path:
    """Write a checkpoint's weights as a transformers-format / native safetensors directory (one process)."""
    raise NotImplementedError
