"""Tokenizer: T5 id layout (paper §3, "Vocabulary"), round trips, sentinels, caching, loading saved models."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from switchformer.config import DataConfig, round_vocab
from switchformer.data import Corpus, Tokenizer, get_tokenizer, load_corpus, train_tokenizer
from switchformer.data import tokenizer as tokenizer_module


def test_special_ids_and_layout(tiny_tok: Tokenizer):
    assert (tiny_tok.pad_id, tiny_tok.eos_id, tiny_tok.unk_id) == (0, 1, 2)
    assert tiny_tok.sp.id_to_piece(0) == "<pad>" and tiny_tok.sp.id_to_piece(1) == "</s>"
    assert tiny_tok.sp.bos_id() == -1  # T5 has no BOS
    assert tiny_tok.num_pieces == 400 and tiny_tok.vocab_size == 500
    assert tiny_tok.sentinel_id(0) == 499 and tiny_tok.sentinel_id(99) == 400  # <extra_id_0> is the last id
    with pytest.raises(ValueError, match="num_sentinels"):
        tiny_tok.sentinel_id(100)
    assert round_vocab(tiny_tok.vocab_size) == 512


def test_round_trip_code(tiny_tok: Tokenizer, tiny_texts: list[str]):
    # Code keeps every space, tab and newline; unseen characters go through byte fallback, never <unk>.
    samples = [*tiny_texts[:3], "def f(x):\n\tif x:\n        return  x  # ünïcode 漢字 🙂\n\n", "  leading space"]
    for text in samples:
        ids = tiny_tok.encode(text)
        assert tiny_tok.unk_id not in ids
        assert max(ids) < tiny_tok.num_pieces  # plain text never produces sentinel ids
        assert tiny_tok.decode(ids) == text
    batch = tiny_tok.encode_batch(samples)
    assert batch == [tiny_tok.encode(t) for t in samples]


def test_sentinels_in_text_and_decode(tiny_tok: Tokenizer):
    ids = tiny_tok.encode("x = <extra_id_0> + y<extra_id_7>")
    assert tiny_tok.sentinel_id(0) in ids and tiny_tok.sentinel_id(7) in ids
    assert tiny_tok.decode(ids) == "x = <extra_id_0> + y<extra_id_7>"
    assert tiny_tok.decode([tiny_tok.sentinel_id(3), *tiny_tok.encode("abc"), 1, 0]) == "<extra_id_3>abc"
    with pytest.raises(ValueError, match="-100"):
        tiny_tok.decode([5, -100])


def test_save_load(tiny_tok: Tokenizer, tmp_path: Path):
    path = tiny_tok.save(tmp_path / "tok")
    assert path.name == "spiece.model"
    loaded = get_tokenizer(DataConfig(tokenizer=str(path)), corpus=None)
    assert loaded.vocab_size == tiny_tok.vocab_size and loaded.fingerprint == tiny_tok.fingerprint
    assert loaded.encode("import os\n") == tiny_tok.encode("import os\n")
    assert Tokenizer.from_file(tmp_path / "tok").vocab_size == 500  # a directory holding spiece.model works too
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_file(tmp_path / "junk.model")


def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def _piece_field(piece: str) -> bytes:
    """ModelProto field 1 (repeated SentencePiece{piece=1, score=2, type=3 NORMAL}) in protobuf wire format."""
    p = piece.encode()
    msg = b"\x0a" + _varint(len(p)) + p + b"\x15" + struct.pack("<f", -50.0) + b"\x18\x01"
    return b"\x0a" + _varint(len(msg)) + msg


def test_t5_sized_model_gives_32100(tiny_tok: Tokenizer, tmp_path: Path):
    # T5's spiece.model has 32000 pieces with pad/eos/unk = 0/1/2; pad our model to 32000 pieces (appending
    # repeated-field entries to the serialized proto) and check the T5 layout: 32100 ids, <extra_id_0> = 32099.
    extra = b"".join(_piece_field(f"zz{i:05d}") for i in range(32000 - tiny_tok.num_pieces))
    (tmp_path / "spiece.model").write_bytes(tiny_tok._proto + extra)
    t5 = Tokenizer.from_file(tmp_path / "spiece.model")
    assert (t5.num_pieces, t5.vocab_size, round_vocab(t5.vocab_size)) == (32000, 32100, 32128)
    assert t5.sentinel_id(0) == 32099 and t5.sentinel_id(99) == 32000
    assert t5.decode([32099, 32098]) == "<extra_id_0><extra_id_1>"


def test_trained_tokenizer_is_cached(text_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = DataConfig(corpus=str(text_dir), vocab_size=450)
    corpus = load_corpus(cfg)
    tok = get_tokenizer(cfg, corpus, cache_dir=tmp_path / "cache")
    assert tok.num_pieces == 450
    assert len(list((tmp_path / "cache").glob("spm_*_v450.model"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", boom)
    again = get_tokenizer(cfg, corpus, cache_dir=tmp_path / "cache")
    assert again.fingerprint == tok.fingerprint
    # A different corpus must not reuse the cached model.
    other = Corpus(["x = 1\n" * 50], [], ["a"], [], "test", 1, 300, fingerprint="0" * 64)
    with pytest.raises(AssertionError, match="retrained"):
        get_tokenizer(cfg, other, cache_dir=tmp_path / "cache")


def test_vocab_too_large_is_a_clear_error():
    corpus = Corpus(["tiny text\n"] * 3, [], ["a", "b", "c"], [], "test", 3, 30, fingerprint="1" * 64)
    with pytest.raises(ValueError, match="data.vocab_size"):
        get_tokenizer(DataConfig(vocab_size=5000), corpus)
    with pytest.raises(ValueError, match=">= 300"):
        get_tokenizer(DataConfig(vocab_size=100), corpus)


def test_is_sentinel(tiny_tok: Tokenizer):
    ids = np.array([0, 1, 399, 400, 499])
    assert tiny_tok.is_sentinel(ids).tolist() == [False, False, False, True, True]


def test_training_is_deterministic(tiny_texts: list[str], tiny_tok: Tokenizer):
    assert train_tokenizer(tiny_texts, vocab_size=400)._proto == tiny_tok._proto
    # Large corpora are subsampled by a fixed stride (not SentencePiece's random sampler).
    lines = list(tokenizer_module._training_lines(tiny_texts, max_lines=100))
    assert 50 <= len(lines) <= 100 and lines == list(tokenizer_module._training_lines(tiny_texts, max_lines=100))
    assert all(line.strip() and "\n" not in line for line in lines)


def _one_line_text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "def", "class", "return", "import", "lambda", "self", "élan", "наш"]
    return " ".join(f"{words[i]}{j}" for i, j in zip(rng.integers(0, len(words), n_words),
                                                      rng.integers(0, 50, n_words), strict=True))


def test_overlong_lines_are_fed_to_the_trainer_in_pieces():
    """SentencePiece skips sentences longer than its limit: a long line reaches it in pieces that fit."""
    line = _one_line_text(5000)
    assert len(line.encode()) > 4 * tokenizer_module._MAX_SENTENCE_LENGTH
    pieces = list(tokenizer_module._line_pieces(line))
    assert "".join(pieces) == line and len(pieces) > 4
    assert all(len(p.encode()) <= tokenizer_module._MAX_SENTENCE_LENGTH for p in pieces)
    assert all(p.endswith(" ") for p in pieces[:-1])  # cut after a space, not inside a word
    nospace = "x" * 20_000
    assert "".join(tokenizer_module._line_pieces(nospace)) == nospace
    assert list(tokenizer_module._line_pieces("short line")) == ["short line"]


def test_tokenizer_trains_on_a_single_long_line():
    """A corpus of one long line (minified code, a dump) trains a tokenizer that round-trips it."""
    text = _one_line_text(40_000)  # ~300 KB on one line
    tok = train_tokenizer([text], vocab_size=300, num_sentinels=10)
    assert tok.num_pieces == 300
    assert tok.decode(tok.encode(text[:2000])) == text[:2000]
