"""Tiny configs shared by the model tests (dropout 0, dropless routing so results do not depend on the batch)."""

from __future__ import annotations

import dataclasses

import pytest

from switchformer.config import ModelConfig, MoEConfig


def tiny_cfg(**kw) -> ModelConfig:
    moe = MoEConfig(num_experts=4, capacity_factor=None, eval_capacity_factor=None)
    base = dict(
        vocab_size=64, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
        dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=16, moe=moe,
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def make_cfg():
    return tiny_cfg


def replace(cfg: ModelConfig, **kw) -> ModelConfig:
    return dataclasses.replace(cfg, **kw)
