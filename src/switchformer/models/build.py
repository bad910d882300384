"""``build_model``: the model class that a ModelConfig names, built with or without memory."""

from __future__ import annotations

import torch

from switchformer.config import ModelConfig
from switchformer.models.decoder_only import SwitchDecoderLM
from switchformer.models.encoder_decoder import SwitchTransformer

__all__ = ["build_model"]

MODEL_CLASSES = {"encoder_decoder": SwitchTransformer, "decoder_only": SwitchDecoderLM}
"""``ModelConfig.arch`` -> model class."""


def build_model(cfg: ModelConfig, *, init: bool = True, device: torch.device | str | None = None) -> torch.nn.Module:
    """Build the model class that ``cfg.arch`` names.

    Args:
        cfg: the model config.
        init: apply the paper's init (paper §2.4); False skips it (weights about to be loaded, or meta device).
        device: where to allocate; ``"meta"`` builds without memory (parameter counting, loading by assignment).

    Raises:
        TypeError: ``cfg`` is not a ModelConfig.
        ValueError: an unknown ``cfg.arch``.
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a switchformer.config.ModelConfig, got {type(cfg).__name__}")
    if cfg.arch not in MODEL_CLASSES:
        raise ValueError(f"cfg.arch must be one of {sorted(MODEL_CLASSES)}, got {cfg.arch!r}")
    cls = MODEL_CLASSES[cfg.arch]
    if device is None:
        return cls(cfg, init=init)
    with torch.device(device):
        return cls(cfg, init=init and torch.device(device).type != "meta")
