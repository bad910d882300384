"""T5 span corruption, the Switch Transformer pretraining objective (paper §3: "drop 15% of tokens and replace
each masked span with a single sentinel"; mean span length 3 is the T5 default).

Pure numpy functions, no state. They reproduce the semantics of T5's ``random_spans_noise_mask``,
``noise_span_to_unique_sentinel`` / ``nonnoise_span_to_unique_sentinel`` and ``random_spans_helper``
(text-to-text-transfer-transformer ``t5/data/preprocessors.py``); only the random number generator differs
(numpy's ``Generator`` instead of TensorFlow's stateless ops), so masks have the same distribution, not the same bits.

Example (sentinels ``X0 = <extra_id_0>``, ``X1 = <extra_id_1>``)::

    tokens  = [a b c d e f g h]       noise = [. . x x . . . x]
    inputs  = [a b X0 e f g X1 EOS]
    targets = [X0 c d X1 h EOS]

:func:`span_corrupt_batch` does the same for a batch of equal-length chunks in one vectorised pass (the loader's
hot path); its randomness is a counter-based hash of a per-chunk key, so a chunk's noise does not depend on the
batch it is in.

Run the tests with ``pytest tests/data/test_span_corruption.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SentinelIds = int | Callable[[int], int]


def _counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """Number of noise tokens and noise spans for a sequence of ``length`` tokens (T5 rules, length >= 2).

    Python's ``round`` rounds half to even, like ``tf.round`` in T5.
    """
    num_noise_tokens = round(length * noise_density)
    # At least one noise token and at least one real token, so both segmentations below are non-empty.
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = max(round(num_noise_tokens / mean_noise_span_length), 1)
    # Guard that T5 lacks (only reachable with noise_density near 1 or mean span < 1): every span needs at least
    # one noise token and one preceding non-noise token.
    num_noise_spans = min(num_noise_spans, num_noise_tokens, length - num_noise_tokens)
    return num_noise_tokens, num_noise_spans


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``num_items`` into ``num_segments`` non-empty segments uniformly at random.

    Returns:
        int64 array [num_segments] of segment lengths summing to ``num_items``.
    """
    # T5: shuffle (range(num_items - 1) < num_segments - 1), prepend a 0, cumsum -> segment id of every item.
    first_in_segment = np.zeros(num_items, dtype=np.int64)
    first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.cumsum(first_in_segment)
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(
    length: int, rng: np.random.Generator, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> np.ndarray:
    """Noise mask with T5's ``random_spans_noise_mask`` semantics.

    ``round(length * noise_density)`` tokens are noise, grouped into ``round(num_noise / mean_noise_span_length)``
    spans. Noise and non-noise runs interleave, starting with non-noise and ending with noise (for length >= 2).

    Args:
        length: number of tokens.
        rng: numpy random generator (consumed).
        noise_density: fraction of tokens to corrupt.
        mean_noise_span_length: mean length of a corrupted span.

    Returns:
        bool array [length], True at noise tokens.
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_noise_span_length <= 0:
        raise ValueError(f"mean_noise_span_length must be > 0, got {mean_noise_span_length}")
    orig_length = length
    length = max(length, 2)  # T5 pads very short sequences to 2 and truncates the mask afterwards
    num_noise_tokens, num_noise_spans = _counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise_tokens, num_noise_spans, rng)
    nonnoise_lengths = _random_segmentation(length - num_noise_tokens, num_noise_spans, rng)
    # Runs alternate non-noise, noise, non-noise, noise, ...; the mask is the parity of the run index.
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)  # [2 * spans]
    run_id = np.repeat(np.arange(2 * num_noise_spans), interleaved)  # [length]
    return (run_id % 2 == 1)[:orig_length]


def _sentinel_table(sentinel_ids: SentinelIds | None, count: int) -> np.ndarray:
    """Ids of sentinels 0..count-1 (T5: the first sentinel is the largest id, then descending)."""
    if sentinel_ids is None:
        raise TypeError("span_corrupt needs sentinel_ids: pass tokenizer.sentinel_id or the id of <extra_id_0>")
    if callable(sentinel_ids):
        table = np.array([sentinel_ids(i) for i in range(count)], dtype=np.int64)  # one call per span, not token
    elif isinstance(sentinel_ids, int | np.integer):
        table = int(sentinel_ids) - np.arange(count, dtype=np.int64)
    else:
        raise TypeError(f"sentinel_ids must be an int or a callable i -> id, got {type(sentinel_ids).__name__}")
    if count and table.min() < 0:
        raise ValueError(f"sentinel_ids gives a negative id for one of {count} spans; use a larger first sentinel id")
    return table


def _replace_spans(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """Replace each run of ``mask`` by one sentinel (k-th run -> ``sentinels[k]``); keep the unmasked tokens."""
    prev = np.zeros_like(mask)
    prev[1:] = mask[:-1]
    first = mask & ~prev
    subsequent = mask & prev
    out = tokens.astype(np.int64, copy=True)
    run_index = np.cumsum(first) - 1  # index of the run a first token starts
    out[first] = sentinels[run_index[first]]
    return out[~subsequent]


def span_corrupt(
    tokens: np.ndarray,
    rng: np.random.Generator,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    sentinel_ids: SentinelIds | None = None,
    eos_id: int = 1,
    noise_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of one token sequence (paper §3).

    Inputs keep the non-noise tokens and replace each noise span by one sentinel; targets hold, for each noise span,
    its sentinel followed by the span's tokens. Both end with EOS. The k-th noise span uses sentinel k
    (``<extra_id_k>``) in both, so ``targets`` can be spliced back into ``inputs`` (see tests).

    Args:
        tokens: int array [length] of token ids, without EOS (EOS between documents inside a packed chunk is fine).
        rng: numpy random generator (consumed).
        noise_density: fraction of tokens to corrupt (0.15 in the paper).
        mean_noise_span_length: mean span length (3.0, the T5 default).
        sentinel_ids: ``tokenizer.sentinel_id`` (callable i -> id) or the id of ``<extra_id_0>``, in which case
            sentinel k is ``sentinel_ids - k`` (T5 layout: sentinels descend from the top of the vocabulary).
        eos_id: end-of-sequence id appended to inputs and targets.
        noise_mask: optional precomputed bool mask [length]; drawn with :func:`random_spans_noise_mask` if None.

    Returns:
        ``(inputs, targets)``, int64 arrays [length - num_noise + num_spans + 1] and [num_noise + num_spans + 1].

    Note:
        For length >= 2 the output equals T5's. A 1-token sequence has no noise; T5 then emits targets
        ``[<extra_id_0>, EOS]`` (a sentinel that marks nothing), we emit ``[EOS]``. Where T5 would fail (more spans
        than non-noise tokens, only with noise_density near 1), the span count is clamped.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
    if noise_mask is None:
        noise_mask = random_spans_noise_mask(len(tokens), rng, noise_density, mean_noise_span_length)
    noise_mask = np.asarray(noise_mask, dtype=bool)
    if noise_mask.shape != tokens.shape:
        raise ValueError(f"noise_mask shape {noise_mask.shape} != tokens shape {tokens.shape}")
    starts = noise_mask.copy()
    starts[1:] &= ~noise_mask[:-1]
    num_spans = int(starts.sum())
    sentinels = _sentinel_table(sentinel_ids, num_spans)
    inputs = _replace_spans(tokens, noise_mask, sentinels)
    # Targets: sentinel k, then the tokens of noise span k, for every span. For T5 masks (non-noise first, noise
    # last) this equals T5's nonnoise_span_to_unique_sentinel; written directly so any caller mask works.
    noise_pos = np.flatnonzero(noise_mask)
    is_start = starts[noise_pos]
    token_slot = np.arange(len(noise_pos)) + np.cumsum(is_start)  # each span start shifts later tokens by one
    targets = np.empty(len(noise_pos) + num_spans, dtype=np.int64)
    targets[token_slot] = tokens[noise_pos]
    targets[token_slot[is_start] - 1] = sentinels[:num_spans]
    eos = np.array([eos_id], dtype=np.int64)
    return np.concatenate([inputs, eos]), np.concatenate([targets, eos])


def span_corruption_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """Raw chunk length whose corruption fills ``inputs_length`` encoder positions exactly (T5's
    ``random_spans_helper``), and the resulting targets length.

    Both lengths include the EOS. Example: ``span_corruption_lengths(512) == (568, 114)`` (the T5X C4 default,
    paper §3) and ``span_corruption_lengths(128) == (141, 29)``.

    Args:
        inputs_length: encoder sequence length wanted.
        noise_density: fraction of corrupted tokens.
        mean_noise_span_length: mean span length.

    Returns:
        ``(raw_tokens_length, targets_length)``.
    """
    if inputs_length < 2:
        raise ValueError(f"inputs_length must be >= 2, got {inputs_length}")

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise, num_spans = _counts(max(tokens_length, 2), noise_density, mean_noise_span_length)
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:  # T5's hack to keep targets <= inputs
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


# ------------------------------------------------------------------------------------------------ batched version
# The loader corrupts whole batches of equal-length chunks at once. Randomness comes from a counter-based hash of a
# per-chunk key (splitmix64), so a chunk's noise depends only on its key, not on which batch or rank it lands in.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic)."""
    z = z.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def chunk_keys(*parts: int | np.ndarray) -> np.ndarray:
    """Hash integers (scalars or arrays, broadcast) into uint64 keys, e.g. ``chunk_keys(seed, split, epoch, ids)``."""
    key = np.zeros((), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for p in parts:
            key = _splitmix64(key * _GOLDEN + np.asarray(p).astype(np.uint64) + _GOLDEN)
    return np.atleast_1d(key)


def _random_subset_mask(keys: np.ndarray, stream: int, num_items: int, k: int) -> np.ndarray:
    """Per row, a uniformly random subset of ``k`` of ``num_items`` positions.

    Args:
        keys: uint64 [B] row keys.
        stream: distinguishes independent draws from the same keys.
        num_items: positions per row.
        k: positions chosen per row.

    Returns:
        bool [B, num_items], exactly ``k`` True per row.
    """
    B = len(keys)
    with np.errstate(over="ignore"):
        counters = (np.arange(num_items, dtype=np.uint64) + np.uint64(1)) * _GOLDEN  # [num_items]
        draws = _splitmix64(chunk_keys(keys, stream)[:, None] + counters[None, :])  # [B, num_items] iid uint64
    out = np.zeros((B, num_items), dtype=bool)
    if k > 0:
        chosen = np.argpartition(draws, k - 1, axis=1)[:, :k]  # the k smallest draws: O(num_items) per row
        out[np.arange(B)[:, None], chosen] = True
    return out


def _random_segmentation_batch(keys: np.ndarray, stream: int, num_items: int, num_segments: int) -> np.ndarray:
    """Batched :func:`_random_segmentation`: int64 [B, num_segments] lengths, each row summing to ``num_items``."""
    B = len(keys)
    # As T5: segment boundaries after a random (num_segments - 1)-subset of the first num_items - 1 items.
    cuts = _random_subset_mask(keys, stream, num_items - 1, num_segments - 1)  # [B, num_items - 1]
    cut_pos = np.nonzero(cuts)[1].reshape(B, num_segments - 1) + 1  # row-major: sorted within each row
    edges = np.concatenate([np.zeros((B, 1), np.int64), cut_pos, np.full((B, 1), num_items, np.int64)], axis=1)
    return np.diff(edges, axis=1)


def random_spans_noise_mask_batch(
    keys: np.ndarray, length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> np.ndarray:
    """Batched :func:`random_spans_noise_mask` for ``len(keys)`` sequences of ``length >= 2`` tokens.

    Same counts and same distribution (uniform random segmentations) as T5; row b's mask is a function of
    ``keys[b]`` only.

    Args:
        keys: uint64 [B] per-sequence keys (see :func:`chunk_keys`).
        length: tokens per sequence.
        noise_density: fraction of noise tokens.
        mean_noise_span_length: mean noise span length.

    Returns:
        bool [B, length], True at noise.
    """
    if length < 2:
        raise ValueError(f"length must be >= 2 for the batched mask, got {length}")
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
    B = len(keys)
    num_noise, num_spans = _counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation_batch(keys, 0, num_noise, num_spans)  # [B, S]
    nonnoise_lengths = _random_segmentation_batch(keys, 1, length - num_noise, num_spans)  # [B, S]
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=2).reshape(B, 2 * num_spans)
    run_starts = np.cumsum(interleaved, axis=1)[:, :-1]  # [B, 2S - 1], strictly increasing, < length
    indicator = np.zeros((B, length), dtype=np.int64)
    indicator[np.arange(B)[:, None], run_starts] = 1
    return np.cumsum(indicator, axis=1) % 2 == 1


def _replace_runs_batch(tokens: np.ndarray, mask: np.ndarray, first_sentinel_id: int) -> np.ndarray:
    """Row-wise :func:`_replace_spans` with sentinels ``first_sentinel_id - k``; rows must keep equal counts."""
    prev = np.zeros_like(mask)
    prev[:, 1:] = mask[:, :-1]
    first = mask & ~prev
    run_index = np.cumsum(first, axis=1) - 1
    out = np.where(first, first_sentinel_id - run_index, tokens.astype(np.int64))
    keep = ~(mask & prev)
    return out[keep].reshape(len(tokens), -1)


def span_corrupt_batch(
    tokens: np.ndarray,
    keys: np.ndarray,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    first_sentinel_id: int | None = None,
    eos_id: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Span-corrupt a batch of equal-length sequences at once (the loader's hot path).

    Row b equals ``span_corrupt(tokens[b], None, ..., noise_mask=random_spans_noise_mask_batch(keys, ...)[b])``.

    Args:
        tokens: int array [B, length], length >= 2.
        keys: uint64 [B] per-row keys.
        noise_density: fraction of corrupted tokens.
        mean_noise_span_length: mean span length.
        first_sentinel_id: id of ``<extra_id_0>``; sentinel k is ``first_sentinel_id - k``.
        eos_id: appended to inputs and targets.

    Returns:
        ``(inputs, targets)``: int64 [B, length - noise + spans + 1] and [B, noise + spans + 1].
    """
    if first_sentinel_id is None:
        raise TypeError("span_corrupt_batch needs first_sentinel_id (the id of <extra_id_0>)")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    B, length = tokens.shape
    mask = random_spans_noise_mask_batch(keys, length, noise_density, mean_noise_span_length)  # [B, length]
    # T5: inputs replace noise runs by sentinel k; targets replace the non-noise runs. Masks start with non-noise
    # and end with noise, so non-noise run k is followed by noise span k and gets sentinel k as well.
    inputs = _replace_runs_batch(tokens, mask, first_sentinel_id)
    targets = _replace_runs_batch(tokens, ~mask, first_sentinel_id)
    eos = np.full((B, 1), eos_id, dtype=np.int64)
    return np.concatenate([inputs, eos], axis=1), np.concatenate([targets, eos], axis=1)
