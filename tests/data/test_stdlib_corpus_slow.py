"""End to end on the default corpus (the standard library): ~15-40 s of tokenizer training, so marked slow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from switchformer.config import DataConfig, round_vocab
from switchformer.data import get_tokenizer, load_corpus, make_loader


@pytest.mark.slow
def test_default_corpus_end_to_end(tmp_path: Path):
    cfg = DataConfig()
    corpus = load_corpus(cfg)
    assert corpus.num_files > 300 and corpus.num_bytes > 5_000_000 and len(corpus.val_texts) > 5
    tok = get_tokenizer(cfg, corpus, cache_dir=tmp_path)
    assert tok.vocab_size == 8100 and round_vocab(tok.vocab_size) == 8192
    for text in corpus.val_texts[:20]:  # unseen files round-trip exactly
        assert tok.decode(tok.encode(text)) == text
    train = make_loader(cfg, tok, corpus, batch_size=8, split="train", cache_dir=tmp_path)
    val = make_loader(cfg, tok, corpus, batch_size=8, split="val", cache_dir=tmp_path)
    bytes_per_token = corpus.num_bytes / (train.num_tokens + val.num_tokens)
    assert 2.5 < bytes_per_token < 6.0  # an 8k unigram vocabulary on code
    batch = next(train)
    assert batch["input_ids"].shape == (8, 128) and batch["labels"].shape == (8, 29)
    assert int(batch["attention_mask"].sum()) == 8 * 128  # packing fills every position
    assert np.isin(tok.sentinel_id(0), batch["input_ids"].numpy())
    assert "tokens: train" in corpus.summary()
