"""bfloat16 training emulated in float32, for the precision experiments (paper §2.4, Table 2; App. A, Table 10).

CPUs without bfloat16 units run bfloat16 matmuls two orders of magnitude slower than float32, so a bfloat16 arm
would not fit a step budget. Instead every value a TPU would hold in bfloat16 is rounded to bfloat16 and kept in
float32 (``x.to(bfloat16).to(float32)``): the numerics of bfloat16 storage with float32 arithmetic inside each op.

Rounding points, during the model's forward pass:

- matmuls: the inputs (activations and weights) and the output of ``F.linear``, ``mm``, ``bmm``, ``matmul``,
  ``einsum`` and ``scaled_dot_product_attention``;
- ``softmax`` outputs and embedding lookups;
- the residual stream: the output of every attention and feed-forward sublayer (``x + f(norm(x))``).

Modes: ``float32`` installs nothing; ``bfloat16`` rounds everywhere, the router included (its input, logits and
softmax, hence its gates); ``selective`` rounds everywhere but inside the router, which sees float32 values (a
float32 copy of the rounded input, float32 logits, softmax and gates), as the paper's selective precision does;
the combined expert output is rounded where it joins the residual stream.

The rounding casts are differentiable, so gradients are rounded at the same points on the way back; the backward
matmuls themselves run in float32. The master weights stay float32, as on a TPU. This is an emulation, not the
hardware: it reproduces bfloat16's 8-bit mantissa, not a TPU's accumulation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

MODES = ("float32", "bfloat16", "selective")
BF16_BACKENDS = ("emulated", "autocast")
"""How the bfloat16 arms run: ``emulated`` rounds in float32 (any CPU); ``autocast`` is real bfloat16 mixed
precision (``train.precision=bfloat16``), for hardware with bfloat16 units (a GPU)."""


def autocast_overrides(mode: str) -> list[str]:
    """Config overrides that run ``mode`` on bfloat16 hardware: autocast for the model's matmuls, and the router in
    bfloat16 (``bfloat16``) or float32 (``selective``, paper §2.4). ``float32`` changes nothing.

    Autocast keeps the master weights, softmaxes, norms and the residual stream in float32, as mixed-precision
    training on a GPU does; the emulation also rounds the residual stream, as bfloat16 activations on a TPU would.
    """
    if mode not in MODES:
        raise ValueError(f"precision mode must be one of {MODES}, got {mode!r}")
    if mode == "float32":
        return []
    return ["train.precision=bfloat16", f"model.moe.router_dtype={'bfloat16' if mode == 'bfloat16' else 'float32'}"]


def round_bf16(x):
    """``x`` rounded to bfloat16 and returned in its float32 dtype; anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
        return x.to(torch.bfloat16).to(torch.float32)
    return x


def _round_tree(x):
    if isinstance(x, torch.Tensor):
        return round_bf16(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_round_tree(v) for v in x)
    return x


_MATMULS = {
    F.linear, torch.mm, torch.bmm, torch.matmul, torch.einsum, F.scaled_dot_product_attention,
    torch.Tensor.mm, torch.Tensor.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.addmm, torch.baddbmm,
}
_OUTPUT_ONLY = {torch.softmax, F.softmax, torch.Tensor.softmax, F.embedding}


class Bfloat16Rounding(TorchFunctionMode):
    """Rounds matmul inputs and outputs, softmax outputs and embedding lookups to bfloat16 (see the module doc).

    ``router_depth > 0`` marks code inside a router; with ``round_router=False`` nothing is rounded there.
    """

    def __init__(self, round_router: bool) -> None:
        super().__init__()
        self.round_router = round_router
        self.router_depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        active = self.round_router or self.router_depth == 0
        if active and func in _MATMULS:
            out = kwargs.get("out")
            args = tuple(_round_tree(a) for a in args)
            kwargs = {k: (v if k == "out" else _round_tree(v)) for k, v in kwargs.items()}
            result = func(*args, **kwargs)
            if out is not None:  # an out= matmul writes in place (inside the experts' autograd function)
                with torch.no_grad():
                    out.copy_(round_bf16(out))
                return result
            return round_bf16(result)
        result = func(*args, **kwargs)
        if active and func in _OUTPUT_ONLY:
            return round_bf16(result)
        return result


class PrecisionEmulation:
    """Installed on one model: the rounding mode around its forward, router markers and sublayer hooks.

    ``remove()`` restores the model exactly (its parameters are never touched).
    """

    def __init__(self, model: nn.Module, mode: str) -> None:
        from switchformer.models.blocks import LayerCrossAttention, LayerFF, LayerSelfAttention
        from switchformer.moe.router import Router

        if mode not in MODES:
            raise ValueError(f"precision emulation mode must be one of {MODES}, got {mode!r}")
        self.model, self.mode = model, mode
        self.rounding = Bfloat16Rounding(round_router=mode == "bfloat16")
        self._handles: list = []
        self._forward = None
        if mode == "float32":
            return
        for module in model.modules():
            if isinstance(module, Router):
                self._handles.append(module.register_forward_pre_hook(self._enter_router))
                self._handles.append(module.register_forward_hook(self._leave_router))
            elif isinstance(module, (LayerSelfAttention, LayerCrossAttention, LayerFF)):
                self._handles.append(module.register_forward_hook(self._round_residual))
        forward = model.forward

        def rounded_forward(*args, **kwargs):
            self.rounding.router_depth = 0
            with self.rounding:
                return forward(*args, **kwargs)

        self._forward = forward
        model.forward = rounded_forward

    def _enter_router(self, module, args):
        self.rounding.router_depth += 1

    def _leave_router(self, module, args, output):
        self.rounding.router_depth -= 1

    @staticmethod
    def _round_residual(module, args, output):
        if isinstance(output, tuple):
            return (round_bf16(output[0]), *output[1:])
        return round_bf16(output)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._forward is not None:
            del self.model.forward  # the instance attribute; the class's forward shows again
            self._forward = None


def emulate_precision(model: nn.Module, mode: str) -> PrecisionEmulation:
    """Emulate ``mode`` ('float32', 'bfloat16' or 'selective') on ``model`` in place; returns the handle."""
    return PrecisionEmulation(model, mode)
