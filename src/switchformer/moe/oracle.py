"""The paper's one-hot einsum formulation of Switch dispatch (Fig. 15/16; Mesh TensorFlow), as a test oracle.

It builds ``dispatch`` and ``combine`` tensors of shape ``[G, S, E, C]``, whose size grows with the group size
S, so it is only for small checks: the fast path in ``dispatch.py`` must equal it in values and gradients.
It shares nothing with the fast path but the router's decisions: positions come from a cumsum over one-hot masks
in priority order, exactly as the paper's pseudocode.

Shape suffixes: G groups, S tokens per group, K choices, E experts, C capacity, M d_model, F d_ff.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def einsum_switch_reference(
    x_GSM: torch.Tensor,
    expert_index_GSK: torch.Tensor,
    gates_GSK: torch.Tensor,
    use_GSK: torch.Tensor,
    capacity: int | None,
    w_in_EFM: torch.Tensor,
    w_out_EMF: torch.Tensor,
    w_gate_EFM: torch.Tensor | None = None,
    priority_GS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch / top-k MoE output by one-hot dispatch and combine einsums.

    Args:
        x_GSM: tokens grouped ``[G, S, M]``.
        expert_index_GSK, gates_GSK, use_GSK: router choices, gates and usable flags.
        capacity: C per expert and group; None = dropless (C = S * K).
        w_in_EFM, w_out_EMF, w_gate_EFM: expert weights (relu when ``w_gate_EFM`` is None, else gated gelu).
        priority_GS: optional order in which tokens claim slots (rank within group); default token order.

    Returns:
        ``(y_GSM, kept_GSK)``: the layer output and which choices were kept.
    """
    G, S, K = expert_index_GSK.shape
    E = w_in_EFM.shape[0]
    C = S * K if capacity is None else capacity
    if priority_GS is not None:  # visit tokens in priority order, then undo the permutation
        perm = torch.argsort(priority_GS, dim=1)
        take = lambda t: torch.gather(t, 1, perm.view(G, S, *[1] * (t.dim() - 2)).expand_as(t))  # noqa: E731
        y, kept = einsum_switch_reference(
            take(x_GSM), take(expert_index_GSK), take(gates_GSK), take(use_GSK), capacity, w_in_EFM, w_out_EMF,
            w_gate_EFM,
        )
        inv = torch.argsort(perm, dim=1)
        untake = lambda t: torch.gather(t, 1, inv.view(G, S, *[1] * (t.dim() - 2)).expand_as(t))  # noqa: E731
        return untake(y), untake(kept)
    dispatch = x_GSM.new_zeros(G, S, E, C)
    combine = x_GSM.new_zeros(G, S, E, C)
    filled_GE = torch.zeros(G, E, dtype=x_GSM.dtype, device=x_GSM.device)
    kept = torch.zeros(G, S, K, dtype=torch.bool, device=x_GSM.device)
    for k in range(K):  # first choices claim slots before second choices (Mesh TensorFlow top-2)
        mask_GSE = F.one_hot(expert_index_GSK[..., k], E).to(x_GSM.dtype) * use_GSK[..., k, None].to(x_GSM.dtype)
        position_GSE = (torch.cumsum(mask_GSE, dim=1) - 1 + filled_GE[:, None, :]) * mask_GSE
        mask_GSE = mask_GSE * (position_GSE < C).to(x_GSM.dtype)
        filled_GE = filled_GE + mask_GSE.sum(1)
        slot_GSEC = F.one_hot(position_GSE.long().clamp(0, C - 1), C).to(x_GSM.dtype) * mask_GSE[..., None]
        dispatch = dispatch + slot_GSEC
        combine = combine + gates_GSK[..., k, None, None].to(x_GSM.dtype) * slot_GSEC
        kept[..., k] = mask_GSE.sum(-1) > 0
    expert_in_EGCM = torch.einsum("gsec,gsm->egcm", dispatch, x_GSM)
    if w_gate_EFM is None:
        h = F.relu(torch.einsum("egcm,efm->egcf", expert_in_EGCM, w_in_EFM))
    else:
        gate = F.gelu(torch.einsum("egcm,efm->egcf", expert_in_EGCM, w_gate_EFM), approximate="tanh")
        h = gate * torch.einsum("egcm,efm->egcf", expert_in_EGCM, w_in_EFM)
    expert_out_EGCM = torch.einsum("egcf,emf->egcm", h, w_out_EMF)
    return torch.einsum("gsec,egcm->gsm", combine, expert_out_EGCM), kept
