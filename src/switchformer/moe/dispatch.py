"""Capacity bookkeeping and token dispatch: which token goes to which expert slot, and moving them there.

Index based: one argsort of a composite integer key puts every (token, choice) assignment in
expert-major order, and a token's position inside its expert is its rank within that run. No [T, E, C] one-hot
tensor is ever built, so the bookkeeping costs O(T*K log(T*K)) whatever the group size (the one-hot einsum of the
paper's Fig. 15/16 lives in ``oracle.py`` as a test reference only).

The ``Dispatcher`` is the seam for expert parallelism: ``LocalDispatcher`` moves tokens to experts on this device;
``switchformer.distributed.AllToAllDispatcher`` exchanges the same expert-major buffers between ranks.

Shape suffixes: T tokens, K choices per token, A = T*K assignments, N kept assignments, E experts, G routing groups,
C capacity per (expert, group), M d_model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch


def expert_capacity(
    group_tokens: int, num_experts: int, capacity_factor: float | None, *, top_k: int = 1, min_capacity: int = 4
) -> int | None:
    """Tokens each expert may take from one routing group (paper Eq. 3, per group as in Fig. 16).

    ``C = min(S, max(min_capacity, ceil(capacity_factor * top_k * S / E)))`` with S the group size. We round
    up (as DeepSpeed does) so that perfectly balanced routing at capacity factor 1.0 never drops a token; Mesh
    TensorFlow floors and flaxformer rounds to nearest, which differ by at most one slot. ``min_capacity`` (4, as
    Mesh TensorFlow) keeps tiny groups from starving; no expert can take more than the S tokens of its group.
    ``capacity_factor=None`` means dropless and returns None.
    """
    if capacity_factor is None:
        return None
    if not (isinstance(capacity_factor, (int, float)) and math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor must be a finite number > 0 (or None for dropless), got {capacity_factor}")
    raw = math.ceil(capacity_factor * top_k * group_tokens / num_experts - 1e-9)
    return int(min(group_tokens, max(min_capacity, raw)))


@dataclass
class RoutingPlan:
    """Assignments of tokens to expert slots, sorted expert-major ((expert, group, position) order).

    Attributes:
        token_A: token index of each sorted assignment ``[A]``.
        expert_A: expert of each sorted assignment ``[A]`` (``num_experts`` where the choice is unused).
        group_A: routing group ``[A]``.
        position_A: position inside its (expert, group) run ``[A]``.
        gate_A: combine weight ``[A]`` float32.
        kept_A: bool ``[A]``: used and within capacity.
        num_experts, num_groups, capacity: sizes; capacity None = dropless.
        num_tokens: T.
    """

    token_A: torch.Tensor
    expert_A: torch.Tensor
    group_A: torch.Tensor
    position_A: torch.Tensor
    gate_A: torch.Tensor
    kept_A: torch.Tensor
    num_experts: int
    num_groups: int
    capacity: int | None
    num_tokens: int

    def tokens_per_expert(self) -> torch.Tensor:
        """``[E]`` int64: tokens each expert processes, after capacity."""
        expert = torch.where(self.kept_A, self.expert_A, self.num_experts)
        return _count(expert, self.num_experts + 1)[: self.num_experts]


def _count(index: torch.Tensor, size: int) -> torch.Tensor:
    """``bincount`` with a known size. torch.bincount reads ``index.max()`` back to the host on accelerators; a
    scatter-add into a fixed-size buffer keeps the static-capacity path free of host syncs."""
    return torch.zeros(size, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))


def _sorted_positions(segment_A: torch.Tensor, tiebreak_A: torch.Tensor, num_segments: int, span: int):
    """Sort assignments by (segment, tiebreak) and give each its rank inside its segment.

    ``tiebreak_A`` must be unique within a segment and lie in [0, span).
    """
    key_A = segment_A * span + tiebreak_A
    order_A = torch.argsort(key_A)
    seg_sorted_A = segment_A[order_A]
    counts = _count(segment_A, num_segments)
    starts = torch.cumsum(counts, 0) - counts
    position_A = torch.arange(order_A.numel(), device=order_A.device) - starts[seg_sorted_A]
    return order_A, seg_sorted_A, position_A


def plan_routing(
    expert_index_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    use_TK: torch.Tensor,
    *,
    num_experts: int,
    group_T: torch.Tensor,
    num_groups: int,
    capacity: int | None,
    priority_T: torch.Tensor | None = None,
    fallback_index_TR: torch.Tensor | None = None,
    fallback_gates_TR: torch.Tensor | None = None,
) -> RoutingPlan:
    """Assign expert slots under capacity, in priority order, without loops over tokens.

    Priority (who keeps a slot when an expert overflows): all first choices before any second choice (Mesh
    TensorFlow's top-2), and within a choice level by ``priority_T`` (a rank that is unique within each group;
    default: token order, the Switch default; batch-prioritized routing passes the rank by descending gate).

    No-Token-Left-Behind (App. B): when ``fallback_index_TR`` (the next R choices of each token) is given, tokens
    that found no room are offered their next choice, one round per choice, filling the slots left over.

    Args:
        expert_index_TK, gates_TK, use_TK: the router's choices, weights and usable flags, ``[T, K]``.
        num_experts: E.
        group_T: routing group of each token ``[T]`` (int64), groups numbered 0..G-1.
        num_groups: G.
        capacity: C per (expert, group), or None for dropless.
        priority_T: optional unique-per-group rank ``[T]``.
    """
    num_tokens, top_k = expert_index_TK.shape
    device = expert_index_TK.device
    token_ids_T = torch.arange(num_tokens, device=device)
    rank_T = token_ids_T if priority_T is None else priority_T
    # NOTE: assignments are laid out choice-major (all first choices, then all second choices, ...), so the
    # tiebreak (choice, rank) gives first choices priority over second ones.
    token_A = token_ids_T.repeat(top_k)
    choice_A = torch.arange(top_k, device=device).repeat_interleave(num_tokens)
    expert_A = torch.where(use_TK.t().reshape(-1), expert_index_TK.t().reshape(-1), num_experts)
    group_A = group_T.repeat(top_k)
    gate_A = gates_TK.t().reshape(-1)
    segment_A = expert_A * num_groups + group_A  # unused choices land in segments >= E*G, sorted last
    order_A, seg_sorted_A, position_A = _sorted_positions(
        segment_A, choice_A * num_tokens + rank_T.repeat(top_k), (num_experts + 1) * num_groups, top_k * num_tokens
    )
    token_A, expert_A, group_A, gate_A = token_A[order_A], expert_A[order_A], group_A[order_A], gate_A[order_A]
    used_A = seg_sorted_A < num_experts * num_groups
    kept_A = used_A if capacity is None else used_A & (position_A < capacity)

    if fallback_index_TR is not None and capacity is not None and fallback_index_TR.shape[1] > 0:
        return _no_token_left_behind(
            token_A, expert_A, group_A, position_A, gate_A, kept_A, used_A, fallback_index_TR, fallback_gates_TR,
            group_T, rank_T, num_experts, num_groups, capacity,
        )
    return RoutingPlan(token_A, expert_A, group_A, position_A, gate_A, kept_A, num_experts, num_groups, capacity,
                       num_tokens)


def _no_token_left_behind(
    token_A, expert_A, group_A, position_A, gate_A, kept_A, used_A, fallback_index_TR, fallback_gates_TR,
    group_T, rank_T, num_experts, num_groups, capacity,
) -> RoutingPlan:
    """Re-route overflowing top-1 tokens to their next choices (App. B; Mesh TensorFlow ``_ntlb_gating``)."""
    num_tokens = group_T.numel()
    device = group_T.device
    # Final (expert, position, gate) of each token; -1 expert = not placed yet.
    expert_T = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
    position_T = torch.zeros(num_tokens, dtype=torch.long, device=device)
    gate_T = torch.zeros(num_tokens, dtype=gate_A.dtype, device=device)
    expert_T[token_A[kept_A]] = expert_A[kept_A]
    position_T[token_A[kept_A]] = position_A[kept_A]
    gate_T[token_A[kept_A]] = gate_A[kept_A]
    wants_T = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    wants_T[token_A[used_A]] = True  # real tokens (padding never routes)
    fill_S = _count(torch.where(kept_A, expert_A * num_groups + group_A, num_experts * num_groups),
                    num_experts * num_groups + 1)[:-1]
    num_segments = num_experts * num_groups
    for r in range(fallback_index_TR.shape[1]):  # a few rounds (ntlb_top_k - 1), never a loop over tokens
        waiting_T = wants_T & (expert_T < 0)
        seg_T = torch.where(waiting_T, fallback_index_TR[:, r] * num_groups + group_T, num_segments)
        order_T, seg_sorted_T, pos_T = _sorted_positions(seg_T, rank_T, num_segments + 1, num_tokens)
        valid_T = seg_sorted_T < num_segments
        pos_T = pos_T + fill_S[seg_sorted_T.clamp(max=num_segments - 1)]
        take_T = valid_T & (pos_T < capacity)
        tok = order_T[take_T]
        expert_T[tok] = fallback_index_TR[tok, r]
        position_T[tok] = pos_T[take_T]
        gate_T[tok] = fallback_gates_TR[tok, r]
        fill_S = fill_S + _count(torch.where(take_T, seg_sorted_T, num_segments), num_segments + 1)[:-1]
    placed_T = expert_T >= 0
    segment_T = torch.where(placed_T, expert_T * num_groups + group_T, num_segments)
    token_ids_T = torch.arange(num_tokens, device=device)
    # Position is unique within each segment, so (segment, position) orders the dispatch buffer; unplaced last.
    order = torch.argsort(segment_T * (num_tokens + 1) + torch.where(placed_T, position_T, token_ids_T))
    expert_out = torch.where(placed_T, expert_T, num_experts)[order]
    return RoutingPlan(
        token_ids_T[order], expert_out, group_T[order], position_T[order], gate_T[order], placed_T[order],
        num_experts, num_groups, capacity, num_tokens,
    )


@dataclass
class Dispatched:
    """Tokens grouped for the experts.

    ``x`` is ragged ``[N, M]`` with ``counts`` (a host list of tokens per expert, expert-major), or padded
    ``[E, G*C, M]`` with ``counts`` None. ``extra`` carries what a dispatcher's ``combine`` needs from its
    ``dispatch`` (the all-to-all dispatcher's split sizes), opaque to the layer.
    """

    x: torch.Tensor
    counts: list[int] | None
    token_N: torch.Tensor
    gate_N: torch.Tensor
    slot_A: torch.Tensor | None = None
    extra: object = None


class Dispatcher(Protocol):
    """Moves token representations to the experts and the expert outputs back (the expert-parallel seam)."""

    def dispatch(self, x_TM: torch.Tensor, plan: RoutingPlan) -> Dispatched: ...

    def combine(self, y: torch.Tensor, dispatched: Dispatched, plan: RoutingPlan) -> torch.Tensor: ...


class LocalDispatcher:
    """Dispatch on one device.

    Two layouts, both exactly equal to the one-hot einsum oracle:
    - ``ragged``: gather the kept tokens expert-major into ``[N, M]`` and hand the experts a host list of counts.
      Processes only real, kept tokens (no padding waste), at the price of one host sync for the counts; the
      fastest layout on CPU, where a sync costs nothing.
    - ``padded``: scatter into a static ``[E, G*C, M]`` capacity buffer for one batched matmul: no host sync and
      static shapes (CUDA graphs, torch.compile), used on accelerators when capacity is finite.
    ``auto`` picks ``padded`` on accelerators with finite capacity, else ``ragged``.
    """

    def __init__(self, layout: Literal["auto", "ragged", "padded"] = "auto") -> None:
        if layout not in ("auto", "ragged", "padded"):
            raise ValueError(f"layout must be 'auto', 'ragged' or 'padded', got {layout!r}")
        self.layout = layout

    def _padded(self, x_TM: torch.Tensor, plan: RoutingPlan) -> bool:
        if plan.capacity is None:
            if self.layout == "padded":
                raise ValueError("the padded layout needs a finite capacity; use layout='ragged' for dropless")
            return False
        return self.layout == "padded" or (self.layout == "auto" and x_TM.device.type != "cpu")

    def dispatch(self, x_TM: torch.Tensor, plan: RoutingPlan) -> Dispatched:
        if self._padded(x_TM, plan):
            rows = plan.num_groups * plan.capacity
            trash = plan.num_experts * rows  # dropped assignments write to one extra row that is thrown away
            slot_A = torch.where(
                plan.kept_A, plan.expert_A * rows + plan.group_A * plan.capacity + plan.position_A, trash
            )
            buf = x_TM.new_zeros(trash + 1, x_TM.shape[-1])
            buf = buf.index_copy(0, slot_A, x_TM[plan.token_A])
            return Dispatched(buf[:trash].view(plan.num_experts, rows, -1), None, plan.token_A, plan.gate_A, slot_A)
        kept = plan.kept_A.nonzero().squeeze(-1)  # host sync: ragged shapes need sizes (free on CPU)
        token_N = plan.token_A[kept]
        counts = plan.tokens_per_expert().tolist()
        # index_select, not x[idx]: its backward is an index_add, cheaper than indexing's accumulating index_put
        return Dispatched(x_TM.index_select(0, token_N), counts, token_N, plan.gate_A[kept])

    def combine(self, y: torch.Tensor, dispatched: Dispatched, plan: RoutingPlan) -> torch.Tensor:
        if dispatched.slot_A is not None:
            flat = torch.cat([y.reshape(-1, y.shape[-1]), y.new_zeros(1, y.shape[-1])])
            y_AM = flat[dispatched.slot_A] * (dispatched.gate_N * plan.kept_A).to(y.dtype)[:, None]
        else:
            y_AM = y * dispatched.gate_N.to(y.dtype)[:, None]
        # Tokens with no kept assignment get exactly zero: the block's residual carries them (§2.2).
        out = y_AM.new_zeros(plan.num_tokens, y_AM.shape[-1])
        return out.index_add(0, dispatched.token_N, y_AM)
