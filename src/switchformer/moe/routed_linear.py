"""``RoutedLinear``: a Switch linear layer, E expert matrices with top-1 routing (Switch attention, paper App. A).

Shape suffixes: T tokens, E experts, I input width, O output width.
"""

from __future__ import annotations

import torch
from torch import nn

from switchformer.moe.dispatch import LocalDispatcher, plan_routing
from switchformer.moe.experts import ragged_linear
from switchformer.moe.layer import MoEAux
from switchformer.moe.router import Router, load_balancing_loss, router_z_loss


class RoutedLinear(nn.Module):
    """A Switch linear layer: each token uses its top-1 expert matrix, scaled by the router probability (Eq. 2).

    Switch attention (paper App. A, Table 10) puts these in place of the Q/K/V projections. It shares the layer's
    pieces: the ``Router`` (router_dtype, exploration in training), ``plan_routing`` (dropless: no capacity) and
    the ``LocalDispatcher``'s ragged layout, with linear experts (``experts.ragged_linear``). Every position is
    projected, padding included (attention masks padded keys; queries at padding positions are ignored
    downstream), while the router losses and statistics count real tokens only.

    Args:
        d_in: input width.
        d_out: output width.
        num_experts: E.
        router_kwargs: forwarded to ``Router`` (exploration, jitter_eps, router_dtype...).
    """

    def __init__(self, d_in: int, d_out: int, num_experts: int, **router_kwargs) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.router = Router(d_in, num_experts, top_k=1, **router_kwargs)
        self.weight = nn.Parameter(torch.empty(num_experts, d_out, d_in))  # [E, out, in], nn.Linear layout
        self.dispatcher = LocalDispatcher("ragged")

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux]:
        """x ``[..., d_in]`` -> (``[..., d_out]``, ``MoEAux`` named '' (the caller sets the name))."""
        x_TI = x.reshape(-1, x.shape[-1])
        num_tokens = x_TI.shape[0]
        real_T = (torch.ones(num_tokens, dtype=torch.bool, device=x.device) if padding_mask is None
                  else padding_mask.reshape(-1).bool())
        routed = self.router(x_TI)  # every position is projected; statistics below count real tokens only
        plan = plan_routing(
            routed.expert_index_TK, routed.gates_TK, routed.use_TK, num_experts=self.num_experts,
            group_T=torch.zeros(num_tokens, dtype=torch.long, device=x.device), num_groups=1, capacity=None,
        )
        dispatched = self.dispatcher.dispatch(x_TI, plan)
        y_TO = self.dispatcher.combine(ragged_linear(dispatched.x, self.weight, dispatched.counts), dispatched, plan)
        index_T = routed.expert_index_TK[:, 0]
        expert_index = torch.where(real_T, index_T, -1)
        tokens_per_expert = torch.zeros(self.num_experts + 1, dtype=torch.long, device=x.device)
        tokens_per_expert.index_add_(0, torch.where(real_T, index_T, self.num_experts), torch.ones_like(index_T))
        aux = MoEAux(
            load_balancing_loss=load_balancing_loss(routed.probs_TE, index_T, real_T),
            router_z_loss=router_z_loss(routed.logits_TE, real_T),
            tokens_per_expert=tokens_per_expert[: self.num_experts],
            dropped_tokens=torch.zeros((), dtype=torch.long, device=x.device),
            expert_index=expert_index,
            router_logits=routed.logits_TE,
            router_probs=routed.probs_TE,
            num_tokens=real_T.sum(),
            capacity=None,
        )
        return y_TO.view(*x.shape[:-1], -1).to(x.dtype), aux
