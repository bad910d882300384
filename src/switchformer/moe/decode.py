"""The Switch layer for the few tokens of a generation step: same maths as the dropless layer in eval mode, far
fewer ops.

At small sizes the general layer's sort/capacity/dispatch machinery dominates a decode step. ``switch_ffn_decode``
routes top-1 (paper Eq. 2: the chosen expert's output scaled by its router probability) and runs the experts
directly; ``decode_fast_path_ok`` says when that is exactly what the ``SwitchFFN`` would compute.

Shape suffixes: T tokens, M d_model, F d_ff.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from switchformer.moe.autocast import autocast_off
from switchformer.moe.dispatch import LocalDispatcher, expert_capacity
from switchformer.moe.experts import ragged_experts_inference
from switchformer.moe.layer import SwitchFFN
from switchformer.moe.router import top_k_lowest_index

DECODE_GATHER_LIMIT = 2**25
"""Largest gathered expert-weight tensor (elements: tokens x d_ff x d_model) the fast path may build; beyond it
the general layer runs."""


def routing_cannot_drop(mlp: SwitchFFN, x: torch.Tensor) -> bool:
    """Whether eval-mode routing of ``x`` (top-1) through ``mlp`` can drop no token: dropless, or a capacity at
    least as large as every routing group (then capacity, NTLB and batch-prioritized routing change nothing)."""
    if mlp.expert_capacity is not None:  # transformers' semantics: each sequence of [B, t, M] is a group of t
        return x.dim() == 3 and x.shape[1] <= mlp.expert_capacity
    if mlp.eval_capacity_factor is None:
        return True
    tokens = x.numel() // x.shape[-1]
    group = mlp.group_size or max(tokens, 1)
    capacity = expert_capacity(
        group, mlp.num_experts, mlp.eval_capacity_factor, top_k=1, min_capacity=mlp.min_capacity
    )
    return capacity >= min(group, tokens)


def decode_fast_path_ok(mlp: SwitchFFN, x: torch.Tensor) -> bool:
    """Whether ``switch_ffn_decode`` computes exactly what ``mlp`` would: eval mode, top-1, no token can be dropped
    (dropless, as generation sets by default, or a capacity no routing group of ``x`` can exceed: e.g.
    transformers' per-sequence ``expert_capacity`` with one new token per sequence), the local dispatcher (all
    experts on this device), few tokens."""
    tokens = x.numel() // x.shape[-1]
    w_in = mlp.experts.w_in
    return (
        not mlp.training
        and mlp.top_k == 1
        and type(mlp.dispatcher) is LocalDispatcher
        and tokens * w_in.shape[1] * w_in.shape[2] <= DECODE_GATHER_LIMIT
        and routing_cannot_drop(mlp, x)
    )


def switch_ffn_decode(
    mlp: SwitchFFN, x: torch.Tensor, padding_mask: torch.Tensor | None, *, method: str | None = None
) -> torch.Tensor:
    """SwitchFFN forward for the few tokens of a generation step, without router statistics.

    Two methods:

    - ``"gather"`` (accelerators): each token gathers its expert's matrices (``w_in[idx]``: ``[T, F, M]``) for one
      batched matvec: ~10 kernels and no host sync; the weight copy is cheap at GPU bandwidth.
    - ``"loop"`` (CPU, where a host sync is free but copying weights is not): sort the tokens by expert and run
      the experts' ragged kernel, one small matmul pair per expert that received tokens.

    Args:
        mlp: a SwitchFFN for which ``decode_fast_path_ok`` holds.
        x: ``[B, t, M]``.
        padding_mask: ``[B, t]`` bool (False rows get zero output, as in the layer), or None.
        method: "gather" or "loop"; None picks by device.
    """
    router, experts = mlp.router, mlp.experts
    x_TM = x.reshape(-1, x.shape[-1])
    # The router's own arithmetic (softmax in router_dtype, then float32), so ties and gates match the layer.
    with autocast_off(x_TM):
        logits = F.linear(x_TM.to(router.router_dtype), router.weight.to(router.router_dtype))
        gate_T1, index_T1 = top_k_lowest_index(torch.softmax(logits, dim=-1), 1)
    gate_T, index_T = gate_T1.float().squeeze(-1), index_T1.squeeze(-1)
    gated = experts.w_gate is not None
    method = method or ("loop" if x.device.type == "cpu" else "gather")
    if method == "gather":
        x_TM1 = x_TM.unsqueeze(-1)
        h = torch.bmm(experts.w_in[index_T], x_TM1)  # [T, F, 1]
        if gated:
            h = F.gelu(torch.bmm(experts.w_gate[index_T], x_TM1), approximate="tanh") * h
        else:
            h = F.relu(h)
        y = torch.bmm(experts.w_out[index_T], h).squeeze(-1)
    elif method == "loop":
        order = torch.argsort(index_T)
        counts = torch.bincount(index_T, minlength=experts.w_in.shape[0]).tolist()
        y_sorted = ragged_experts_inference(x_TM[order], counts, experts.w_in, experts.w_out, experts.w_gate)
        y = torch.empty_like(y_sorted)  # the experts' dtype: under autocast, not x's
        y[order] = y_sorted
    else:
        raise ValueError(f"method must be 'gather', 'loop' or None, got {method!r}")
    y = y.to(x.dtype) * gate_T.to(x.dtype).unsqueeze(-1)  # x's dtype, as the layer returns
    if padding_mask is not None:
        y = y * padding_mask.reshape(-1, 1).to(y.dtype)
    return y.view(x.shape)
