"""Stacked expert FFNs that compute on tokens already grouped by expert.

Weights are stacked ``[E, F, M]`` / ``[E, M, F]`` in nn.Linear's [out, in] layout, as checkpoints store each
expert's ``wi``/``wo`` (transformers' ``experts.expert_{j}.wi.weight`` is ``w_in[j]``).

Shape suffixes: E experts, N grouped tokens, R rows per expert in the padded layout, M d_model, F d_ff.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from switchformer.moe.autocast import as_autocast

ACTIVATIONS = ("relu", "gated-gelu")


def local_weight(weight: torch.Tensor) -> torch.Tensor:
    """The part of a stacked expert weight held here: under expert parallelism (``switchformer.distributed``) the
    weight is a DTensor of global shape ``[E, ...]`` sharded over experts, and this rank computes with its local
    ``[E / ep, ...]`` shard (differentiable; its gradient lands in the DTensor's ``.grad``). A plain tensor is
    returned as it is. Duck-typed, so this module needs no import of torch.distributed."""
    to_local = getattr(weight, "to_local", None)
    return to_local() if to_local is not None else weight


def truncated_normal_(weight: torch.Tensor, fan_in: int, scale: float) -> torch.Tensor:
    """Paper §2.4: truncated normal, mean 0, std sqrt(scale / fan_in), resampled beyond two std (footnote 6)."""
    std = math.sqrt(scale / fan_in)
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


# Largest hidden-activation block (bytes) one expert matmul writes at a time. glibc serves allocations over 32 MiB
# with fresh mmap pages that are page-faulted and zero-filled on every training step (~30 ms per 64 MB on the
# benchmark machine), while smaller blocks are reused from its heap: blocks stay below that threshold
# (benchmarks/bench_moe_layer.py; benchmarks/results/moe_layer_notes.md).
HIDDEN_BLOCK_BYTES = 16 * 2**20


def _row_blocks(counts: list[int], row_bytes: int):
    """``(expert, start, stop)`` row ranges of expert-major ragged tokens, each at most ``HIDDEN_BLOCK_BYTES`` of
    hidden activations (an expert with many tokens is split into several blocks)."""
    step = max(1, HIDDEN_BLOCK_BYTES // max(row_bytes, 1))
    start = 0
    for e, n in enumerate(counts):  # a loop over experts' contiguous slices, never over tokens
        for lo in range(start, start + n, step):
            yield e, lo, min(lo + step, start + n)
        start += n


class _RaggedReluFFN(torch.autograd.Function):
    """Expert FFNs ``W_out drop(relu(W_in x))`` over expert-major ragged tokens, with a hand-written backward.

    Autograd over a Python loop would stack E per-expert weight gradients into a fresh [E, F, M] tensor and then
    add it into ``.grad`` (two extra passes over the largest tensors of the layer: 0.5 GB each at E=128, d_model
    512, d_ff 2048). Here backward writes each expert's gradient straight into its slice of one buffer, every
    output is written in place, and hidden activations live in blocks of at most ``HIDDEN_BLOCK_BYTES`` (saved for
    backward one tensor per block; backward reuses one block-sized workspace), so no step allocates a fresh
    [tokens, d_ff] tensor.
    """

    @staticmethod
    def forward(ctx, x_NM, w_in_EFM, w_out_EMF, counts, dropout_p, training):  # type: ignore[override]
        num_tokens, d_model = x_NM.shape
        d_ff = w_in_EFM.shape[1]
        y_NM = x_NM.new_empty(num_tokens, d_model)
        drop = dropout_p > 0 and training
        blocks = list(_row_blocks(counts, d_ff * x_NM.element_size()))
        hidden = []
        for e, lo, hi in blocks:
            h = torch.mm(x_NM[lo:hi], w_in_EFM[e].t()).relu_()
            if drop:  # h > 0 exactly where relu and dropout both pass: backward needs no separate mask
                h.mul_(torch.rand_like(h) >= dropout_p).div_(1.0 - dropout_p)
            torch.mm(h, w_out_EMF[e].t(), out=y_NM[lo:hi])
            hidden.append(h)
        ctx.save_for_backward(x_NM, w_in_EFM, w_out_EMF, *hidden)
        ctx.blocks, ctx.scale = blocks, 1.0 / (1.0 - dropout_p) if drop else 1.0
        return y_NM

    @staticmethod
    def backward(ctx, grad_y_NM):  # type: ignore[override]
        x_NM, w_in_EFM, w_out_EMF, *hidden = ctx.saved_tensors
        grad_y_NM = grad_y_NM.contiguous()
        need_x, need_w_in, need_w_out = ctx.needs_input_grad[:3]  # frozen experts or a no-grad input skip work
        grad_w_out = torch.empty_like(w_out_EMF) if need_w_out else None
        grad_w_in = torch.empty_like(w_in_EFM) if need_w_in else None
        grad_x_NM = torch.empty_like(x_NM) if need_x else None
        rows = max((hi - lo for _, lo, hi in ctx.blocks), default=0)
        workspace = x_NM.new_empty(rows, w_in_EFM.shape[1])
        written = [False] * w_in_EFM.shape[0]  # an expert's first block writes its weight gradient, later ones add
        for (e, lo, hi), h in zip(ctx.blocks, hidden, strict=True):
            first, written[e] = not written[e], True
            g_y = grad_y_NM[lo:hi]
            if need_w_out:
                _mm_into(grad_w_out[e], g_y.t(), h, first)
            g_h = torch.mm(g_y, w_out_EMF[e], out=workspace[: hi - lo])
            # relu'(a) = 1[h > 0] (h also carries the dropout mask): one fused in-place pass, as autograd's relu
            torch.ops.aten.threshold_backward.grad_input(g_h, h, 0, grad_input=g_h)
            if ctx.scale != 1.0:
                g_h.mul_(ctx.scale)
            if need_w_in:
                _mm_into(grad_w_in[e], g_h.t(), x_NM[lo:hi], first)
            if need_x:
                torch.mm(g_h, w_in_EFM[e], out=grad_x_NM[lo:hi])
        for e in (e for e, w in enumerate(written) if not w):  # experts that received no token
            for grad in (grad_w_in, grad_w_out):
                if grad is not None:
                    grad[e].zero_()
        return grad_x_NM, grad_w_in, grad_w_out, None, None, None


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``out = a @ b`` when ``first``, else ``out += a @ b``."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def ragged_experts_inference(
    x_NM: torch.Tensor, counts: list[int], w_in_EFM: torch.Tensor, w_out_EMF: torch.Tensor,
    w_gate_EFM: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert FFNs on expert-major ragged tokens without dropout or autograd bookkeeping (inference, e.g. the few
    tokens of a generation step): ``relu`` when ``w_gate_EFM`` is None, else gated-gelu."""
    x_NM, w_in_EFM, w_out_EMF, w_gate_EFM = as_autocast(x_NM, w_in_EFM, w_out_EMF, w_gate_EFM)
    y_NM = x_NM.new_empty(x_NM.shape)
    start = 0
    for e, n in enumerate(counts):  # a loop over experts' contiguous slices, never over tokens
        if n:
            x_e = x_NM[start : start + n]
            h = F.linear(x_e, w_in_EFM[e])
            h = F.relu(h) if w_gate_EFM is None else F.gelu(F.linear(x_e, w_gate_EFM[e]), approximate="tanh") * h
            torch.mm(h, w_out_EMF[e].t(), out=y_NM[start : start + n])
        start += n
    return y_NM


def ragged_linear(x_NI: torch.Tensor, weight_EOI: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``x @ weight[e].T`` for each expert's contiguous slice of expert-major ragged tokens (Switch attention's
    linear experts), differentiable. The stacked weight is unbound once: indexing a stacked Parameter per expert
    under autograd would materialise a full [E, O, I] gradient for every expert."""
    weights = weight_EOI.unbind(0)
    outs = [F.linear(x_e, weights[e]) for e, x_e in enumerate(x_NI.split(counts)) if counts[e]]
    return torch.cat(outs) if outs else x_NI.new_zeros(0, weight_EOI.shape[1])


class Experts(nn.Module):
    """E independent FFNs: ``relu``: ``W_out relu(W_in x)`` (T5 v1.0, the released checkpoints); ``gated-gelu``:
    ``W_out (gelu(W_gate x) * W_in x)`` (GEGLU, Table 9).

    Args:
        num_experts: E.
        d_model: M.
        d_ff: F, the hidden width of one expert.
        activation: 'relu' or 'gated-gelu'.
        expert_dropout: dropout on the hidden activations, separate from the model's dropout (§2.4: 0.4 when
            fine-tuning).
        init_scale: s of the truncated-normal init std sqrt(s / fan_in).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "relu",
        expert_dropout: float = 0.0,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not 0.0 <= expert_dropout < 1.0:
            raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout}")
        self.activation = activation
        self.expert_dropout = expert_dropout
        self.init_scale = init_scale
        self.w_in = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_ff, d_model)) if activation == "gated-gelu" else None
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d_model, d_ff = self.w_in.shape[2], self.w_in.shape[1]
        truncated_normal_(self.w_in, d_model, self.init_scale)
        if self.w_gate is not None:
            truncated_normal_(self.w_gate, d_model, self.init_scale)
        truncated_normal_(self.w_out, d_ff, self.init_scale)

    def _hidden(self, x: torch.Tensor, mm, w_in: torch.Tensor, w_gate: torch.Tensor | None) -> torch.Tensor:
        if w_gate is None:
            h = F.relu(mm(x, w_in))
        else:
            h = F.gelu(mm(x, w_gate), approximate="tanh") * mm(x, w_in)  # T5's gelu_new
        return F.dropout(h, self.expert_dropout, self.training) if self.expert_dropout > 0 else h

    def forward(self, x: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
        """Apply expert e to its tokens.

        Args:
            x: ragged ``[N, M]`` (expert-major, with ``counts``) or padded ``[E, R, M]`` (``counts`` None).
            counts: tokens per expert for the ragged layout (host ints, summing to N).
        """
        # Under expert parallelism the experts here are this rank's shard: counts and the padded E are local.
        w_in_EFM, w_out_EMF = local_weight(self.w_in), local_weight(self.w_out)
        w_gate_EFM = local_weight(self.w_gate) if self.w_gate is not None else None
        if x.dim() == 3:  # padded: one batched matmul per projection, static shapes, no host sync
            bmm = lambda a, w: torch.bmm(a, w.transpose(1, 2))  # noqa: E731
            return bmm(self._hidden(x, bmm, w_in_EFM, w_gate_EFM), w_out_EMF)
        if counts is None or len(counts) != w_in_EFM.shape[0]:
            raise ValueError("ragged expert input needs counts: one token count per expert")
        if w_gate_EFM is None:
            x, w_in_EFM, w_out_EMF = as_autocast(x, w_in_EFM, w_out_EMF)
            if x.dtype == w_in_EFM.dtype:
                return _RaggedReluFFN.apply(x.contiguous(), w_in_EFM, w_out_EMF, counts, self.expert_dropout,
                                            self.training)
        # Gated experts: a plain autograd loop. NOTE: unbind once: indexing a stacked Parameter per expert under
        # autograd would materialise a full [E, F, M] gradient for every expert (88x slower at E=128).
        w_in, w_out = w_in_EFM.unbind(0), w_out_EMF.unbind(0)
        w_gate = w_gate_EFM.unbind(0) if w_gate_EFM is not None else [None] * len(counts)
        outs = []
        for e, x_e in enumerate(x.split(counts)):  # a loop over experts' contiguous slices, never over tokens
            if counts[e] == 0:
                continue
            h = self._hidden(x_e, F.linear, w_in[e], w_gate[e])
            outs.append(F.linear(h, w_out[e]))
        if not outs:
            return x.new_zeros(0, w_out_EMF.shape[1])
        return torch.cat(outs)
