"""LR schedules against their formulas (paper §3: T5X rsqrt), and the optimizers' construction."""

import math

import pytest
import torch

from switchformer.config import OptimConfig
from switchformer.train.optim import build_optimizer, lr_at


@pytest.mark.parametrize("step", [0, 1, 50, 99, 100, 101, 400, 10_000])
def test_rsqrt_is_t5x_formula(step):
    cfg = OptimConfig(lr=0.01, warmup_steps=100, schedule="rsqrt")
    base = cfg.lr * math.sqrt(cfg.warmup_steps)  # T5X: lr = base / sqrt(max(step, warmup))
    assert lr_at(step, cfg, 1000) == pytest.approx(base / math.sqrt(max(step, cfg.warmup_steps)), rel=1e-12)


def test_t5x_pretrain_values():
    cfg = OptimConfig(lr=0.01, warmup_steps=10_000)  # base 1.0, warmup 10k
    assert lr_at(0, cfg, 10) == pytest.approx(0.01)
    assert lr_at(40_000, cfg, 10) == pytest.approx(1 / math.sqrt(40_000))


def test_linear_warmup_cosine():
    cfg = OptimConfig(name="adamw", lr=1e-3, warmup_steps=10, warmup="linear", schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(1e-3 * 1 / 10)
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(500, cfg, 110) == pytest.approx(1e-4)


def test_build_optimizers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig())
    assert isinstance(opt, torch.optim.Adafactor) and opt.param_groups[0]["beta2_decay"] == -0.8
    opt = build_optimizer(model, OptimConfig(name="adamw", weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, OptimConfig(), 10)
