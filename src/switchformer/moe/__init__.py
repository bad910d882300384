"""The Switch layer (paper §2): router (``router.py``), capacity and dispatch (``dispatch.py``), experts
(``experts.py``), the layer (``layer.py``), its generation-step fast path (``decode.py``) and Switch attention's
routed projections (``routed_linear.py``)."""

from switchformer.moe.decode import decode_fast_path_ok, switch_ffn_decode
from switchformer.moe.dispatch import Dispatcher, LocalDispatcher, RoutingPlan, expert_capacity, plan_routing
from switchformer.moe.experts import Experts
from switchformer.moe.layer import MoEAux, SwitchFFN
from switchformer.moe.oracle import einsum_switch_reference
from switchformer.moe.routed_linear import RoutedLinear
from switchformer.moe.router import Router, RouterOutput, load_balancing_loss, router_z_loss

__all__ = [
    "Dispatcher", "Experts", "LocalDispatcher", "MoEAux", "RoutedLinear", "Router", "RouterOutput", "RoutingPlan",
    "SwitchFFN", "decode_fast_path_ok", "einsum_switch_reference", "expert_capacity", "load_balancing_loss",
    "plan_routing", "router_z_loss", "switch_ffn_decode",
]
