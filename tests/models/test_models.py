"""Forward-pass behaviour of the encoder-decoder and decoder-only models (tiny configs, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from switchformer.config import is_sparse_block
from switchformer.models import ModelOutput, SwitchDecoderLM, SwitchTransformer, build_model
from switchformer.models.blocks import relative_position_bucket, weighted_aux_loss
from switchformer.models.encoder_decoder import shift_right


def _np_bucket(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """Independent scalar re-derivation of Mesh TensorFlow's _relative_position_bucket."""
    ret = 0
    n = -rel
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            ret += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(np.log(n / max_exact) / np.log(max_distance / max_exact) * (num_buckets - max_exact))
    return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,dist", [(32, 128), (8, 16)])
def test_relative_position_bucket_matches_numpy(bidirectional, buckets, dist):
    rel = torch.arange(-400, 401)
    got = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=dist)
    ref = [_np_bucket(int(r), bidirectional, buckets, dist) for r in rel]
    assert got.tolist() == ref
    assert got.min() >= 0 and got.max() < buckets


def test_sparse_block_convention():
    assert [i for i in range(12) if is_sparse_block(i, 2)] == [1, 3, 5, 7, 9, 11]
    assert [i for i in range(12) if is_sparse_block(i, 4)] == [1, 5, 9]  # transformers, not flaxformer (3, 7, 11)
    assert all(is_sparse_block(i, 1) for i in range(3))  # transformers#28564
    assert not any(is_sparse_block(i, 0) for i in range(3))
    assert is_sparse_block(1, 5) and not is_sparse_block(0, 5)


def test_shapes_and_router_names(make_cfg):
    cfg = make_cfg(num_layers=3, num_decoder_layers=4)
    model = build_model(cfg)
    assert isinstance(model, SwitchTransformer)
    ids, labels = torch.randint(2, 64, (2, 7)), torch.randint(2, 64, (2, 5))
    out = model(ids, labels=labels)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 5, 64) and out.encoder_last_hidden_state.shape == (2, 7, 32)
    assert [r.name for r in out.router] == ["encoder.block.1", "decoder.block.1", "decoder.block.3"]
    for r in out.router:
        assert r.tokens_per_expert.shape == (4,) and int(r.tokens_per_expert.sum()) == int(r.num_tokens)
        assert r.router_probs.shape == (int(r.num_tokens), 4)  # no padding in this batch
        torch.testing.assert_close(r.router_probs.sum(-1), torch.ones(int(r.num_tokens)))
        assert int(r.dropped_tokens) == 0  # dropless config
    assert int(out.router[0].num_tokens) == 14 and int(out.router[1].num_tokens) == 10
    out.loss.backward()
    assert model.shared.weight.grad is not None
    assert model.encoder.block[1].layer[1].mlp.router.weight.grad is not None
    # key layout the checkpoint adapter relies on
    keys = set(model.state_dict())
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in keys
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in keys
    assert "decoder.block.2.layer.1.EncDecAttention.q.weight" in keys and "lm_head.weight" not in keys
    assert "decoder.block.1.layer.2.mlp.experts.w_in" in keys and "decoder.block.0.layer.2.mlp.wi.weight" in keys


def test_dense_model_has_no_router(make_cfg):
    model = build_model(make_cfg(encoder_sparse_step=0, decoder_sparse_step=0))
    out = model(torch.randint(2, 64, (2, 5)), labels=torch.randint(2, 64, (2, 3)))
    assert out.router == [] and float(out.aux_loss) == 0.0
    assert torch.equal(out.loss, out.lm_loss)
    assert not any("router" in k or "experts" in k for k in model.state_dict())


def test_aux_loss_composition(make_cfg):
    cfg = make_cfg(aux_loss_coef=0.01, z_loss_coef=0.003, num_layers=4, num_decoder_layers=4)
    model = build_model(cfg)
    labels = torch.randint(2, 64, (3, 6))
    with torch.no_grad():
        out = model(torch.randint(2, 64, (3, 8)), labels=labels)
    assert len(out.router) == 4
    lb = np.mean([r.load_balancing_loss.item() for r in out.router])
    z = np.mean([r.router_z_loss.item() for r in out.router])
    assert math.isclose(float(out.aux_loss), 0.01 * lb + 0.003 * z, rel_tol=1e-5)
    assert math.isclose(float(out.loss), float(out.lm_loss) + float(out.aux_loss), rel_tol=1e-6)
    # lm_loss is the mean token cross-entropy (independent recomputation with numpy)
    logits = out.logits.double().numpy()
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    nll = -np.take_along_axis(logp, labels.numpy()[..., None], -1).mean()
    assert math.isclose(float(out.lm_loss), nll, rel_tol=1e-5)
    assert float(weighted_aux_loss([], cfg, "cpu")) == 0.0


def test_labels_shift_and_ignore(make_cfg):
    labels = torch.tensor([[5, 6, 7, -100], [8, -100, -100, -100]])
    assert shift_right(labels, 0, 0).tolist() == [[0, 5, 6, 7], [0, 8, 0, 0]]
    model = build_model(make_cfg()).eval()
    ids = torch.randint(2, 64, (2, 6))
    out = model(ids, labels=labels)
    ref = model(ids, decoder_input_ids=shift_right(labels, 0, 0))
    real = labels != -100  # -100 positions are not routed (zero Switch output), so only real positions agree
    torch.testing.assert_close(out.logits[real], ref.logits[real])
    # -100 positions are ignored in the loss and are not routed
    ce = torch.nn.functional.cross_entropy(ref.logits[labels != -100], labels[labels != -100])
    torch.testing.assert_close(out.lm_loss, ce)
    assert int(out.router[-1].num_tokens) == 4


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_causal_decoder(make_cfg, arch):
    """Changing a future decoder token must not change earlier logits."""
    model = build_model(make_cfg(arch=arch)).eval()
    ids = torch.randint(2, 64, (2, 9))
    dec = torch.randint(2, 64, (2, 9))
    dec2 = dec.clone()
    dec2[:, 6] = (dec[:, 6] + 1) % 64
    run = (lambda d: model(ids, decoder_input_ids=d).logits) if arch == "encoder_decoder" else (
        lambda d: model(d).logits)
    a, b = run(dec), run(dec2)
    # equal up to float reassociation (expert grouping of the other tokens changes the matmul blocking)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=1e-5, atol=1e-5)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_encoder_is_bidirectional(make_cfg):
    model = build_model(make_cfg()).eval()
    ids = torch.randint(2, 64, (1, 8))
    ids2 = ids.clone()
    ids2[0, 7] = (ids[0, 7] + 1) % 64
    h1, _ = model.encode(ids)
    h2, _ = model.encode(ids2)
    assert not torch.allclose(h1[:, 0], h2[:, 0])


def test_padding_rows_match_unpadded_encoder_decoder(make_cfg):
    model = build_model(make_cfg()).eval()
    ids = torch.randint(2, 64, (1, 5))
    dec = torch.randint(2, 64, (1, 4))
    alone = model(ids, decoder_input_ids=dec)
    # batch: the same row right-padded to 9 tokens next to another, longer row
    batch = torch.cat([torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1), torch.randint(2, 64, (1, 9))])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 5:] = 0
    dec_batch = torch.cat([dec, torch.randint(2, 64, (1, 4))])
    out = model(batch, attention_mask=mask, decoder_input_ids=dec_batch)
    torch.testing.assert_close(out.logits[0], alone.logits[0], rtol=1e-5, atol=1e-5)
    assert int(out.router[0].num_tokens) == 5 + 9  # padding is not routed


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_rows_match_unpadded_decoder_only(make_cfg, side):
    model = build_model(make_cfg(arch="decoder_only")).eval()
    ids = torch.randint(2, 64, (1, 5))
    alone = model(ids).logits[0]
    pad = torch.zeros(1, 3, dtype=torch.long)
    row = torch.cat([pad, ids], 1) if side == "left" else torch.cat([ids, pad], 1)
    mask = (torch.arange(8) >= 3) if side == "left" else (torch.arange(8) < 5)
    batch = torch.cat([row, torch.randint(2, 64, (1, 8))])
    masks = torch.stack([mask, torch.ones(8, dtype=torch.bool)]).long()
    logits = model(batch, attention_mask=masks).logits[0]
    real = logits[3:] if side == "left" else logits[:5]
    torch.testing.assert_close(real, alone, rtol=1e-5, atol=1e-5)


def test_decoder_only_loss_and_layout(make_cfg):
    model = build_model(make_cfg(arch="decoder_only", num_layers=3, decoder_sparse_step=1))
    assert isinstance(model, SwitchDecoderLM)
    ids = torch.randint(2, 64, (2, 6))
    out = model(ids, labels=ids)
    assert [r.name for r in out.router] == [f"decoder.block.{i}" for i in range(3)]
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ce)
    keys = set(model.state_dict())
    assert "decoder.block.0.layer.1.mlp.router.weight" in keys and "decoder.block.0.layer.1.layer_norm.weight" in keys
    assert not any(k.startswith("encoder") for k in keys)


def test_switch_attention_routers(make_cfg):
    model = build_model(make_cfg(switch_attention=True, encoder_sparse_step=0, decoder_sparse_step=0))
    out = model(torch.randint(2, 64, (2, 5)), labels=torch.randint(2, 64, (2, 4)))
    names = [r.name for r in out.router]
    assert "encoder.block.0.layer.0.SelfAttention.q" in names
    assert "decoder.block.1.layer.1.EncDecAttention.v" in names
    assert len(names) == 2 * 3 + 2 * 6
    assert out.aux_loss.item() > 0
    out.loss.backward()
    assert model.encoder.block[0].layer[0].SelfAttention.q.router.weight.grad is not None


def test_routed_linear_matches_per_token_oracle(make_cfg):
    model = build_model(make_cfg(switch_attention=True)).eval()
    lin = model.encoder.block[0].layer[0].SelfAttention.q
    x = torch.randn(3, 5, 32)
    y, res = lin(x)
    probs = torch.softmax(x.reshape(-1, 32) @ lin.router.weight.T, -1)
    gate, idx = probs.max(-1)
    ref = torch.stack([lin.weight[e] @ t for e, t in zip(idx, x.reshape(-1, 32), strict=True)]) * gate[:, None]
    torch.testing.assert_close(y.reshape(-1, 32), ref, rtol=1e-5, atol=1e-5)
    assert res.tokens_per_expert.tolist() == torch.bincount(idx, minlength=4).tolist()


def test_bad_inputs(make_cfg):
    model = build_model(make_cfg())
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.rand(2, 3), decoder_input_ids=torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.ones(3, dtype=torch.long), decoder_input_ids=torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="decoder_input_ids or labels"):
        model(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4), labels=torch.ones(2, 2).long())
    with pytest.raises(ValueError, match="arch"):
        SwitchDecoderLM(make_cfg())
    with pytest.raises(TypeError, match="ModelConfig"):
        build_model({"arch": "decoder_only"})


def test_init_scale(make_cfg):
    cfg = make_cfg(d_model=256, d_ff=512, num_heads=8, d_kv=32, init_scale=0.1, vocab_size=512)
    model = build_model(cfg)
    q = model.encoder.block[0].layer[0].SelfAttention.q.weight
    wo = model.encoder.block[0].layer[1].mlp.wo.weight
    # truncated at 2 std: the std shrinks by a factor 0.8796 (standard truncated-normal result)
    assert math.isclose(q.std().item(), math.sqrt(0.1 / 256) * 0.8796, rel_tol=0.03)
    assert math.isclose(wo.std().item(), math.sqrt(0.1 / 512) * 0.8796, rel_tol=0.03)
    assert math.isclose(model.shared.weight.std().item(), 1.0, rel_tol=0.05)


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_save_and_from_pretrained_round_trip(make_cfg, arch, tmp_path):
    import warnings

    import switchformer

    model = build_model(make_cfg(arch=arch)).eval()
    with warnings.catch_warnings():  # the adapter warns that transformers routes with a fixed capacity
        warnings.simplefilter("ignore", UserWarning)
        switchformer.save_pretrained(model, tmp_path / "ckpt")
    loaded = switchformer.from_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    ids = torch.randint(2, 64, (2, 5))
    kw = {"decoder_input_ids": ids[:, :3]} if arch == "encoder_decoder" else {}
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, **kw).logits, model(ids, **kw).logits, rtol=0, atol=0)
    again = switchformer.from_pretrained(tmp_path / "ckpt")
    assert set(again.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_all_ones_mask_equals_no_mask(make_cfg, arch):
    """A mask without padding is dropped (blocks.drop_full_mask): same logits, losses and router results as None."""
    model = build_model(make_cfg(arch=arch)).eval()
    ids = torch.randint(2, 64, (3, 7))
    kw = {"decoder_input_ids": ids[:, :5]} if arch == "encoder_decoder" else {}
    with torch.no_grad():
        a = model(ids, attention_mask=torch.ones_like(ids), labels=ids[:, :5] if kw else ids, **kw)
        b = model(ids, labels=ids[:, :5] if kw else ids, **kw)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    for ra, rb in zip(a.router, b.router, strict=True):
        assert torch.equal(ra.expert_index, rb.expert_index)
        assert torch.equal(ra.tokens_per_expert, rb.tokens_per_expert)
