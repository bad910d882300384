"""Parity with transformers 5.24's SwitchTransformersForConditionalGeneration, both directions.

What is compared, and why (see docs/checkpoints.md "Differences"):
- logits (atol 1e-5, rtol 1.3e-6) and LM cross-entropy (atol 1e-5), eval mode, float32, including with a capacity
  that drops tokens (transformers 5.24 enforces the per-sequence capacity in token order and gives dropped tokens
  zero output, like us);
- per-token routing decisions: transformers' raw router logits -> argmax -> per-sequence cumsum capacity, against our
  ``MoEAux.expert_index`` (-1 = dropped);
- router losses: per sparse layer they equal transformers' per-stack losses when a stack has one sparse layer; the
  totals differ by design (transformers sums encoder + decoder losses of concatenated layers, we average per layer);
- greedy generation tokens (our ``dropless=False`` keeps the encoder's capacity, like transformers' generate).
"""

from __future__ import annotations

import json

import pytest
import torch
from interop_tiny import tiny_hf_model

import switchformer
from switchformer import interop as H
from switchformer.config import ModelConfig, MoEConfig
from switchformer.models import build_model

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
# Logits also get a relative tolerance: torch's float32 default (about 11 ulps). Untied heads skip the d_model**-0.5
# output scaling, so their logits are ~sqrt(d_model) larger and differ by a few ulps above ATOL alone.
RTOL = 1.3e-6


def _batch(seed: int = 1, B: int = 3, S: int = 17, T: int = 9, pad_from: int | None = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 99, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if pad_from is not None:  # right padding on the last row (transformers routes padding, we do not: see docs)
        mask[-1, pad_from:] = 0
        ids[-1, pad_from:] = 0
    labels = torch.randint(2, 99, (B, T), generator=g)
    return ids, mask, labels


def _expected_routing(logits_BSE: torch.Tensor, capacity: int) -> torch.Tensor:
    """transformers' Top1Router decision, restated: argmax, then per-sequence token-order capacity."""
    onehot = torch.nn.functional.one_hot(logits_BSE.argmax(-1), logits_BSE.shape[-1])
    keep = (onehot.cumsum(dim=1) <= capacity) & onehot.bool()
    return torch.where(keep.any(-1), logits_BSE.argmax(-1), -1)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("step2-drops", dict(expert_capacity=3)),
        ("step1-nodrop", dict(num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, expert_capacity=64)),
        ("untied-drops", dict(expert_capacity=2, tie_word_embeddings=False)),
    ],
)
def test_logits_loss_and_routing_match_transformers(hf_dir, name, overrides):
    hf_model, d = hf_dir(seed=3, **overrides)
    if not hf_model.config.tie_word_embeddings:
        # transformers 5.x unties every embedding; we share one input embedding, so give it equal copies.
        with torch.no_grad():
            hf_model.encoder.embed_tokens.weight.copy_(hf_model.shared.weight)
            hf_model.decoder.embed_tokens.weight.copy_(hf_model.shared.weight)
        hf_model.save_pretrained(d)
    ours = switchformer.from_pretrained(d)
    assert not ours.training and ours.config.moe.expert_capacity == overrides["expert_capacity"]
    ids, mask, labels = _batch()
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        out = ours(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=RTOL)
    ce = torch.nn.functional.cross_entropy(ref.logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out.lm_loss, ce, atol=ATOL, rtol=0)

    # Routing decisions, real tokens only.
    cap = overrides["expert_capacity"]
    enc_routers = [r for r in out.router if r.name.startswith("encoder")]
    dec_routers = [r for r in out.router if r.name.startswith("decoder")]
    assert len(enc_routers) == len(ref.encoder_router_logits) and len(dec_routers) == len(ref.decoder_router_logits)
    real = mask.bool().flatten()
    dropped = 0
    for r, logits in zip(enc_routers, ref.encoder_router_logits, strict=True):
        expect = _expected_routing(logits, cap).flatten()
        assert torch.equal(r.expert_index[real], expect[real]), r.name
        dropped += int(r.dropped_tokens)
    for r, logits in zip(dec_routers, ref.decoder_router_logits, strict=True):
        assert torch.equal(r.expert_index, _expected_routing(logits, cap).flatten()), r.name
        dropped += int(r.dropped_tokens)
    assert (dropped > 0) == (cap < 8), f"{name}: the capacity should {'' if cap < 8 else 'not '}drop tokens"


def test_router_losses_per_layer_match_transformers(hf_dir):
    """One sparse layer per stack and no padding: transformers' per-stack losses are our per-layer losses."""
    hf_model, d = hf_dir(seed=5, expert_capacity=3)
    ours = switchformer.from_pretrained(d)
    ids, mask, labels = _batch(seed=2, pad_from=None)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, labels=labels, output_router_logits=True)
        out = ours(ids, labels=labels)
    enc, dec = [r for r in out.router if r.name in ("encoder.block.1", "decoder.block.1")]
    for mine, theirs in ((enc.load_balancing_loss, ref.encoder_aux_loss), (enc.router_z_loss, ref.encoder_z_loss),
                         (dec.load_balancing_loss, ref.decoder_aux_loss), (dec.router_z_loss, ref.decoder_z_loss)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    # Totals: transformers adds coef * (encoder + decoder); we add coef * mean over layers (documented difference).
    cfg = ours.config
    hf_total = out.lm_loss + cfg.aux_loss_coef * (enc.load_balancing_loss + dec.load_balancing_loss) \
        + cfg.z_loss_coef * (enc.router_z_loss + dec.router_z_loss)
    torch.testing.assert_close(hf_total, ref.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss, atol=0, rtol=0)
    torch.testing.assert_close(out.aux_loss, hf_total / 2 - out.lm_loss / 2, atol=ATOL, rtol=0)


@pytest.mark.parametrize("seed, capacity", [(0, 3), (1, 64)])
def test_greedy_generation_matches_transformers(hf_dir, seed, capacity):
    hf_model, d = hf_dir(seed=seed, expert_capacity=capacity)
    ours = switchformer.from_pretrained(d)
    ids, mask, _ = _batch(seed=1)
    ref = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=ours.config.eos_token_id,
                        dropless=False)
    assert got.shape == ref.shape and torch.equal(got, ref), (got, ref)
    assert len(set(got[:, 1:].flatten().tolist())) > 3  # not a degenerate constant output


def _hf_load(d):
    model, info = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        d, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_save_pretrained_loads_in_transformers(tmp_path, hf_dir, shard):
    hf_model, d = hf_dir(seed=2, expert_capacity=3, num_layers=3, num_sparse_encoder_layers=1)
    ours = switchformer.from_pretrained(d)
    out_dir = tmp_path / "ours"
    H.save_pretrained(ours, out_dir, **({} if shard is None else {"max_shard_size": shard}))
    if shard is not None:
        assert (out_dir / H.INDEX_NAME).is_file() and len(list(out_dir.glob("model-*.safetensors"))) > 2
    back = _hf_load(out_dir)
    ids, mask, labels = _batch()
    with torch.no_grad():
        a = back(input_ids=ids, attention_mask=mask, labels=labels).logits
        b = ours(ids, attention_mask=mask, labels=labels).logits
        c = hf_model(input_ids=ids, attention_mask=mask, labels=labels).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(a, c, atol=ATOL, rtol=RTOL)
    ref_sd = hf_model.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in back.state_dict().items())  # bit for bit
    again = switchformer.from_pretrained(out_dir)
    assert again.config == ours.config


def test_native_switchformer_model_round_trips_through_transformers(tmp_path):
    """A model born in switchformer (its own init, untied head, step 3) saves to a directory transformers loads."""
    cfg = ModelConfig(vocab_size=128, d_model=32, d_ff=40, d_kv=8, num_heads=4, num_layers=4, num_decoder_layers=2,
                      encoder_sparse_step=3, decoder_sparse_step=1, tie_word_embeddings=False, dropout_rate=0.0,
                      relative_attention_num_buckets=16, relative_attention_max_distance=32,
                      moe=MoEConfig(num_experts=4, expert_capacity=4))
    ours = build_model(cfg).eval()
    H.save_pretrained(ours, tmp_path)
    hf_model = _hf_load(tmp_path)
    assert hf_model.config.encoder_sparse_step == 3 and hf_model.config.expert_capacity == 4
    ids, mask, labels = _batch(pad_from=None)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, labels=labels).logits, hf_model(input_ids=ids, labels=labels).logits,
                                   atol=ATOL, rtol=RTOL)
    # The config.json without our marker (as a third party would write it) gives the same model config.
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop(H.MARKER)
    plain = H.config_from_hf(raw)
    assert plain.encoder_sparse_step == 3 and plain.decoder_sparse_step == 1 and plain.moe.expert_capacity == 4


@pytest.mark.parametrize("arch, ffn", [("decoder_only", "relu"), ("encoder_decoder", "gated-gelu")])
def test_native_format_round_trip(tmp_path, arch, ffn):
    """What transformers has no module for (decoder-only, gated FFN) round-trips through our own format."""
    cfg = ModelConfig(arch=arch, vocab_size=64, d_model=16, d_ff=24, d_kv=4, num_heads=4, num_layers=2,
                      num_decoder_layers=2, feed_forward_proj=ffn, decoder_sparse_step=1,
                      moe=MoEConfig(num_experts=3, capacity_factor=None, eval_capacity_factor=None))
    model = build_model(cfg).eval()
    H.save_pretrained(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw[H.MARKER]["format"] == "native" and raw["model_type"] == "switchformer"
    loaded = switchformer.from_pretrained(tmp_path)
    assert loaded.config == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = torch.randint(2, 64, (2, 7))
    with torch.no_grad():
        kw = {} if arch == "decoder_only" else {"decoder_input_ids": ids[:, :5]}
        torch.testing.assert_close(loaded(ids, **kw).logits, model(ids, **kw).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="format='native'"):
        H.save_pretrained(model, tmp_path / "x", format="hf")


def test_dtype_and_no_meta_leftovers(hf_dir):
    _, d = hf_dir(seed=4)
    model = switchformer.from_pretrained(d, dtype="bfloat16")
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.dtype == torch.bfloat16 and not t.is_meta for t in tensors)
    ids, _, labels = _batch(pad_from=None, B=1, S=5, T=3)
    with torch.no_grad():
        assert torch.isfinite(model(ids, labels=labels).logits.float()).all()


def test_from_transformers_in_memory(hf_dir):
    hf_model, _ = hf_dir(seed=6, expert_capacity=3, num_sparse_decoder_layers=2)
    ours = H.from_transformers(hf_model)
    assert ours.config.decoder_sparse_step == 1 and ours.config.encoder_sparse_step == 2
    ids, mask, labels = _batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask, labels=labels).logits,
                                   hf_model(input_ids=ids, attention_mask=mask, labels=labels).logits,
                                   atol=ATOL, rtol=RTOL)
    w = ours.state_dict()["encoder.block.1.layer.1.mlp.experts.w_in"]
    assert w.data_ptr() != hf_model.encoder.block[1].layer[1].mlp.experts["expert_0"].wi.weight.data_ptr()


def test_sparse_layout_comes_from_the_weights(hf_dir):
    """switch-c-2048's config.json says decoder_sparse_step 0 although its decoder has experts: weights win."""
    hf_model, d = hf_dir(seed=7, expert_capacity=5)
    raw = json.loads((d / "config.json").read_text())
    raw.update(decoder_sparse_step=0, encoder_sparse_step=1)  # both wrong: the weights have block 1 sparse
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="disagrees with the weights"):
        ours = switchformer.from_pretrained(d)
    assert (ours.config.encoder_sparse_step, ours.config.decoder_sparse_step) == (2, 2)
    ids, mask, labels = _batch(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask, labels=labels).logits,
                                   hf_model(input_ids=ids, attention_mask=mask, labels=labels).logits,
                                   atol=ATOL, rtol=RTOL)


def test_capacity_factor_model_saves_with_warning(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=16, d_ff=24, d_kv=4, num_heads=4, num_layers=2, num_decoder_layers=2,
                      moe=MoEConfig(num_experts=2, top_k=2))
    model = build_model(cfg).eval()
    with pytest.warns(UserWarning, match="route differently") as rec:
        H.save_pretrained(model, tmp_path, expert_capacity=7)
    assert "top_k=2" in str(rec[0].message) and "capacity factors" in str(rec[0].message)
    assert json.loads((tmp_path / "config.json").read_text())["expert_capacity"] == 7
    assert switchformer.from_pretrained(tmp_path).config == cfg  # our semantics come back through the marker
    _hf_load(tmp_path)


def test_untied_checkpoint_without_embed_copies_loads(hf_dir):
    """transformers 4.x (and switch-c-2048) saved untied models without encoder/decoder.embed_tokens copies."""
    hf_model, d = hf_dir(seed=8, tie_word_embeddings=False)
    with torch.no_grad():
        hf_model.encoder.embed_tokens.weight.copy_(hf_model.shared.weight)
        hf_model.decoder.embed_tokens.weight.copy_(hf_model.shared.weight)
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items() if ".embed_tokens." not in k}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    ours = switchformer.from_pretrained(d)
    ids, mask, labels = _batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask, labels=labels).logits,
                                   hf_model(input_ids=ids, attention_mask=mask, labels=labels).logits,
                                   atol=ATOL, rtol=RTOL)
    bad = dict(sd, **{"encoder.embed_tokens.weight": torch.zeros_like(sd["shared.weight"])})
    save_file(bad, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(H.CheckpointError, match="differs from shared.weight"):
        switchformer.from_pretrained(d)


@pytest.mark.parametrize("proj, tied", [("relu", True), ("gated-gelu", False)])
def test_dense_t5_checkpoints_load(tmp_path, proj, tied):
    """transformers' T5 (v1.0 relu tied, v1.1 gated-gelu untied): the dense baseline, FFN keys 'DenseReluDense'."""
    cfg = transformers.T5Config(vocab_size=99, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2,
                                num_decoder_layers=3, relative_attention_num_buckets=8, feed_forward_proj=proj,
                                tie_word_embeddings=tied, decoder_start_token_id=0)
    torch.manual_seed(9)
    t5 = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        t5.shared.weight.mul_(0.2)
        if not tied:
            t5.encoder.embed_tokens.weight.copy_(t5.shared.weight)
            t5.decoder.embed_tokens.weight.copy_(t5.shared.weight)
    t5.save_pretrained(tmp_path)
    ours = switchformer.from_pretrained(tmp_path)
    assert ours.config.encoder_sparse_step == ours.config.decoder_sparse_step == 0
    assert ours.config.feed_forward_proj == proj and ours.config.tie_word_embeddings == tied
    ids, mask, labels = _batch(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask, labels=labels).logits,
                                   t5(input_ids=ids, attention_mask=mask, labels=labels).logits, atol=ATOL, rtol=RTOL)
    assert H.from_transformers(t5).config == ours.config


def test_loaded_model_fine_tunes(hf_dir):
    """Meta-device build + assign gives real, trainable Parameters (gradients reach the stacked experts)."""
    _, d = hf_dir(seed=10, expert_capacity=3)
    model = switchformer.from_pretrained(d).train()
    assert all(type(p) is torch.nn.Parameter and p.requires_grad for p in model.parameters())
    ids, _, labels = _batch(seed=7, pad_from=None)
    model(ids, labels=labels).loss.backward()
    w_in = model.encoder.block[1].layer[1].mlp.experts.w_in
    assert w_in.grad is not None and w_in.grad.abs().sum() > 0 and model.shared.weight.grad is not None


def test_transformers_sharded_checkpoint_loads(tmp_path):
    hf_model = tiny_hf_model(11, expert_capacity=3)
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / H.INDEX_NAME).is_file()
    ours = switchformer.from_pretrained(tmp_path)
    ids, mask, labels = _batch(seed=8)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask, labels=labels).logits,
                                   hf_model(input_ids=ids, attention_mask=mask, labels=labels).logits,
                                   atol=ATOL, rtol=RTOL)
