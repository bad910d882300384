"""Switch Transformer models (paper.md §4): T5 v1.0 encoder-decoder, decoder-only LM, presets, generation, upcycling.

    from switchformer.models import build_model
    model = build_model(cfg)        # SwitchTransformer (cfg.arch == "encoder_decoder") or SwitchDecoderLM
    out = model(input_ids, labels=labels)
    out.logits, out.loss, out.lm_loss, out.aux_loss, out.router
"""

from __future__ import annotations

import torch

from switchformer.config import ModelConfig
from switchformer.models.blocks import ModelOutput, RouterResult
from switchformer.models.decoder_only import SwitchDecoderLM
from switchformer.models.encoder_decoder import SwitchTransformer
from switchformer.models.generation import GenerationRouting
from switchformer.models.presets import PRESETS, count_parameters, describe, flops_per_token, get_preset
from switchformer.models.upcycle import upcycle

__all__ = [
    "build_model",
    "SwitchTransformer",
    "SwitchDecoderLM",
    "ModelOutput",
    "RouterResult",
    "GenerationRouting",
    "PRESETS",
    "get_preset",
    "count_parameters",
    "flops_per_token",
    "describe",
    "upcycle",
]


def build_model(cfg: ModelConfig, *, init: bool = True, device: torch.device | str | None = None) -> torch.nn.Module:
    """Build the model class that ``cfg.arch`` names.

    Args:
        cfg: the model config.
        init: apply the paper's init (§2.4); False skips it (weights about to be loaded, or meta device).
        device: where to allocate; ``"meta"`` builds without memory (parameter counting).
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a switchformer.config.ModelConfig, got {type(cfg).__name__}")
    classes = {"encoder_decoder": SwitchTransformer, "decoder_only": SwitchDecoderLM}
    if cfg.arch not in classes:
        raise ValueError(f"cfg.arch must be one of {sorted(classes)}, got {cfg.arch!r}")
    if device is None:
        return classes[cfg.arch](cfg, init=init)
    with torch.device(device):
        return classes[cfg.arch](cfg, init=init and torch.device(device).type != "meta")
