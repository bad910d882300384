"""Switch Transformer models (paper §2): T5 v1.0 encoder-decoder, decoder-only LM, presets, generation, upcycling.

    from switchformer.models import build_model
    model = build_model(cfg)        # SwitchTransformer (cfg.arch == "encoder_decoder") or SwitchDecoderLM
    out = model(input_ids, labels=labels)
    out.logits, out.loss, out.lm_loss, out.aux_loss, out.router

Loading and saving checkpoints are ``switchformer.from_pretrained`` / ``switchformer.save_pretrained``
(:mod:`switchformer.interop`, which sits above this package).
"""

from __future__ import annotations

from switchformer.models.blocks import ModelOutput
from switchformer.models.build import build_model
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
    "GenerationRouting",
    "PRESETS",
    "get_preset",
    "count_parameters",
    "flops_per_token",
    "describe",
    "upcycle",
]
