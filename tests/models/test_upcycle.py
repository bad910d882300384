"""Sparse upcycling: experts are copies of the dense FFN; outputs agree up to the router gate."""

from __future__ import annotations

import pytest
import torch

from switchformer.models import build_model
from switchformer.models.upcycle import upcycle


@pytest.mark.parametrize("arch,proj", [("encoder_decoder", "relu"), ("decoder_only", "gated-gelu")])
def test_single_expert_upcycle_is_exact(make_cfg, arch, proj):
    dense = build_model(make_cfg(arch=arch, feed_forward_proj=proj, encoder_sparse_step=0, decoder_sparse_step=0))
    dense.eval()
    sparse = upcycle(dense, num_experts=1).eval()  # gate = softmax over one logit = 1 exactly
    assert len([m for m in sparse.modules() if type(m).__name__ == "SwitchFFN"]) > 0
    ids = torch.randint(2, 64, (2, 6))
    kw = {"decoder_input_ids": torch.randint(2, 64, (2, 4))} if arch == "encoder_decoder" else {}
    with torch.no_grad():
        a, b = dense(ids, **kw), sparse(ids, **kw)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    assert b.router and all(int(r.dropped_tokens) == 0 for r in b.router)


def test_upcycled_experts_are_copies_and_output_is_gate_times_dense(make_cfg):
    dense = build_model(make_cfg(encoder_sparse_step=0, decoder_sparse_step=0)).eval()
    sparse = upcycle(dense, num_experts=4).eval()
    d_ffn = dense.encoder.block[1].layer[1].mlp
    s_ffn = sparse.encoder.block[1].layer[1].mlp
    for e in range(4):
        assert torch.equal(s_ffn.experts.w_in[e], d_ffn.wi.weight)
        assert torch.equal(s_ffn.experts.w_out[e], d_ffn.wo.weight)
    # non-FFN weights and still-dense blocks are copied
    assert torch.equal(sparse.shared.weight, dense.shared.weight)
    assert torch.equal(sparse.encoder.block[0].layer[1].mlp.wi.weight, dense.encoder.block[0].layer[1].mlp.wi.weight)
    # layer level: the Switch output is p_max(x) * FFN(x) (Eq. 2 gate), every token
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        y, aux = s_ffn(x)
        gate = aux.router_probs.max(-1).values.view(2, 5, 1)
        torch.testing.assert_close(y, gate * d_ffn(x), rtol=1e-5, atol=1e-6)
    # the router is fresh (not all zeros) and small
    w = s_ffn.router.weight
    assert w.abs().max() > 0 and w.std() < 0.1


def test_zero_router_and_errors(make_cfg):
    dense = build_model(make_cfg(encoder_sparse_step=0, decoder_sparse_step=0)).eval()
    sparse = upcycle(dense, num_experts=4, router_init_scale=0.0, decoder_sparse_step=1).eval()
    assert sparse.config.decoder_sparse_step == 1 and sparse.config.moe.num_experts == 4
    assert sparse.decoder.block[0].layer[2].mlp.router.weight.abs().sum().item() == 0.0
    x = torch.randn(3, 32)
    with torch.no_grad():
        y, _ = sparse.decoder.block[0].layer[2].mlp(x)
        torch.testing.assert_close(y, dense.decoder.block[0].layer[2].mlp(x) / 4, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="num_experts"):
        upcycle(dense, num_experts=0)
