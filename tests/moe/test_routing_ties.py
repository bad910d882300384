"""Exact ties between router probabilities go to the lowest expert index wherever experts are ranked, as
transformers' router (``argmax``) and jax's ``top_k`` (Mesh TensorFlow, flaxformer) do."""

import pytest
import torch
from transformers import SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersTop1Router

from switchformer.moe import Router, SwitchFFN
from switchformer.moe.router import top_k_lowest_index


def test_top_k_lowest_index_on_exact_ties():
    values = torch.tensor([[0.1, 0.3, 0.3, 0.0, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    assert top_k_lowest_index(values, 1)[1].tolist() == [[1], [0]]
    assert top_k_lowest_index(values, 3)[1].tolist() == [[1, 2, 4], [0, 1, 2]]
    v, i = top_k_lowest_index(values, 4)
    torch.testing.assert_close(v, values.gather(-1, i))
    # the same set of values as torch.topk, in descending order
    torch.testing.assert_close(v, values.topk(4).values)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_zero_router_sends_every_token_to_the_lowest_experts(top_k):
    router = Router(16, 8, top_k=top_k, exploration="argmax")
    torch.nn.init.zeros_(router.weight)  # every probability is exactly 1/8
    out = router(torch.randn(50, 16))
    assert out.expert_index_TK.tolist() == [list(range(top_k))] * 50


def test_duplicated_router_rows_tie_to_the_lower_row():
    torch.manual_seed(0)
    router = Router(16, 8, top_k=2, exploration="argmax")
    torch.nn.init.normal_(router.weight)
    router.weight.data[5] = router.weight.data[2]  # experts 2 and 5: bitwise equal probabilities
    x = 10 * router.weight.data[2] + 0.01 * torch.randn(40, 16)  # makes 2 (= 5) the largest for every token
    out = router(x)
    assert torch.equal(out.probs_TE[:, 2], out.probs_TE[:, 5])
    assert out.expert_index_TK.tolist() == [[2, 5]] * 40


def test_sample_exploration_ranks_later_choices_lowest_index_first():
    torch.manual_seed(0)
    router = Router(16, 6, top_k=3, exploration="sample").train()
    torch.nn.init.zeros_(router.weight)
    out = router(torch.randn(200, 16))
    first = out.expert_index_TK[:, 0]
    assert len(set(first.tolist())) > 1  # the first choice is sampled
    for f, rest in zip(first.tolist(), out.expert_index_TK[:, 1:].tolist(), strict=True):
        assert rest == [e for e in range(6) if e != f][:2]


def test_no_token_left_behind_fallbacks_rank_ties_lowest_index_first():
    layer = SwitchFFN(8, 16, 4, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0,
                      no_token_left_behind=True, ntlb_top_k=4).eval()
    torch.nn.init.zeros_(layer.router.weight)  # all first choices expert 0; fallbacks 1, 2, 3 in that order
    _, aux = layer(torch.randn(16, 8))
    assert aux.capacity == 4
    assert aux.expert_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


def test_decode_fast_path_breaks_ties_like_the_layer():
    from switchformer.moe import switch_ffn_decode

    torch.manual_seed(0)
    layer = SwitchFFN(8, 16, 4, capacity_factor=None, eval_capacity_factor=None).eval()
    layer.router.weight.data[3] = layer.router.weight.data[1]
    x = (10 * layer.router.weight.data[1] + 0.01 * torch.randn(2, 3, 8)).detach()
    with torch.no_grad():
        y, aux = layer(x)
        assert (aux.expert_index == 1).all()
        for method in ("loop", "gather"):
            torch.testing.assert_close(switch_ffn_decode(layer, x, None, method=method), y, rtol=1e-5, atol=1e-6)


def test_bfloat16_router_matches_transformers_argmax_on_2048_tokens():
    """A bfloat16 router has exact ties among its probabilities (tens in 2048 tokens here); every token must
    choose the expert that transformers' ``SwitchTransformersTop1Router`` chooses."""
    torch.manual_seed(0)
    d_model, num_experts, tokens = 512, 8, 2048
    cfg = SwitchTransformersConfig(num_experts=num_experts, d_model=d_model, hidden_size=d_model,
                                   expert_capacity=tokens, router_dtype="bfloat16", router_jitter_noise=0.0)
    hf = SwitchTransformersTop1Router(cfg).eval()
    layer = SwitchFFN(d_model, 64, num_experts, capacity_factor=None, eval_capacity_factor=None,
                      router_dtype="bfloat16").eval()
    hf.classifier.weight.data.copy_(layer.router.weight.data)
    x = torch.randn(1, tokens, d_model)
    with torch.no_grad():
        hf_index = hf(x)[0][0].argmax(-1)
        routed = layer.router(x[0])
        _, aux = layer(x)
    top2 = routed.probs_TE.sort(-1, descending=True).values[:, :2]
    assert (top2[:, 0] == top2[:, 1]).sum() >= 10  # the case under test does occur
    assert torch.equal(routed.expert_index_TK[:, 0], hf_index)
    assert torch.equal(aux.expert_index, hf_index)
