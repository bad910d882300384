"""All-to-all token dispatch between expert-parallel ranks (paper §5.4, Fig. 17; §5.6).

``AllToAllDispatcher`` implements the ``switchformer.moe.dispatch.Dispatcher`` protocol. ``parallelize`` puts one
into every ``SwitchFFN`` whose experts it shards; the layer's routing (router, capacity, ``plan_routing``) is
unchanged and sees all E experts, so routing, drops and the auxiliary losses are those of the single-process layer
with the same routing groups (each rank's tokens are its routing group or groups).

Rank j of the expert-parallel group holds experts [j*E/ep, (j+1)*E/ep). Two exchanges, chosen by the plan:

- **Capacity** (finite capacity, the paper's): kept tokens are scattered into a fixed ``[E, G*C, M]`` buffer
  (zeros in unused slots), viewed ``[ep, E_local, G*C, M]`` and exchanged with equal splits: static shapes, no
  count exchange, no host sync. Each rank then computes ``[E_local, ep*G*C, M]`` with one batched matmul per
  weight and sends the results back the same way. Bytes per rank and direction: ``E*G*C*M`` elements.
- **Dropless** (capacity None): the per-expert counts are exchanged first (one small all-to-all), the splits
  are read back to the host, and the routed tokens alone travel with variable splits. The receiver uses the
  *exchanged* counts, never counts it recomputed: ranks that disagree on splits get silent garbage, not an error.

Every collective runs on every rank in the same order whatever the routing (zero tokens for an expert or a rank
included), so no rank can wait on a collective its peer skipped. Autograd flows through both exchanges
(``all_to_all_single_autograd``): after backward an expert's gradient is that of the sum of all ranks' losses.

Shape suffixes: T tokens, A assignments, N routed rows, E experts, L experts per rank, R ranks, M d_model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from switchformer.moe.dispatch import Dispatched, RoutingPlan


class AllToAllDispatcher:
    """Moves tokens to the rank that holds their expert and the expert outputs back.

    Args:
        group: the expert-parallel process group (size ep); E must be divisible by its size.
        check_shapes: in capacity mode, compare the buffer size across ranks before the first exchange (one tiny
            all-gather, once). Ranks with different token counts would otherwise exchange mismatched buffers.
    """

    def __init__(self, group: dist.ProcessGroup, *, check_shapes: bool = True) -> None:
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._checked_rows: int | None = None if check_shapes else -1
        self.last_bytes_sent = 0
        """Bytes of token data this rank sent in the last ``dispatch`` (one direction), for benchmarks."""

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(ep={self.ep}, rank={self.rank})"

    def _experts_per_rank(self, plan: RoutingPlan) -> int:
        if plan.num_experts % self.ep:
            raise ValueError(
                f"{plan.num_experts} experts cannot be split evenly over {self.ep} expert-parallel ranks; choose "
                f"parallel.ep dividing num_experts (e.g. {_divisor_hint(plan.num_experts, self.ep)})"
            )
        return plan.num_experts // self.ep

    # ------------------------------------------------------------------------------------------ dispatch / combine
    def dispatch(self, x_TM: torch.Tensor, plan: RoutingPlan) -> Dispatched:
        experts_per_rank = self._experts_per_rank(plan)
        if plan.capacity is None:
            return self._dispatch_dropless(x_TM, plan, experts_per_rank)
        return self._dispatch_capacity(x_TM, plan, experts_per_rank)

    def combine(self, y: torch.Tensor, dispatched: Dispatched, plan: RoutingPlan) -> torch.Tensor:
        if dispatched.slot_A is not None:
            return self._combine_capacity(y, dispatched, plan)
        return self._combine_dropless(y, dispatched, plan)

    # ------------------------------------------------------------------------------------------------- capacity
    def _dispatch_capacity(self, x_TM: torch.Tensor, plan: RoutingPlan, experts_per_rank: int) -> Dispatched:
        rows = plan.num_groups * plan.capacity
        self._check_rows(rows, x_TM.device)
        trash = plan.num_experts * rows  # dropped assignments write to one extra row that is thrown away
        slot_A = torch.where(plan.kept_A, plan.expert_A * rows + plan.group_A * plan.capacity + plan.position_A,
                             trash)
        buf = x_TM.new_zeros(trash + 1, x_TM.shape[-1]).index_copy(0, slot_A, x_TM[plan.token_A])
        send = buf[:trash]  # [E*rows, M] = [R, L, rows, M] flattened: rank-major because experts are contiguous
        self.last_bytes_sent = send.numel() * send.element_size()
        recv = _all_to_all(send, None, None, self.group)  # [R(src), L, rows, M]
        d_model = x_TM.shape[-1]
        x_LNM = recv.view(self.ep, experts_per_rank, rows, d_model).transpose(0, 1).reshape(
            experts_per_rank, self.ep * rows, d_model)
        return Dispatched(x_LNM, None, plan.token_A, plan.gate_A, slot_A)

    def _combine_capacity(self, y_LNM: torch.Tensor, dispatched: Dispatched, plan: RoutingPlan) -> torch.Tensor:
        experts_per_rank, _, d_model = y_LNM.shape
        rows = plan.num_groups * plan.capacity
        back = y_LNM.reshape(experts_per_rank, self.ep, rows, d_model).transpose(0, 1).reshape(-1, d_model)
        y_EM = _all_to_all(back, None, None, self.group)  # [E*rows, M], global expert-major
        flat = torch.cat([y_EM, y_EM.new_zeros(1, d_model)])
        y_AM = flat[dispatched.slot_A] * (dispatched.gate_N * plan.kept_A).to(y_EM.dtype)[:, None]
        out = y_AM.new_zeros(plan.num_tokens, d_model)
        return out.index_add(0, dispatched.token_N, y_AM)

    def _check_rows(self, rows: int, device: torch.device) -> None:
        """Equal splits need equal buffers on every rank: check once, naming the fix."""
        if self._checked_rows is not None and (self._checked_rows == rows or self._checked_rows < 0):
            return
        mine = torch.tensor([rows], dtype=torch.long, device=device)
        every = [torch.zeros_like(mine) for _ in range(self.ep)]
        dist.all_gather(every, mine, group=self.group)
        seen = [int(t) for t in every]
        if len(set(seen)) > 1:
            raise ValueError(
                f"expert-parallel ranks route different numbers of capacity slots per expert ({seen}): in capacity "
                "mode every rank must call the layer with the same number of tokens (equal batch and sequence "
                "shapes, or the same model.moe.group_size); pad the batches, or use dropless routing "
                "(capacity_factor=None)"
            )
        self._checked_rows = rows

    # -------------------------------------------------------------------------------------------------- dropless
    def _dispatch_dropless(self, x_TM: torch.Tensor, plan: RoutingPlan, experts_per_rank: int) -> Dispatched:
        counts_E = plan.tokens_per_expert()  # kept assignments per global expert, in the plan's order
        # (1) exchange counts: recv_RL[s, l] = tokens rank s sends to my local expert l
        recv_RL = torch.empty(self.ep * experts_per_rank, dtype=counts_E.dtype, device=counts_E.device)
        dist.all_to_all_single(recv_RL, counts_E, group=self.group)
        recv_RL = recv_RL.view(self.ep, experts_per_rank)
        # (2) splits on the host: the one sync of the dropless path
        counts_RL_cpu = torch.stack([counts_E.view(self.ep, experts_per_rank), recv_RL]).cpu()
        input_splits = counts_RL_cpu[0].sum(1).tolist()
        output_splits = counts_RL_cpu[1].sum(1).tolist()
        local_counts = counts_RL_cpu[1].sum(0).tolist()
        # (3) the routed rows alone, expert-major = rank-major
        kept = plan.kept_A.nonzero().squeeze(-1)
        token_N = plan.token_A[kept]
        x_NM = x_TM.index_select(0, token_N)
        self.last_bytes_sent = x_NM.numel() * x_NM.element_size()
        recv_NM = _all_to_all(x_NM, output_splits, input_splits, self.group)  # [src rank][local expert] rows
        # (4) rank-major -> local-expert-major (a stable sort of segment keys; no loop over tokens)
        order = _rank_to_expert_major(counts_RL_cpu[1], recv_NM.device)
        x_local = recv_NM.index_select(0, order)
        meta = _DroplessMeta(order, input_splits, output_splits)
        return Dispatched(x_local, local_counts, token_N, plan.gate_A[kept], None, meta)

    def _combine_dropless(self, y_local: torch.Tensor, dispatched: Dispatched, plan: RoutingPlan) -> torch.Tensor:
        meta: _DroplessMeta = dispatched.extra
        inverse = torch.empty_like(meta.order)
        inverse[meta.order] = torch.arange(meta.order.numel(), device=meta.order.device)
        y_rank_major = y_local.index_select(0, inverse)
        y_NM = _all_to_all(y_rank_major, meta.input_splits, meta.output_splits, self.group)
        y_NM = y_NM * dispatched.gate_N.to(y_NM.dtype)[:, None]
        out = y_NM.new_zeros(plan.num_tokens, y_NM.shape[-1])
        return out.index_add(0, dispatched.token_N, y_NM)


class _DroplessMeta:
    """What the dropless combine needs from its dispatch: the row order and both split lists."""

    __slots__ = ("order", "input_splits", "output_splits")

    def __init__(self, order: torch.Tensor, input_splits: list[int], output_splits: list[int]) -> None:
        self.order, self.input_splits, self.output_splits = order, input_splits, output_splits


def _rank_to_expert_major(counts_RL: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Row permutation taking rows laid out [source rank][local expert] to [local expert][source rank]."""
    ranks, experts_per_rank = counts_RL.shape
    seg_src_major = torch.arange(ranks * experts_per_rank).view(ranks, experts_per_rank)
    expert_major_key = seg_src_major.remainder(experts_per_rank) * ranks + seg_src_major.div(
        experts_per_rank, rounding_mode="floor")
    key_N = torch.repeat_interleave(expert_major_key.reshape(-1), counts_RL.reshape(-1))
    return torch.argsort(key_N, stable=True).to(device)


def _all_to_all(x: torch.Tensor, output_splits, input_splits, group) -> torch.Tensor:
    """Differentiable all-to-all over dim 0 (equal splits when both are None)."""
    out = funcol.all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group)
    return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out


def _divisor_hint(num_experts: int, ep: int) -> int:
    divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
    return min(divisors, key=lambda d: (abs(d - ep), d))
