"""Optimizers and learning-rate schedules (paper §3).

The paper's optimizer is not stated in [P]; the official configs use Adafactor (decay_rate 0.8) with the T5X
``constant * rsqrt_decay`` schedule: lr = base / sqrt(max(step, warmup)), base 1.0, warm-up 10k, i.e. a constant
0.01 for 10k steps, then inverse square root. Here ``OptimConfig.lr`` is the *peak* rate, so the same schedule is
``lr * sqrt(warmup / max(step, warmup))`` (base = lr * sqrt(warmup)); AdamW can use it too, or a cosine.

Note on torch.optim.Adafactor: its step is relative (scaled by max(eps2, RMS(param))) and it caps the rate at
1/sqrt(t) internally (t = 1-based step), which never binds for a peak lr <= 1/sqrt(steps).
"""

from __future__ import annotations

import math

import torch

from switchformer.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based, the number of updates already applied).

    Args:
        step: updates done so far (the rate returned is used for update number ``step + 1``).
        cfg: the optimizer config (lr is the peak rate).
        total_steps: length of the run (used by the cosine schedule).

    Returns:
        The learning rate, a Python float.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup = max(cfg.warmup_steps, 0)
    if cfg.schedule == "rsqrt":
        # T5X: base / sqrt(max(step, warmup)) with base = lr * sqrt(warmup); warmup 0 -> lr / sqrt(max(step, 1)).
        lr = cfg.lr * math.sqrt(max(warmup, 1) / max(step, warmup, 1))
    elif cfg.schedule == "cosine":
        span = max(total_steps - warmup, 1)
        progress = min(max(step - warmup, 0) / span, 1.0)
        lr = cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    elif cfg.schedule == "constant":
        lr = cfg.lr
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r}; use 'rsqrt', 'cosine' or 'constant'")
    if cfg.warmup == "linear" and warmup > 0:
        lr *= min(1.0, (step + 1) / warmup)
    return lr


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over the model's trainable parameters.

    Weight decay (if any) skips 1-D parameters (norm scales); Adafactor factors 2-D and stacked-expert 3-D
    parameters over their last two dimensions (torch's implementation), so expert weights [E, F, D] get
    per-expert row/column statistics.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.weight_decay > 0:
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": params}]
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr, beta2_decay=cfg.beta2_decay, eps=(None, cfg.adafactor_eps))
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"optim.name={cfg.name!r}; use 'adafactor' or 'adamw'")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
