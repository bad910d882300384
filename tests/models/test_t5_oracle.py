"""Dense path against an independent oracle: transformers' T5 (same key names, T5 v1.0 relu and gated-gelu)."""

from __future__ import annotations

import pytest
import torch

from switchformer.config import ModelConfig
from switchformer.models import build_model
from switchformer.models.blocks import relative_position_bucket

transformers = pytest.importorskip("transformers")


def _pair(feed_forward_proj: str = "relu", tie: bool = True, dec_layers: int = 3):
    cfg = ModelConfig(
        vocab_size=64, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=dec_layers,
        encoder_sparse_step=0, decoder_sparse_step=0, feed_forward_proj=feed_forward_proj, dropout_rate=0.0,
        tie_word_embeddings=tie, relative_attention_num_buckets=8, relative_attention_max_distance=20,
    )
    hf_cfg = transformers.T5Config(
        vocab_size=64, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=dec_layers,
        feed_forward_proj=feed_forward_proj, dropout_rate=0.0, tie_word_embeddings=tie,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0,
    )
    hf = transformers.T5ForConditionalGeneration(hf_cfg).eval()
    ours = build_model(cfg).eval()
    # T5 names the FFN `DenseReluDense`; Switch (and we) name it `mlp`. Everything else is key-for-key.
    state = {
        k.replace("DenseReluDense", "mlp"): v
        for k, v in hf.state_dict().items()
        if "embed_tokens" not in k and (k != "lm_head.weight" or not tie)
    }
    ours.load_state_dict(state, strict=True)
    return ours, hf


@pytest.mark.parametrize("proj,tie", [("relu", True), ("gated-gelu", False)])
def test_matches_transformers_t5(proj, tie):
    ours, hf = _pair(proj, tie)
    ids = torch.randint(2, 64, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, 3:] = 0
    labels = torch.randint(2, 64, (3, 6))
    labels[2, 4:] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
        out = ours(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.lm_loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert out.router == [] and float(out.aux_loss) == 0.0


def test_generate_matches_transformers_greedy():
    ours, hf = _pair(dec_layers=2)  # transformers 5.x generate assumes equal depths for its cache
    ids = torch.randint(2, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=1,
                      eos_token_id=None, pad_token_id=0, min_length=0)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(got, ref)


def test_bucket_matches_transformers():
    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, dist in ((32, 128), (8, 20)):
            ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=dist
            )
            got = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=dist)
            assert torch.equal(got, ref)
