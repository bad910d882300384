"""Sparse upcycling (Komatsuzaki et al. 2022): turn a trained dense model into a Switch model.

    dense = build_model(dense_cfg)            # encoder_sparse_step = decoder_sparse_step = 0, trained
    switch = upcycle(dense, num_experts=8)    # every other FFN becomes a SwitchFFN whose experts are copies

Every weight of the dense model is copied; the FFN of each block that becomes sparse is copied into *every* expert of
that block's SwitchFFN, and the router is freshly initialised (small random, the paper's truncated normal with
``init_scale``), so at the start all experts agree and training lets them diverge.

Exactness note: a Switch layer scales the chosen expert's output by its router probability (Eq. 2), so right after
upcycling a sparse block outputs ``p_max(x) * FFN(x)``, not ``FFN(x)``: with a near-uniform router that is about
``FFN(x) / E``. Only with one expert (p = 1) is the upcycled model exactly the dense one (tests check both facts).
Pass ``router_init_scale=0`` for an all-zero router (p = 1/E for every token; top-1 ties go to expert 0).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from switchformer.config import MoEConfig, is_sparse_block
from switchformer.models.build import build_model


def upcycle(
    dense_model: nn.Module,
    num_experts: int,
    *,
    encoder_sparse_step: int = 2,
    decoder_sparse_step: int = 2,
    moe: MoEConfig | None = None,
    router_init_scale: float | None = None,
) -> nn.Module:
    """Build a Switch model from a dense one, copying each replaced dense FFN into every expert.

    Args:
        dense_model: a ``SwitchTransformer`` / ``SwitchDecoderLM``; blocks that are already sparse are copied as
            they are (their experts are kept), dense blocks that the new steps make sparse are upcycled.
        num_experts: experts per new sparse layer.
        encoder_sparse_step, decoder_sparse_step: sparsity of the result (transformers' convention; for a
            decoder-only model only ``decoder_sparse_step`` matters).
        moe: router/capacity settings (default: the dense model's ``cfg.moe`` with ``num_experts`` replaced).
        router_init_scale: router init scale (truncated normal std sqrt(scale / d_model)); None uses the model's
            ``init_scale``; 0 gives a zero router.

    Returns:
        A new model on the dense model's device and dtype.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    cfg = dense_model.config
    moe = dataclasses.replace(moe if moe is not None else cfg.moe, num_experts=num_experts)
    new_cfg = dataclasses.replace(
        cfg, moe=moe, encoder_sparse_step=encoder_sparse_step, decoder_sparse_step=decoder_sparse_step
    )
    ref = dense_model.shared.weight
    with torch.device(ref.device):
        model = build_model(new_cfg).to(ref.dtype)

    dense_state = dense_model.state_dict()
    new_state = model.state_dict()
    copied = {}
    for key, value in new_state.items():
        if key in dense_state and dense_state[key].shape == value.shape:
            copied[key] = dense_state[key]
    stacks = [("decoder", cfg.num_layers if cfg.arch == "decoder_only" else cfg.num_decoder_layers)]
    if cfg.arch == "encoder_decoder":
        stacks.insert(0, ("encoder", cfg.num_layers))
    for stack, num_layers in stacks:
        new_step = encoder_sparse_step if stack == "encoder" else decoder_sparse_step
        ff = 1 if stack == "encoder" or cfg.arch == "decoder_only" else 2
        for i in range(num_layers):
            prefix = f"{stack}.block.{i}.layer.{ff}.mlp."
            if not is_sparse_block(i, new_step) or f"{prefix}wo.weight" not in dense_state:
                continue  # stays dense (copied above) or was already sparse
            w_out = dense_state[f"{prefix}wo.weight"]
            copied[f"{prefix}experts.w_out"] = w_out.unsqueeze(0).expand(num_experts, *w_out.shape)
            if cfg.feed_forward_proj == "gated-gelu":
                w_in, w_gate = dense_state[f"{prefix}wi_1.weight"], dense_state[f"{prefix}wi_0.weight"]
                copied[f"{prefix}experts.w_gate"] = w_gate.unsqueeze(0).expand(num_experts, *w_gate.shape)
            else:
                w_in = dense_state[f"{prefix}wi.weight"]
            copied[f"{prefix}experts.w_in"] = w_in.unsqueeze(0).expand(num_experts, *w_in.shape)
            router_key = f"{prefix}router.weight"
            if router_init_scale is not None:
                router = torch.empty_like(new_state[router_key])
                if router_init_scale > 0:
                    std = (router_init_scale / cfg.d_model) ** 0.5
                    nn.init.trunc_normal_(router, std=std, a=-2 * std, b=2 * std)
                else:
                    router.zero_()
                copied[router_key] = router
    missing = [k for k in new_state if k not in copied and not k.endswith("router.weight")]
    if missing:
        raise ValueError(f"upcycle could not fill {missing[:5]}...; the dense model's config does not match it")
    model.load_state_dict(copied, strict=False)
    model.train(dense_model.training)
    return model
