"""Packed loader: batch layout, exact resume, epoch coverage, decoder-only label alignment, ranks, caching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from switchformer.config import DataConfig
from switchformer.data import BatchLoader, Tokenizer, load_corpus, make_loader

VOCAB = 1000
SENTINELS = 100


def synthetic_tokens(n: int, seed: int = 0) -> np.ndarray:
    """Unique-ish ids in [3, VOCAB - SENTINELS) so chunks can be located in the stream."""
    return np.random.default_rng(seed).integers(3, VOCAB - SENTINELS, size=n).astype(np.int32)


def enc_dec(tokens: np.ndarray, **kw) -> BatchLoader:
    args = dict(batch_size=4, input_length=32, arch="encoder_decoder", split="train", seed=3,
                first_sentinel_id=VOCAB - 1, num_sentinels=SENTINELS)  # fmt: skip
    args.update(kw)
    return BatchLoader(tokens, **args)


def uncorrupt(input_ids: np.ndarray, labels: np.ndarray) -> list[int]:
    """Splice target spans back into the inputs (inverse of span corruption), dropping padding and EOS."""
    targets = labels[labels != -100][:-1]
    spans, cur = {}, None
    for t in targets:
        if t >= VOCAB - SENTINELS:
            cur = int(t)
            spans[cur] = []
        else:
            spans[cur].append(int(t))
    out = []
    for t in input_ids[input_ids != 0][:-1]:
        out.extend(spans.pop(int(t)) if t >= VOCAB - SENTINELS else [int(t)])
    assert not spans
    return out


def test_encoder_decoder_layout_and_content():
    tokens = synthetic_tokens(5000)
    loader = enc_dec(tokens)
    assert (loader.raw_length, loader.targets_length) == (34, 8)  # span_corruption_lengths(32)
    stream = tokens.tolist()
    for _ in range(3):
        b = next(loader)
        assert set(b) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels"}
        assert all(v.dtype == torch.int64 for v in b.values())
        assert b["input_ids"].shape == (4, 32) and b["labels"].shape == (4, 8)
        assert bool((b["attention_mask"] == 1).all())  # full chunks fill the encoder exactly
        # decoder inputs = labels shifted right, starting with the pad id 0 (T5's decoder start)
        assert bool((b["decoder_input_ids"][:, 0] == 0).all())
        assert torch.equal(b["decoder_input_ids"][:, 1:], b["labels"][:, :-1].clamp(min=0))
        assert torch.equal(b["decoder_attention_mask"], (b["labels"] != -100).long())
        for row in range(4):
            raw = uncorrupt(b["input_ids"][row].numpy(), b["labels"][row].numpy())
            assert len(raw) == 34
            starts = [i for i in range(len(stream) - 33) if stream[i : i + 34] == raw]
            assert starts and (starts[0] - loader._epoch_order(0)[1]) % 34 == 0  # a chunk on the epoch's grid


def test_resume_is_exact():
    tokens = synthetic_tokens(3000)
    ref = enc_dec(tokens)
    expected = [next(ref) for _ in range(60)]  # 60 * 4 rows > 88 chunks: crosses two epoch boundaries
    for cut in (1, 21, 37):
        first = enc_dec(tokens)
        for _ in range(cut):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
        resumed = enc_dec(tokens)
        resumed.load_state_dict(state)
        for want in expected[cut : cut + 25]:
            got = next(resumed)
            assert all(torch.equal(got[k], want[k]) for k in want)
    assert ref.epoch == 60 * 4 // ref.num_chunks
    with pytest.raises(ValueError, match="seed"):
        enc_dec(tokens, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="tokens_fingerprint"):
        enc_dec(synthetic_tokens(3000, seed=1)).load_state_dict(state)


def test_epochs_cover_every_chunk_once_and_reshuffle():
    tokens = synthetic_tokens(34 * 40 + 7)
    loader = enc_dec(tokens, batch_size=1)
    assert loader.num_chunks == 40 and len(loader) == 40

    def epoch_chunks():
        got = []
        for _ in range(40):
            chunk, _, cid = loader._chunk(loader.position)
            got.append(cid)
            next(loader)
        return got

    e0, e1 = epoch_chunks(), epoch_chunks()
    assert sorted(e0) == sorted(e1) == list(range(40)) and e0 != e1


def test_validation_is_fixed_and_epoch_batches_cover_all():
    tokens = synthetic_tokens(34 * 10)
    val = enc_dec(tokens, split="val", batch_size=4)
    a = list(val.epoch_batches())
    b = list(val.epoch_batches())
    assert len(a) == 3 and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
    assert val.position == 0  # evaluation passes do not move the iterator
    last = a[-1]
    assert bool((last["attention_mask"][2:] == 0).all()) and bool((last["labels"][2:] == -100).all())  # 10 = 4+4+2
    chunks = [uncorrupt(x["input_ids"][r].numpy(), x["labels"][r].numpy()) for x in a for r in range(4)][:10]
    assert chunks == [tokens[i * 34 : (i + 1) * 34].tolist() for i in range(10)]  # in order, no offset


def test_decoder_only_labels_are_aligned_with_inputs():
    tokens = synthetic_tokens(2000)
    loader = BatchLoader(tokens, batch_size=3, input_length=16, arch="decoder_only", split="train", seed=0)
    b = next(loader)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert b["input_ids"].shape == b["labels"].shape == (3, 16)
    # transformers' convention: labels == input_ids (the model shifts), and the window is a contiguous stretch
    assert torch.equal(b["labels"], b["input_ids"])
    stream = tokens.tolist()
    for row in range(3):
        x = b["input_ids"][row].tolist()
        assert any(stream[i : i + 16] == x for i in range(len(stream)))


def test_short_split_is_padded():
    tokens = np.array([5, 6, 7, 8, 1], dtype=np.int32)
    dec = BatchLoader(tokens, batch_size=2, input_length=8, arch="decoder_only", split="val", seed=0)
    b = next(dec)
    assert b["input_ids"][0].tolist() == [5, 6, 7, 8, 1, 0, 0, 0]
    assert b["labels"][0].tolist() == [5, 6, 7, 8, 1, -100, -100, -100]
    assert b["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    ed = enc_dec(tokens, split="val")
    b = next(ed)
    assert uncorrupt(b["input_ids"][0].numpy(), b["labels"][0].numpy()) == tokens.tolist()
    assert bool((b["decoder_attention_mask"][0] == (b["labels"][0] != -100)).all())


def test_ranks_partition_the_global_batch():
    tokens = synthetic_tokens(4000)
    whole = enc_dec(tokens, batch_size=4)
    r0 = enc_dec(tokens, batch_size=2, rank=0, world_size=2)
    r1 = enc_dec(tokens, batch_size=2, rank=1, world_size=2)
    for _ in range(5):
        w, a, b = next(whole), next(r0), next(r1)
        assert all(torch.equal(w[k], torch.cat([a[k], b[k]])) for k in w)


def test_make_loader_end_to_end(text_dir: Path, tiny_tok: Tokenizer, tmp_path: Path):
    cfg = DataConfig(corpus=str(text_dir), input_length=64, val_fraction=0.25, seed=1)
    corpus = load_corpus(cfg)
    cache = tmp_path / "cache"
    train = make_loader(cfg, tiny_tok, corpus, batch_size=2, split="train", cache_dir=cache)
    assert corpus.num_tokens["train"] == train.num_tokens and "tokens: train" in corpus.summary()
    assert len(list(cache.glob("tokens_*.npy"))) == 1
    expected = np.concatenate([np.append(tiny_tok.encode(t), 1) for t in corpus.train_texts])
    np.testing.assert_array_equal(train.tokens, expected)  # documents joined by EOS, in order
    again = make_loader(cfg, tiny_tok, corpus.train_texts, batch_size=2, cache_dir=cache)  # from the cache
    np.testing.assert_array_equal(again.tokens, expected)
    b = next(train)
    assert b["input_ids"].shape == (2, 64) and int(b["input_ids"].max()) < tiny_tok.vocab_size
    assert tiny_tok.sentinel_id(0) in b["input_ids"][0].tolist()
    assert tiny_tok.decode(b["labels"][0][b["labels"][0] != -100].tolist()).startswith("<extra_id_0>")
    val = make_loader(cfg, tiny_tok, corpus, batch_size=2, split="val")
    assert val.num_tokens == corpus.num_tokens["val"] > 0
    lm_cfg = DataConfig(corpus=str(text_dir), objective="causal_lm", input_length=64)
    lm = make_loader(lm_cfg, tiny_tok, corpus, batch_size=2, model_arch="decoder_only")
    assert next(lm)["labels"].shape == (2, 64)
    with pytest.raises(ValueError, match="data.objective=causal_lm"):
        make_loader(cfg, tiny_tok, corpus, batch_size=2, model_arch="decoder_only")
    with pytest.raises(ValueError, match="no documents"):
        make_loader(cfg, tiny_tok, [], batch_size=2)


def test_too_many_spans_for_sentinels():
    with pytest.raises(ValueError, match="num_sentinels"):
        enc_dec(synthetic_tokens(5000), input_length=1024, num_sentinels=10)
