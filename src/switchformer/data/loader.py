"""Packed, resumable pretraining batches: ``make_loader(cfg, tok, texts, batch_size, split, model_arch)``.

Pipeline (T5's ``span_corruption`` task, paper §3):

1. Tokenize every document once into one flat int32 array, EOS after each document (cached as ``.npy`` in
   ``cache_dir``, keyed by the texts' hash and the tokenizer's fingerprint).
2. Cut it into chunks. Encoder-decoder: chunks of ``raw_length`` tokens, where ``raw_length`` is chosen by
   :func:`span_corruption_lengths` so corruption fills exactly ``input_length`` encoder positions (128 -> 141 raw
   tokens, 29 targets). Decoder-only: windows of ``input_length + 1`` tokens with stride ``input_length``.
3. Each training epoch visits the chunks in a fresh random order, with chunk boundaries shifted by a random offset;
   validation uses one fixed order and fixed noise.
4. Encoder-decoder chunks are span-corrupted with noise drawn from ``(seed, epoch, chunk)``.

Order and noise are pure functions of ``(seed, split, epoch, chunk index)``, so the whole loader state is one
integer (the global chunk position): ``state_dict()`` / ``load_state_dict()`` resume exactly.

Batch layout (all int64 tensors; B = batch size, pad id 0, label padding -100):

- encoder-decoder: ``input_ids`` [B, input_length], ``attention_mask`` [B, input_length], ``labels``
  [B, targets_length], ``decoder_input_ids`` [B, targets_length] (labels shifted right, starting with the pad id 0,
  T5's decoder start), ``decoder_attention_mask`` [B, targets_length] (1 where labels are real).
- decoder-only: ``input_ids`` [B, input_length], ``attention_mask``, ``labels`` [B, input_length] aligned with
  ``input_ids`` (-100 at padding), as transformers' causal LMs take them: the model shifts inside, so position t
  is trained to predict ``labels[:, t + 1]``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from switchformer.config import IGNORE_INDEX, DataConfig
from switchformer.data.sources import Corpus
from switchformer.data.span_corruption import (
    _counts,
    chunk_keys,
    span_corrupt,
    span_corrupt_batch,
    span_corruption_lengths,
)
from switchformer.data.tokenizer import Tokenizer
from switchformer.errors import DataError

log = logging.getLogger(__name__)

_STATE_VERSION = 1
_SPLIT_SALT = {"train": 0, "val": 1}
_ENCODE_GROUP = 256  # documents per sentencepiece batch call: bounds the Python lists held at once


def tokenize_texts(tok: Tokenizer, texts: Sequence[str], cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """All documents as one flat int32 token array, EOS after each document.

    Args:
        tok: tokenizer.
        texts: documents.
        cache_dir: where to cache the array as ``tokens_<key>.npy`` (key: texts' sha256 + tokenizer fingerprint).

    Returns:
        int32 array [sum(len(doc tokens) + 1)].
    """
    h = hashlib.sha256(tok.fingerprint.encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    path = Path(cache_dir) / f"tokens_{h.hexdigest()[:24]}.npy" if cache_dir is not None else None
    if path is not None and path.is_file():
        return np.load(path, allow_pickle=False)
    t0 = time.perf_counter()
    chunks: list[np.ndarray] = []
    eos = np.array([tok.eos_id], dtype=np.int32)
    for g in range(0, len(texts), _ENCODE_GROUP):
        for ids in tok.encode_batch(texts[g : g + _ENCODE_GROUP]):  # loop over documents; tokens stay in C
            chunks.append(np.asarray(ids, dtype=np.int32))
            chunks.append(eos)
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    log.info("tokenized %d documents into %d tokens in %.1f s", len(texts), len(tokens), time.perf_counter() - t0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            np.save(f, tokens, allow_pickle=False)
        os.replace(tmp, path)
    return tokens


class BatchLoader:
    """Infinite iterator of packed batches with exact resume (see the module docstring for the layout).

    Attributes:
        tokens: the split's flat int32 token array.
        batch_size: rows per batch on this rank.
        input_length: encoder (or decoder-only) sequence length.
        targets_length: decoder length (encoder-decoder) or ``input_length`` (decoder-only).
        raw_length: tokens per chunk before corruption (decoder-only: ``input_length + 1``).
        num_chunks: chunks per epoch.
        position: chunks consumed so far by all ranks together.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        batch_size: int,
        input_length: int,
        arch: Literal["encoder_decoder", "decoder_only"],
        split: Literal["train", "val"],
        seed: int,
        first_sentinel_id: int | None = None,
        num_sentinels: int = 100,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
        eos_id: int = 1,
        pad_id: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if split not in _SPLIT_SALT:
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        if arch not in ("encoder_decoder", "decoder_only"):
            raise DataError(f"model_arch must be 'encoder_decoder' or 'decoder_only', got {arch!r}")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if input_length < 2:
            raise DataError(f"data.input_length must be >= 2, got {input_length}")
        if int(seed) < 0:
            raise DataError(f"data.seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        if tokens.ndim != 1 or len(tokens) < 2:
            raise DataError(
                f"the {split} split has {len(tokens)} tokens; it needs at least 2 "
                "(add text or change data.val_fraction)"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.input_length = input_length
        self.arch = arch
        self.split = split
        self.seed = int(seed)
        self.noise_density = noise_density
        self.mean_noise_span_length = mean_noise_span_length
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.rank = rank
        self.world_size = world_size
        if arch == "encoder_decoder":
            if first_sentinel_id is None:
                raise DataError("encoder-decoder batches need first_sentinel_id (the id of <extra_id_0>)")
            self.raw_length, self.targets_length = span_corruption_lengths(
                input_length, noise_density, mean_noise_span_length
            )
            max_spans = _counts(self.raw_length, noise_density, mean_noise_span_length)[1]
            if max_spans > num_sentinels:
                raise DataError(
                    f"a chunk of {self.raw_length} tokens has {max_spans} noise spans but only {num_sentinels} "
                    "sentinels exist; raise data.num_sentinels or lower data.input_length"
                )
            self.first_sentinel_id = int(first_sentinel_id)
            stride = self.raw_length
        else:
            self.raw_length, self.targets_length = input_length + 1, input_length
            self.first_sentinel_id = None
            stride = input_length  # windows overlap by one token so every token is predicted once
        self.stride = stride
        n = len(tokens)
        if n >= self.raw_length:
            self.num_chunks = (n - self.raw_length) // stride + 1
            self._slack = n - self.raw_length - (self.num_chunks - 1) * stride  # room for a random epoch offset
        else:  # a split shorter than one chunk: one short, padded chunk
            self.num_chunks, self._slack = 1, 0
        self.position = 0
        self._epoch_cache: tuple[int, np.ndarray, int] | None = None
        self.tokens_fingerprint = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]

    # ----------------------------------------------------------------------------------------------- order
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, int]:
        """(chunk permutation, boundary offset) of an epoch; validation: identity and 0."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1], self._epoch_cache[2]
        if self.split == "train":
            rng = np.random.default_rng([self.seed, _SPLIT_SALT[self.split], epoch])
            order = rng.permutation(self.num_chunks)
            offset = int(rng.integers(0, self._slack + 1))
        else:
            order, offset = np.arange(self.num_chunks), 0
        self._epoch_cache = (epoch, order, offset)
        return order, offset

    def _chunk(self, global_pos: int) -> tuple[np.ndarray, int, int]:
        """Tokens, epoch and chunk id at a global chunk position."""
        epoch, i = divmod(global_pos, self.num_chunks)
        order, offset = self._epoch_order(epoch)
        cid = int(order[i])
        start = offset + cid * self.stride
        return self.tokens[start : start + self.raw_length], epoch, cid

    # --------------------------------------------------------------------------------------------- batches
    def _rows(self, positions: Sequence[int | None]) -> dict[str, torch.Tensor]:
        """Collate the chunks at ``positions`` (None: an all-padding row) into a batch."""
        B = len(positions)
        L = self.input_length
        T = self.targets_length
        input_ids = np.full((B, L), self.pad_id, dtype=np.int64)
        in_len = np.zeros(B, dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        tgt_len = np.zeros(B, dtype=np.int64)
        rows = np.array([r for r, p in enumerate(positions) if p is not None], dtype=np.int64)
        if len(rows):
            pos = np.array([positions[r] for r in rows], dtype=np.int64)
            epoch, i = np.divmod(pos, self.num_chunks)
            cid = np.empty_like(pos)
            offset = np.empty_like(pos)
            for e in np.unique(epoch):  # at most two epochs meet in one batch
                order, off = self._epoch_order(int(e))
                sel = epoch == e
                cid[sel], offset[sel] = order[i[sel]], off
            # Validation noise ignores the epoch, so every validation pass scores the same corrupted text.
            noise_epoch = epoch if self.split == "train" else np.zeros_like(epoch)
            keys = chunk_keys(self.seed, _SPLIT_SALT[self.split], noise_epoch, cid)  # [rows] noise of each chunk
            if len(self.tokens) >= self.raw_length:  # every chunk is full: one vectorised pass over the batch
                chunks = self.tokens[(offset + cid * self.stride)[:, None] + np.arange(self.raw_length)]
                if self.arch == "encoder_decoder":
                    inp, tgt = span_corrupt_batch(
                        chunks, keys, self.noise_density, self.mean_noise_span_length, self.first_sentinel_id,
                        self.eos_id,
                    )  # fmt: skip
                else:
                    inp = tgt = chunks[:, :-1]  # labels aligned; the model shifts
                if inp.shape[1] != L or tgt.shape[1] != T:  # impossible by construction of raw_length
                    raise RuntimeError(f"chunks corrupted to {inp.shape[1]}/{tgt.shape[1]} tokens, not {L}/{T}")
                input_ids[rows], labels[rows] = inp, tgt
                in_len[rows], tgt_len[rows] = L, T
            else:  # the split is shorter than one chunk: the same short chunk in every row
                for r, key in zip(rows, keys, strict=True):
                    chunk = self.tokens
                    if self.arch == "encoder_decoder":
                        rng = np.random.default_rng(int(key))
                        inp, tgt = span_corrupt(
                            chunk, rng, self.noise_density, self.mean_noise_span_length, self.first_sentinel_id,
                            self.eos_id,
                        )  # fmt: skip
                    else:
                        inp = tgt = chunk  # shorter than input_length + 1 tokens, so it fits
                    input_ids[r, : len(inp)], labels[r, : len(tgt)] = inp, tgt
                    in_len[r], tgt_len[r] = len(inp), len(tgt)
        attention_mask = (np.arange(L)[None, :] < in_len[:, None]).astype(np.int64)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.arch == "encoder_decoder":
            decoder_input_ids = np.full((B, T), self.pad_id, dtype=np.int64)  # position 0: start id = pad (T5)
            decoder_input_ids[:, 1:] = np.where(labels[:, :-1] == IGNORE_INDEX, self.pad_id, labels[:, :-1])
            batch["decoder_input_ids"] = decoder_input_ids
            batch["decoder_attention_mask"] = (np.arange(T)[None, :] < tgt_len[:, None]).astype(np.int64)
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        """The next batch of this rank; advances the global position by ``batch_size * world_size`` chunks."""
        first = self.position + self.rank * self.batch_size
        batch = self._rows(range(first, first + self.batch_size))
        self.position += self.batch_size * self.world_size
        return batch

    def __len__(self) -> int:
        """Batches per epoch (all ranks stepping together)."""
        return -(-self.num_chunks // (self.batch_size * self.world_size))

    @property
    def epoch(self) -> int:
        """Epochs completed (of the chunk stream consumed so far)."""
        return self.position // self.num_chunks

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def epoch_batches(self, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over the split from its start, without touching the iterator state (for evaluation).

        Every chunk appears once. The last batch is filled with all-padding rows (attention 0, labels -100), so
        every rank gets the same number of batches of the same shape: normalise losses by the number of labels.
        """
        n = len(self) if max_batches is None else min(len(self), max_batches)
        step = self.batch_size * self.world_size
        for b in range(n):
            first = b * step + self.rank * self.batch_size
            yield self._rows([p if p < self.num_chunks else None for p in range(first, first + self.batch_size)])

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-serialisable state. Order and noise derive from (seed, epoch, chunk), so no RNG state is needed."""
        return {
            "version": _STATE_VERSION,
            "split": self.split,
            "arch": self.arch,
            "position": int(self.position),
            "epoch": int(self.epoch),
            "seed": self.seed,
            "num_chunks": int(self.num_chunks),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "tokens_fingerprint": self.tokens_fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; the next batches equal those of the uninterrupted loader.

        Raises ValueError if the state belongs to other data (tokens, seed, split or chunking differ). A different
        batch size or world size is allowed: the position counts chunks, so no data is skipped or repeated.
        """
        if state.get("version") != _STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r} != {_STATE_VERSION}")
        mine = self.state_dict()
        for key in ("split", "arch", "seed", "num_chunks", "tokens_fingerprint"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"loader state was saved with {key}={state.get(key)!r} but this loader has {mine[key]!r}; "
                    "resume with the same data, tokenizer, data.seed and data.input_length"
                )
        position = state["position"]
        if not isinstance(position, int) or position < 0:
            raise DataError(f"loader state position must be a non-negative int, got {position!r}")
        self.position = position

    def __repr__(self) -> str:
        return (
            f"BatchLoader(split={self.split!r}, arch={self.arch!r}, tokens={self.num_tokens:,}, "
            f"chunks={self.num_chunks:,} x {self.raw_length}, batch={self.batch_size}, "
            f"input_length={self.input_length}, targets_length={self.targets_length}, position={self.position})"
        )


_ARCH_OBJECTIVE = {"encoder_decoder": "span_corruption", "decoder_only": "causal_lm"}


def make_loader(
    cfg: DataConfig,
    tok: Tokenizer,
    texts: Sequence[str] | Corpus,
    batch_size: int,
    split: Literal["train", "val"] = "train",
    model_arch: Literal["encoder_decoder", "decoder_only"] = "encoder_decoder",
    *,
    cache_dir: str | os.PathLike | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> BatchLoader:
    """Tokenize ``texts`` (cached) and return the packed batch iterator of one split.

    Args:
        cfg: data config (``objective``, ``input_length``, ``noise_density``, ``mean_noise_span_length``, ``seed``).
        tok: tokenizer (sentinels at the top of its vocabulary).
        texts: documents, or a :class:`Corpus` (its ``split`` texts are used and its token count recorded).
        batch_size: rows per batch on this rank.
        split: "train" (shuffled, new noise each epoch) or "val" (fixed order and noise).
        model_arch: "encoder_decoder" (needs ``data.objective=span_corruption``) or "decoder_only" (needs
            ``data.objective=causal_lm``).
        cache_dir: cache for the token array; None tokenizes every time.
        rank: this process's data-parallel rank.
        world_size: data-parallel ranks; each takes its own ``batch_size`` rows of every global batch.

    Returns:
        The :class:`BatchLoader`.
    """
    if model_arch not in _ARCH_OBJECTIVE:
        raise DataError(f"model_arch must be 'encoder_decoder' or 'decoder_only', got {model_arch!r}")
    if cfg.objective != _ARCH_OBJECTIVE[model_arch]:
        raise DataError(
            f"data.objective={cfg.objective!r} does not fit a {model_arch} model; set "
            f"data.objective={_ARCH_OBJECTIVE[model_arch]}"
        )
    if split not in _SPLIT_SALT:
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    corpus = texts if isinstance(texts, Corpus) else None
    if corpus is not None:
        texts = corpus.train_texts if split == "train" else corpus.val_texts
    if not texts:
        raise DataError(f"the {split} split has no documents; add text or change data.val_fraction")
    tokens = tokenize_texts(tok, texts, cache_dir)
    if corpus is not None:
        corpus.num_tokens[split] = int(len(tokens))
    return BatchLoader(
        tokens,
        batch_size=batch_size,
        input_length=cfg.input_length,
        arch=model_arch,
        split=split,
        seed=cfg.seed,
        first_sentinel_id=tok.sentinel_id(0) if tok.num_sentinels else None,
        num_sentinels=tok.num_sentinels,
        noise_density=cfg.noise_density,
        mean_noise_span_length=cfg.mean_noise_span_length,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        rank=rank,
        world_size=world_size,
    )
