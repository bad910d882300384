"""Pretraining data: corpus sources, the SentencePiece tokenizer, T5 span corruption and the packed loader.

Imports only numpy, torch, sentencepiece, the standard library, ``switchformer.config`` and
``switchformer.errors`` (paper §3)::

    corpus = load_corpus(cfg.data)                          # Corpus: train_texts, val_texts, summary()
    tok = get_tokenizer(cfg.data, corpus, cache_dir=cache)  # Tokenizer: T5 ids (pad 0, eos 1, unk 2, sentinels)
    loader = make_loader(cfg.data, tok, corpus, batch_size=32, split="train", model_arch="encoder_decoder")
    batch = next(loader)                                    # dict of int64 tensors
"""

from switchformer.config import IGNORE_INDEX
from switchformer.data.loader import BatchLoader, make_loader, tokenize_texts
from switchformer.data.multilingual import load_corpus  # any corpus, multilingual or not
from switchformer.data.sources import Corpus
from switchformer.data.span_corruption import (
    random_spans_noise_mask,
    span_corrupt,
    span_corrupt_batch,
    span_corruption_lengths,
)
from switchformer.data.tokenizer import Tokenizer, get_tokenizer, train_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "BatchLoader",
    "Corpus",
    "Tokenizer",
    "get_tokenizer",
    "load_corpus",
    "make_loader",
    "random_spans_noise_mask",
    "span_corrupt",
    "span_corrupt_batch",
    "span_corruption_lengths",
    "tokenize_texts",
    "train_tokenizer",
]
