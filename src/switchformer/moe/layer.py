"""SwitchFFN: router + dispatcher + experts, the sparse feed-forward layer of Switch Transformers (paper §2.1-2.2).

    layer = SwitchFFN(d_model=512, d_ff=2048, num_experts=8)
    y, aux = layer(x)                      # x [B, S, M] or [T, M]; y same shape and dtype
    y, aux = layer(x, padding_mask=mask)   # mask True for real tokens

Each token goes to its top-1 expert (top-k optional) and the expert output is scaled by the router probability
(Eq. 2). Experts take at most ``capacity`` tokens per routing group (Eq. 3); overflowing tokens get zero output so
the block's residual carries them unchanged (§2.2). The auxiliary losses are returned unweighted in ``MoEAux``.

Shape suffixes: T tokens, K choices per token, E experts, M d_model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from switchformer.config import MoEConfig
from switchformer.dtypes import parse_dtype
from switchformer.errors import ConfigError
from switchformer.moe.dispatch import Dispatcher, LocalDispatcher, expert_capacity, plan_routing
from switchformer.moe.experts import ACTIVATIONS, Experts, truncated_normal_
from switchformer.moe.router import Router, load_balancing_loss, router_z_loss, top_k_lowest_index
from switchformer.runtime import tune_malloc_once


@dataclass
class MoEAux:
    """Router results of one routed layer for one call (a ``SwitchFFN``, or a ``RoutedLinear`` of Switch
    attention): losses (unweighted; weighting is the model's) and statistics. Return values, never globals.

    Attributes:
        load_balancing_loss: float32 scalar, Eqs. 4-6, mean over routing groups; 1.0 for uniform routing.
        router_z_loss: float32 scalar, mean over real tokens of logsumexp(logits)**2.
        tokens_per_expert: ``[E]`` int64, tokens each expert processed after capacity.
        dropped_tokens: int64 scalar tensor, real tokens that no expert processed.
        expert_index: ``[T]`` (or ``[T, K]`` for top-k) int64 expert per token, -1 where dropped or padding.
        router_logits: ``[T, E]`` float32.
        router_probs: ``[T, E]`` float32.
        num_tokens: int64 scalar tensor, real (non-padding) tokens routed.
        capacity: capacity per expert and routing group (None when dropless).
        name: where in a model the layer routed, set by the model: ``"encoder.block.1"`` (the Switch FFN of that
            block) or ``"decoder.block.0.layer.0.SelfAttention.q"`` (a Switch-attention projection); "" for a
            layer called on its own.
    """

    load_balancing_loss: torch.Tensor
    router_z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_tokens: torch.Tensor
    expert_index: torch.Tensor
    router_logits: torch.Tensor
    router_probs: torch.Tensor
    num_tokens: torch.Tensor
    capacity: int | None
    name: str = ""


def _setting(name: str, settable: bool) -> property:
    """A SwitchFFN attribute that reads (and, for capacity settings, writes through a re-validated copy of) the
    layer's ``MoEConfig``: the config is the one home of the layer's settings."""

    def get(self):
        return getattr(self.config, name)

    def set_(self, value) -> None:
        self.config = dataclasses.replace(self.config, **{name: value})

    return property(get, set_ if settable else None, doc=f"``self.config.{name}``")


class SwitchFFN(nn.Module):
    """The Switch feed-forward layer.

    The routing settings (``num_experts`` to ``second_expert_threshold``) are the fields of a ``MoEConfig``, which
    validates them when it is made: the keyword form builds one, ``SwitchFFN.from_config(d_model, d_ff, cfg)``
    takes one, and ``layer.config`` holds it (the layer's ``capacity_factor`` etc. read it).

    Args:
        d_model: M.
        d_ff: hidden width F of one expert (the dense FFN it replaces has the same FLOPs per token).
        num_experts: E >= 1.
        capacity_factor: training capacity factor (Eq. 3); None = dropless.
        eval_capacity_factor: capacity factor in eval mode; None = dropless.
        top_k: experts per token; 1 = Switch, >= 2 = the top-k 'MoE' baseline (renormalised gates).
        expert_capacity: fixed capacity per sequence (transformers' SwitchTransformers semantics: each sequence
            of a ``[B, S, M]`` input is its own routing group, token order); overrides the capacity factors.
        min_capacity: lower bound of the per-group capacity.
        group_size: tokens per routing group (the paper's tokens per core); None = all tokens of a call.
        router_dtype: router precision; float32 is selective precision (§2.4).
        exploration, jitter_eps, router_input_dropout: App. C exploration policy (training only).
        batch_prioritized_routing: keep the most confident tokens when an expert overflows (flaxformer's BPR);
            default token order, as the paper. Not for decoders at generation time (it breaks causality).
        no_token_left_behind: re-route overflowing tokens to their next ``ntlb_top_k - 1`` choices (App. B).
        expert_dropout: dropout inside the experts (§2.4).
        second_expert_threshold: top-k random second-expert policy: in training the second choice is used with
            probability min(1, g2 / threshold), g2 its renormalised gate (0 = always use it).
        activation: 'relu' or 'gated-gelu'.
        init_scale: truncated normal std sqrt(init_scale / fan_in) for router and experts (§2.4, Table 3).
        dispatcher: how tokens reach the experts; default ``LocalDispatcher()``. Expert parallelism swaps it.
    """

    num_experts = _setting("num_experts", False)
    top_k = _setting("top_k", False)
    batch_prioritized_routing = _setting("batch_prioritized_routing", False)
    no_token_left_behind = _setting("no_token_left_behind", False)
    ntlb_top_k = _setting("ntlb_top_k", False)
    # Capacity settings may change on a built layer (generation runs dropless); each change is validated.
    capacity_factor = _setting("capacity_factor", True)
    eval_capacity_factor = _setting("eval_capacity_factor", True)
    expert_capacity = _setting("expert_capacity", True)
    min_capacity = _setting("min_capacity", True)
    group_size = _setting("group_size", True)

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = 2.0,
        *,
        top_k: int = 1,
        expert_capacity: int | None = None,
        min_capacity: int = 4,
        group_size: int | None = None,
        router_dtype: torch.dtype | str = torch.float32,
        exploration: str = "input_jitter",
        jitter_eps: float = 0.01,
        router_input_dropout: float = 0.1,
        batch_prioritized_routing: bool = False,
        no_token_left_behind: bool = False,
        ntlb_top_k: int = 4,
        expert_dropout: float = 0.0,
        second_expert_threshold: float = 0.0,
        activation: str = "relu",
        init_scale: float = 0.1,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        super().__init__()
        # The routing settings are validated in one place, MoEConfig; the keyword form builds one.
        dtype = parse_dtype(router_dtype, name="router_dtype")
        cfg = MoEConfig(
            num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor, expert_capacity=expert_capacity, min_capacity=min_capacity,
            group_size=group_size, router_dtype=str(dtype).removeprefix("torch."), exploration=exploration,
            jitter_eps=jitter_eps, router_input_dropout=router_input_dropout,
            batch_prioritized_routing=batch_prioritized_routing, no_token_left_behind=no_token_left_behind,
            ntlb_top_k=ntlb_top_k, expert_dropout=expert_dropout, second_expert_threshold=second_expert_threshold,
        )
        for name, value in (("d_model", d_model), ("d_ff", d_ff)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not (
            math.isfinite(init_scale) and init_scale > 0
        ):
            raise ConfigError(f"init_scale must be a finite number > 0 (paper §2.4: 0.1), got {init_scale!r}")
        if dispatcher is not None and not (
            callable(getattr(dispatcher, "dispatch", None)) and callable(getattr(dispatcher, "combine", None))
        ):
            raise TypeError(f"dispatcher must have dispatch() and combine() methods, got {type(dispatcher).__name__}")
        self.config = cfg
        self.d_model = d_model
        self.router = Router(
            d_model, cfg.num_experts, top_k=cfg.top_k, router_dtype=dtype, exploration=cfg.exploration,
            jitter_eps=cfg.jitter_eps, router_input_dropout=cfg.router_input_dropout,
            second_expert_threshold=cfg.second_expert_threshold,
        )
        truncated_normal_(self.router.weight.data, d_model, init_scale)
        self.experts = Experts(
            cfg.num_experts, d_model, d_ff, activation=activation, expert_dropout=cfg.expert_dropout,
            init_scale=init_scale,
        )
        self.dispatcher: Dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        if self.experts.w_in.device.type == "cpu":
            # Keep glibc from page-faulting the large expert buffers afresh every step (switchformer.runtime:
            # documented opt-out SWITCHFORMER_MALLOC_TUNING=0 or runtime.disable_malloc_tuning()).
            tune_malloc_once()

    @classmethod
    def from_config(
        cls, d_model: int, d_ff: int, cfg: MoEConfig, *, activation: str = "relu", init_scale: float = 0.1,
        dispatcher: Dispatcher | None = None,
    ) -> SwitchFFN:
        """Build from a ``MoEConfig`` (the models' path); the config is checked again, in case it was edited."""
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a switchformer.config.MoEConfig, got {type(cfg).__name__}")
        return cls(d_model, d_ff, **dataclasses.asdict(cfg), activation=activation, init_scale=init_scale,
                   dispatcher=dispatcher)

    def _check_input(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must be [batch, seq, d_model] or [tokens, d_model] with d_model={self.d_model}, "
                f"got shape {tuple(x.shape)}"
            )
        if x.dtype != self.experts.w_in.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the layer's experts are {self.experts.w_in.dtype}; convert one, e.g. "
                f"layer.to({x.dtype}) or x.to({self.experts.w_in.dtype})"
            )
        if padding_mask is None:
            return
        if not isinstance(padding_mask, torch.Tensor):
            raise TypeError(
                f"padding_mask must be a bool torch.Tensor of shape {tuple(x.shape[:-1])} (True = real token), got "
                f"{type(padding_mask).__name__}"
            )
        if tuple(padding_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"padding_mask must have shape {tuple(x.shape[:-1])} (x without d_model), got "
                f"{tuple(padding_mask.shape)}"
            )
        if padding_mask.dtype != torch.bool and (
            padding_mask.is_complex() or not bool(((padding_mask == 0) | (padding_mask == 1)).all())
        ):
            raise ValueError("padding_mask must be bool or hold only 0 and 1 (1 = real token)")
        if padding_mask.device != x.device:
            raise ValueError(f"padding_mask is on {padding_mask.device}, x on {x.device}; move them to one device")

    def _groups(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Routing group of each token, the number of groups, and the tokens per group."""
        num_tokens = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
        if self.expert_capacity is not None:
            seq = x.shape[1] if x.dim() == 3 else num_tokens  # transformers: each sequence is a group
        else:
            seq = self.group_size or num_tokens
        seq = max(seq, 1)  # an empty input is one empty group
        num_groups = max(-(-num_tokens // seq), 1)
        group_T = torch.arange(num_tokens, device=x.device) // seq
        return group_T, num_groups, seq

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEAux]:
        """Route, dispatch, compute and combine.

        Args:
            x: ``[batch, seq, d_model]`` or ``[tokens, d_model]``.
            padding_mask: bool, x's shape without d_model; True for real tokens. Padding is not routed, gets zero
                output, and counts in no loss or statistic.

        Returns:
            ``(y, aux)``: y with x's shape and dtype; aux a ``MoEAux``.
        """
        self._check_input(x, padding_mask)
        x_TM = x.reshape(-1, self.d_model)
        mask_T = None if padding_mask is None else padding_mask.reshape(-1).to(torch.bool)
        group_T, num_groups, group_tokens = self._groups(x)

        routed = self.router(x_TM, mask_T)
        if self.expert_capacity is not None:
            capacity = self.expert_capacity
        else:
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            capacity = expert_capacity(
                group_tokens, self.num_experts, factor, top_k=self.top_k, min_capacity=self.min_capacity
            )
        priority_T = None
        if self.batch_prioritized_routing:
            # BPR (flaxformer): within each group, rank tokens by the descending router probability of their first
            # choice (raw, not top-k's renormalised gate); two stable sorts, no loop.
            first_prob_T = routed.probs_TE.gather(-1, routed.expert_index_TK[:, :1]).squeeze(-1)
            by_gate = torch.argsort(first_prob_T, descending=True, stable=True)
            by_group = by_gate[torch.argsort(group_T[by_gate], stable=True)]
            priority_T = torch.empty_like(by_group)
            priority_T[by_group] = torch.arange(by_group.numel(), device=x.device)
        fallback_index = fallback_gates = None
        if self.no_token_left_behind and capacity is not None:
            ranked_gates, ranked = top_k_lowest_index(routed.probs_TE, min(self.ntlb_top_k, self.num_experts))
            fallback_index, fallback_gates = ranked[:, 1:], ranked_gates[:, 1:]
        plan = plan_routing(
            routed.expert_index_TK, routed.gates_TK, routed.use_TK, num_experts=self.num_experts, group_T=group_T,
            num_groups=num_groups, capacity=capacity, priority_T=priority_T, fallback_index_TR=fallback_index,
            fallback_gates_TR=fallback_gates,
        )

        dispatched = self.dispatcher.dispatch(x_TM, plan)
        expert_out = self.experts(dispatched.x, dispatched.counts)
        y_TM = self.dispatcher.combine(expert_out, dispatched, plan)

        aux = self._aux(routed, plan, mask_T, group_T, num_groups, group_tokens, capacity)
        return y_TM.view(x.shape).to(x.dtype), aux

    def _aux(self, routed, plan, mask_T, group_T, num_groups, group_tokens, capacity) -> MoEAux:
        num_tokens = plan.num_tokens
        real_T = torch.ones(num_tokens, dtype=torch.bool, device=group_T.device) if mask_T is None else mask_T
        # Loss per routing group, averaged over groups (Fig. 14; f from the pre-capacity top-1 choice).
        top1_T = routed.expert_index_TK[:, 0]
        if num_tokens == num_groups * group_tokens:
            shape = (num_groups, group_tokens)
            lb = load_balancing_loss(routed.probs_TE.view(*shape, -1), top1_T.view(shape), real_T.view(shape))
        else:  # a partial last group: fall back to one group
            lb = load_balancing_loss(routed.probs_TE, top1_T, real_T)
        z = router_z_loss(routed.logits_TE, real_T)

        # [T, K] expert per token from the plan's sorted assignments (NTLB may have moved tokens); scattered
        # through a trash slot rather than boolean-indexed, so no host sync.
        kept_A = plan.kept_A
        if self.top_k == 1:
            slot_A = torch.zeros_like(plan.token_A)
        else:  # which of the token's choices this assignment is (top-k choices are distinct experts)
            slot_A = (routed.expert_index_TK[plan.token_A] == plan.expert_A[:, None]).int().argmax(-1)
        trash = num_tokens * self.top_k
        flat = torch.full((trash + 1,), -1, dtype=torch.long, device=group_T.device)
        flat.scatter_(0, torch.where(kept_A, plan.token_A * self.top_k + slot_A, trash), plan.expert_A)
        expert_index = flat[:trash].view(num_tokens, self.top_k)
        kept_per_token_T = (expert_index >= 0).sum(-1)
        dropped = (real_T & (kept_per_token_T == 0)).sum()
        return MoEAux(
            load_balancing_loss=lb,
            router_z_loss=z,
            tokens_per_expert=plan.tokens_per_expert(),
            dropped_tokens=dropped,
            expert_index=expert_index[:, 0] if self.top_k == 1 else expert_index,
            router_logits=routed.logits_TE,
            router_probs=routed.probs_TE,
            num_tokens=real_T.sum(),
            capacity=capacity,
        )
