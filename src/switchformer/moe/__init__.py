"""The Switch layer: router, capacity and dispatch, experts (paper.md §1)."""

from switchformer.moe.dispatch import Dispatcher, LocalDispatcher, RoutingPlan, expert_capacity, plan_routing
from switchformer.moe.experts import Experts
from switchformer.moe.layer import MoEAux, SwitchFFN
from switchformer.moe.oracle import einsum_switch_reference
from switchformer.moe.router import Router, RouterOutput, load_balancing_loss, router_z_loss

__all__ = [
    "Dispatcher", "Experts", "LocalDispatcher", "MoEAux", "Router", "RouterOutput", "RoutingPlan", "SwitchFFN",
    "einsum_switch_reference", "expert_capacity", "load_balancing_loss", "plan_routing", "router_z_loss",
]
