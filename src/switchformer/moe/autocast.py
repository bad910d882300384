"""The MoE layer under ``torch.autocast``: the router keeps its own precision, the ragged expert kernels get their
inputs in the autocast dtype (paper §2.4, selective precision)."""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs ``x``'s matmuls in, or None when autocast is off for its device."""
    device = x.device.type
    if device in AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def autocast_off(x: torch.Tensor):
    """A context with autocast off for ``x``'s device, in which the router computes in its own ``router_dtype``.

    Under ``torch.autocast(dtype=bfloat16)`` a float32 ``F.linear`` silently runs in bfloat16, which would undo
    selective precision (the router's logits, softmax and gates stay float32 while the rest of the model trains in
    bfloat16).
    """
    if x.device.type in AUTOCAST_DEVICES:
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def as_autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` (None passes through) cast to the active autocast dtype of the first; unchanged when it is off.

    The ragged kernels write each expert's product into slices of one preallocated output (``mm(out=...)``), which
    autocast cannot retype: they get their inputs in the autocast dtype up front, as autocast would give each
    matmul, and the casts carry the gradients back to the float32 master weights.
    """
    dtype = autocast_dtype(tensors[0])
    return tensors if dtype is None else tuple(None if t is None else t.to(dtype) for t in tensors)
