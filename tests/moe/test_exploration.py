"""Exploration and second-expert policies of the router (paper App. C, Table 11; Mesh TensorFlow's top-2 'random'
second policy): checked against direct computation and, for the random policy, against its expected rate."""

import math

import torch
import torch.nn.functional as F

from switchformer.moe import Router, SwitchFFN


def test_input_dropout_perturbs_only_the_routers_copy_in_training():
    torch.manual_seed(0)
    layer = SwitchFFN(16, 32, 4, capacity_factor=None, exploration="input_dropout", router_input_dropout=0.5)
    x = torch.randn(64, 16)
    x_before = x.clone()
    w = layer.router.weight.detach()

    torch.manual_seed(1)
    y, aux = layer(x)
    torch.manual_seed(1)  # the same draw: the router saw dropout(x) with rate 0.5
    torch.testing.assert_close(aux.router_logits, F.linear(F.dropout(x, 0.5, training=True), w))
    assert not torch.allclose(aux.router_logits, F.linear(x, w))
    assert torch.equal(x, x_before)
    # the experts got the undropped tokens: y = p_e(x) * expert_e(x) with the router's choice e
    ex = layer.experts
    e = aux.expert_index
    y_ref = torch.stack([F.linear(F.relu(F.linear(x[t], ex.w_in[e[t]])), ex.w_out[e[t]]) for t in range(64)])
    y_ref = y_ref * aux.router_probs.gather(-1, e[:, None])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)

    layer.eval()  # no dropout outside training
    _, aux_eval = layer(x)
    torch.testing.assert_close(aux_eval.router_logits, F.linear(x, w))


def test_second_expert_threshold_uses_the_second_choice_at_rate_g2_over_threshold():
    torch.manual_seed(0)
    threshold = 0.4
    router = Router(8, 4, top_k=2, exploration="argmax", second_expert_threshold=threshold).train()
    torch.nn.init.normal_(router.weight, std=0.7)
    out = router(torch.randn(40000, 8))
    g2 = out.gates_TK[:, 1]  # renormalised: p2 / (p1 + p2), at most 0.5
    keep_prob = (g2 / threshold).clamp(max=1.0)
    used = out.use_TK[:, 1].float()
    assert out.use_TK[:, 0].all()  # first choices are always used
    assert used[keep_prob == 1.0].all()  # g2 >= threshold: always used
    # Overall and per bin of the keep probability, the rate is its expectation (within 4 standard deviations).
    for lo, hi in [(0.0, 1.0), (0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 0.999)]:
        sel = (keep_prob >= lo) & (keep_prob < hi)
        n = int(sel.sum())
        assert n > 500, (lo, hi, n)
        expected = keep_prob[sel].mean().item()
        sd = math.sqrt((keep_prob[sel] * (1 - keep_prob[sel])).sum().item()) / n
        assert abs(used[sel].mean().item() - expected) < 4 * sd + 1e-3, (lo, hi, used[sel].mean().item(), expected)

    router.eval()  # training only
    assert router(torch.randn(100, 8)).use_TK.all()
    router.train()
    router.second_expert_threshold = 0.0  # 0 always uses the second choice
    assert router(torch.randn(100, 8)).use_TK.all()


def test_unused_second_choices_are_not_dispatched():
    torch.manual_seed(0)
    layer = SwitchFFN(8, 16, 4, capacity_factor=None, top_k=2, exploration="argmax", second_expert_threshold=1.0)
    x = torch.randn(500, 8)
    torch.manual_seed(3)
    y, aux = layer(x)
    torch.manual_seed(3)
    routed = layer.router(x)  # the same draw of the random policy
    dropped = ~routed.use_TK[:, 1]
    assert 0 < int(dropped.sum()) < 500  # g2 <= 0.5 < threshold 1: some second choices go
    assert (aux.expert_index[dropped, 1] == -1).all() and (aux.expert_index[~dropped, 1] >= 0).all()
    assert int(aux.tokens_per_expert.sum()) == 500 + int((~dropped).sum())
