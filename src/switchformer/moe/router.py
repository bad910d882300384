"""The Switch router: logits, probabilities, expert choice, and the router losses (paper §2.1-2.2, Eqs. 1-6).

Selective precision (paper §2.4, Table 2): the router's copy of the input is cast to ``router_dtype`` (float32 by
default) and logits, softmax and choice run in that dtype; the caller's tensor and the experts' input are never
touched. Exploration policies are those of App. C / Table 11, applied during training only.

Shape suffixes: T tokens, E experts, K choices per token, M d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from switchformer.moe.autocast import autocast_off

EXPLORATION_POLICIES = ("input_jitter", "argmax", "sample", "input_dropout")


def top_k_lowest_index(values_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values along the last dim and their indices, exact ties going to the lowest index.

    ``torch.topk`` on CPU does not prefer the lowest index among equal values; transformers' router (``argmax``)
    and jax's ``top_k`` (Mesh TensorFlow, flaxformer) do, and a bfloat16 router produces exact ties often enough
    to route tokens differently. ``argmax`` documents the first maximum; for ``k >= 2`` a stable descending sort
    keeps equal values in index order.

    Returns:
        ``(values [..., k], indices [..., k])``, indices int64, in descending value order.
    """
    if k == 1:
        index = values_TE.argmax(dim=-1, keepdim=True)
        return values_TE.gather(-1, index), index
    values, index = torch.sort(values_TE, dim=-1, descending=True, stable=True)
    return values[..., :k], index[..., :k]


@dataclass
class RouterOutput:
    """What the router decided for each token, before capacity is applied.

    Attributes:
        logits_TE: router logits, float32 ``[T, E]``.
        probs_TE: softmax probabilities, float32 ``[T, E]``.
        expert_index_TK: chosen experts in preference order, int64 ``[T, K]``.
        gates_TK: the weight of each choice, float32 ``[T, K]``. For K=1 the raw softmax probability of the
            chosen expert (Eq. 2, not renormalised: this product is how the router learns); for K>=2 the top-K
            probabilities renormalised to sum to one (the top-2 'MoE' baseline, Mesh TensorFlow ``_top_2_gating``).
        use_TK: bool ``[T, K]``, False where a choice is not used (padding; top-2's random second-expert policy).
    """

    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    expert_index_TK: torch.Tensor
    gates_TK: torch.Tensor
    use_TK: torch.Tensor


class Router(nn.Module):
    """Linear router without bias: ``h(x) = W_r x``, ``p = softmax(h)`` (Eq. 1).

    Args:
        d_model: input width M.
        num_experts: E.
        top_k: choices per token K (1 = Switch).
        router_dtype: dtype of the router computation (float32 = selective precision).
        exploration: 'input_jitter' (multiplicative U(1-eps, 1+eps) noise on the router's copy of the input),
            'argmax' (none), 'sample' (sample the expert from softmax), or 'input_dropout'.
        jitter_eps: eps of input jitter (0.01 in the paper).
        router_input_dropout: rate for 'input_dropout'.
        second_expert_threshold: top-k >= 2, training only: use the second choice with probability
            min(1, g2 / threshold), g2 its renormalised gate (Mesh TensorFlow's 'random' second policy, threshold
            0.2); 0 always uses it.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        top_k: int = 1,
        router_dtype: torch.dtype = torch.float32,
        exploration: str = "input_jitter",
        jitter_eps: float = 0.01,
        router_input_dropout: float = 0.1,
        second_expert_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        if exploration not in EXPLORATION_POLICIES:
            raise ValueError(f"exploration must be one of {EXPLORATION_POLICIES}, got {exploration!r}")
        if not 0.0 <= jitter_eps < 1.0:
            raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps}")
        if not isinstance(router_dtype, torch.dtype) or not router_dtype.is_floating_point:
            raise TypeError(f"router_dtype must be a floating torch.dtype, got {router_dtype!r}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.router_dtype = router_dtype
        self.exploration = exploration
        self.jitter_eps = jitter_eps
        self.router_input_dropout = router_input_dropout
        self.second_expert_threshold = second_expert_threshold
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))

    def forward(self, x_TM: torch.Tensor, padding_mask_T: torch.Tensor | None = None) -> RouterOutput:
        with autocast_off(x_TM):  # selective precision holds under autocast: router_dtype alone decides
            return self._route(x_TM, padding_mask_T)

    def _route(self, x_TM: torch.Tensor, padding_mask_T: torch.Tensor | None) -> RouterOutput:
        # Selective precision: a float32 *copy* of the input feeds the router (§2.4). `.to` may return the same
        # tensor when dtypes agree, so every perturbation below is out of place: the caller's tensor and the
        # experts' input must never see the jitter (transformers#33969).
        xr_TM = x_TM.to(self.router_dtype)
        if self.training and self.exploration == "input_jitter" and self.jitter_eps > 0:
            noise_TM = torch.empty_like(xr_TM).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            xr_TM = xr_TM * noise_TM
        elif self.training and self.exploration == "input_dropout":
            xr_TM = F.dropout(xr_TM, p=self.router_input_dropout, training=True)
        logits_TE = F.linear(xr_TM, self.weight.to(self.router_dtype))
        probs_TE = torch.softmax(logits_TE, dim=-1)

        if self.training and self.exploration == "sample":
            # Sample-softmax exploration (Table 11): the first choice is drawn from p; later ones by probability.
            first_T1 = torch.multinomial(probs_TE.float(), 1)
            if self.top_k == 1:
                expert_index_TK = first_T1
            else:
                rest_TE = probs_TE.float().scatter(-1, first_T1, -1.0)
                rest_TK = top_k_lowest_index(rest_TE, self.top_k - 1)[1]
                expert_index_TK = torch.cat([first_T1, rest_TK], dim=-1)
            top_probs_TK = probs_TE.gather(-1, expert_index_TK)
        else:
            top_probs_TK, expert_index_TK = top_k_lowest_index(probs_TE, self.top_k)

        logits_TE, probs_TE, top_probs_TK = logits_TE.float(), probs_TE.float(), top_probs_TK.float()
        if self.top_k == 1:
            gates_TK = top_probs_TK
        else:
            gates_TK = top_probs_TK / top_probs_TK.sum(-1, keepdim=True)

        use_TK = torch.ones_like(expert_index_TK, dtype=torch.bool)
        if self.top_k >= 2 and self.training and self.second_expert_threshold > 0:
            # Mesh TensorFlow's 'random' policy acts on the renormalised second gate g2 = p2 / (p1 + p2).
            keep_prob_T = (gates_TK[:, 1] / self.second_expert_threshold).clamp(max=1.0)
            use_TK[:, 1] = torch.rand_like(keep_prob_T) < keep_prob_T
        if padding_mask_T is not None:
            use_TK = use_TK & padding_mask_T[:, None]
        return RouterOutput(logits_TE, probs_TE, expert_index_TK, gates_TK, use_TK)


def load_balancing_loss(
    router_probs: torch.Tensor, expert_index: torch.Tensor, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch load-balancing loss ``N * sum_i f_i * P_i`` (paper Eqs. 4-6), unweighted (alpha is the caller's).

    ``f_i`` is the fraction of tokens whose top-1 choice is expert i (before capacity, not differentiable) and
    ``P_i`` the mean router probability of expert i (differentiable). Uniform routing gives exactly 1.0.

    Args:
        router_probs: ``[..., T, E]`` softmax probabilities.
        expert_index: ``[..., T]`` top-1 expert per token (int); entries < 0 are ignored like padding.
        padding_mask: optional ``[..., T]`` bool, True for real tokens; padding counts in neither f nor P.

    Returns:
        float32 scalar: the loss of each leading group, averaged over leading dims (routing groups).
    """
    if router_probs.dim() < 2:
        raise ValueError(f"router_probs must be [..., tokens, experts], got shape {tuple(router_probs.shape)}")
    if expert_index.shape != router_probs.shape[:-1]:
        raise ValueError(
            f"expert_index shape {tuple(expert_index.shape)} must equal router_probs.shape[:-1] "
            f"{tuple(router_probs.shape[:-1])}"
        )
    num_experts = router_probs.shape[-1]
    probs = router_probs.float()
    valid = expert_index >= 0
    if padding_mask is not None:
        if padding_mask.shape != expert_index.shape:
            raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} must equal {tuple(expert_index.shape)}")
        valid = valid & padding_mask.bool()
    weight = valid.to(probs.dtype)  # [..., T]
    num_real = weight.sum(-1).clamp(min=1.0)  # [...]
    # f_i: counts of top-1 choices per expert, via scatter_add (a [..., T, E] one-hot is avoided).
    counts = torch.zeros(*expert_index.shape[:-1], num_experts, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(-1, expert_index.clamp(min=0), weight)
    f = counts / num_real[..., None]
    p = (probs * weight[..., None]).sum(-2) / num_real[..., None]
    return (num_experts * (f * p).sum(-1)).mean()


def router_z_loss(router_logits: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss of ST-MoE (Zoph et al. 2022): mean over tokens of ``logsumexp(logits)**2``.

    Args:
        router_logits: ``[..., T, E]``.
        padding_mask: optional ``[..., T]`` bool, True for real tokens.
    """
    z = torch.logsumexp(router_logits.float(), dim=-1) ** 2
    if padding_mask is None:
        return z.mean()
    w = padding_mask.to(z.dtype)
    return (z * w).sum() / w.sum().clamp(min=1.0)
