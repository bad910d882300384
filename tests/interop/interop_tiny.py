"""Tiny randomly initialised transformers SwitchTransformers models (helpers shared by tests/interop)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="interop tests compare against transformers")


def tiny_hf_config(**overrides):
    """A 2+2-layer d_model-32 Switch config; overrides go to SwitchTransformersConfig."""
    kw = dict(
        vocab_size=99, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
        num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=64,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.1,
        router_jitter_noise=0.01, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    kw.update(overrides)
    return transformers.SwitchTransformersConfig(**kw)


def tiny_hf_model(seed: int = 0, **overrides):
    """Random tiny SwitchTransformersForConditionalGeneration in eval mode.

    transformers initialises the router with std 1 and the experts with std d_model**-0.5; the LayerNorms start at
    one. We perturb the norms so that a wrongly mapped norm weight cannot go unnoticed, and shrink the (std 1)
    embeddings so that greedy generation does not collapse onto one token.
    """
    torch.manual_seed(seed)
    model = transformers.SwitchTransformersForConditionalGeneration(tiny_hf_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
        model.shared.weight.mul_(0.2)
    return model.eval()
