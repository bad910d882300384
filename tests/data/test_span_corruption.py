"""Span corruption (paper §3) against a literal numpy port of T5's preprocessors and against invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from switchformer.data.span_corruption import (
    chunk_keys,
    random_spans_noise_mask,
    random_spans_noise_mask_batch,
    span_corrupt,
    span_corrupt_batch,
    span_corruption_lengths,
)

EOS = 1
VOCAB = 2000  # sentinels: <extra_id_k> = VOCAB - 1 - k, k < NUM_SENTINELS
NUM_SENTINELS = 400  # hypothesis draws up to 300 spans


# ------------------------------------------------------- independent oracle: T5 preprocessors.py, line by line
def t5_random_spans_noise_mask(length, noise_density, mean_noise_span_length, rng):
    orig_length = length
    length = max(length, 2)
    num_noise_tokens = int(np.round(length * noise_density))
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = int(np.round(num_noise_tokens / mean_noise_span_length))
    num_noise_spans = max(num_noise_spans, 1)
    num_nonnoise_tokens = length - num_noise_tokens

    def _random_segmentation(num_items, num_segments):
        shuffled = rng.permutation((np.arange(num_items - 1) < num_segments - 1).astype(np.int32))
        first_in_segment = np.pad(shuffled, [1, 0])
        segment_id = np.cumsum(first_in_segment)
        segment_length = np.zeros(num_segments, dtype=np.int64)
        np.add.at(segment_length, segment_id, 1)  # tf.math.segment_sum(ones, segment_id)
        return segment_length

    noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans)
    nonnoise_span_lengths = _random_segmentation(num_nonnoise_tokens, num_noise_spans)
    interleaved = np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1).reshape(num_noise_spans * 2)
    span_starts = np.cumsum(interleaved)[:-1]
    span_start_indicator = np.zeros(length, dtype=np.int64)
    np.add.at(span_start_indicator, span_starts, 1)  # tf.math.unsorted_segment_sum
    span_num = np.cumsum(span_start_indicator)
    return (span_num % 2 == 1)[:orig_length]


def t5_noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size):
    prev_token_is_noise = np.pad(noise_mask[:-1], [1, 0])
    first_noise_tokens = noise_mask & ~prev_token_is_noise
    subsequent_noise_tokens = noise_mask & prev_token_is_noise
    sentinel = vocab_size - 1 + 1 - np.cumsum(first_noise_tokens.astype(np.int64))
    tokens = np.where(first_noise_tokens, sentinel, tokens)
    return tokens[~subsequent_noise_tokens]


def t5_span_corruption(tokens, noise_mask, vocab_size):
    inputs = t5_noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size)
    targets = t5_noise_span_to_unique_sentinel(tokens, ~noise_mask, vocab_size)  # nonnoise_span_to_unique_sentinel
    return np.append(inputs, EOS), np.append(targets, EOS)


def t5_is_defined(length, density, mean):
    """T5's segmentation fails when there are more spans than non-noise tokens (we clamp the span count)."""
    length = max(length, 2)
    num_noise = min(max(round(length * density), 1), length - 1)
    return max(round(num_noise / mean), 1) <= length - num_noise


def expand(inputs, targets):
    """Splice each target span back in place of its sentinel in the inputs (drops the EOS of both)."""
    spans, current = {}, None
    for t in targets[:-1]:
        if t >= VOCAB - NUM_SENTINELS:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans.pop(t) if t >= VOCAB - NUM_SENTINELS else [t])
    assert not spans, "every target span appears in the inputs"
    return out


lengths_st = st.integers(0, 600)
density_st = st.floats(0.05, 0.5)
mean_st = st.floats(1.0, 10.0)


@settings(max_examples=150, deadline=None)
@given(length=lengths_st, density=density_st, mean=mean_st, seed=st.integers(0, 2**32 - 1))
def test_mask_equals_t5_port(length, density, mean, seed):
    assume(t5_is_defined(length, density, mean))
    ours = random_spans_noise_mask(length, np.random.default_rng(seed), density, mean)
    ref = t5_random_spans_noise_mask(length, density, mean, np.random.default_rng(seed))
    np.testing.assert_array_equal(ours, ref)


@settings(max_examples=150, deadline=None)
@given(length=st.integers(2, 600), density=density_st, mean=mean_st, seed=st.integers(0, 2**32 - 1))
def test_corruption_equals_t5_port_and_reconstructs(length, density, mean, seed):
    # Length 0/1 differs on purpose: T5 emits a target sentinel that marks no span; we emit only EOS.
    assume(t5_is_defined(length, density, mean))
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB - NUM_SENTINELS, size=length)
    mask = t5_random_spans_noise_mask(length, density, mean, np.random.default_rng(seed + 1))
    inputs, targets = span_corrupt(tokens, None, density, mean, sentinel_ids=VOCAB - 1, noise_mask=mask)
    ref_in, ref_tgt = t5_span_corruption(tokens, mask, VOCAB)
    np.testing.assert_array_equal(inputs, ref_in)
    np.testing.assert_array_equal(targets, ref_tgt)
    assert expand(inputs, targets) == tokens.tolist()


@settings(max_examples=150, deadline=None)
@given(length=st.integers(2, 600), density=density_st, mean=mean_st, seed=st.integers(0, 2**32 - 1))
def test_mask_invariants(length, density, mean, seed):
    mask = random_spans_noise_mask(length, np.random.default_rng(seed), density, mean)
    num_noise = min(max(round(length * density), 1), length - 1)
    num_spans = min(max(round(num_noise / mean), 1), length - num_noise)  # clamped where T5 would fail
    assert mask.sum() == num_noise  # noise fraction = density up to rounding
    assert abs(mask.mean() - density) <= 0.5 / length + max(0.0, 1 / length - density) + 1e-9
    starts = mask & ~np.pad(mask[:-1], [1, 0])
    assert starts.sum() == num_spans
    assert not mask[0] and mask[-1]  # non-noise first, noise last (T5)
    inputs, targets = span_corrupt(np.arange(3, 3 + length), np.random.default_rng(seed), density, mean, VOCAB - 1)
    assert expand(inputs, targets) == list(range(3, 3 + length))
    assert len(inputs) == length - num_noise + num_spans + 1
    assert len(targets) == num_noise + num_spans + 1
    sentinels_in = inputs[inputs >= VOCAB - NUM_SENTINELS]
    np.testing.assert_array_equal(sentinels_in, VOCAB - 1 - np.arange(num_spans))  # <extra_id_0>, <extra_id_1>, ...
    np.testing.assert_array_equal(targets[targets >= VOCAB - NUM_SENTINELS], sentinels_in)
    assert targets[0] == VOCAB - 1 and inputs[-1] == EOS and targets[-1] == EOS


def test_callable_sentinels_match_int():
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    toks = np.arange(10, 210)
    a = span_corrupt(toks, rng_a, sentinel_ids=VOCAB - 1)
    b = span_corrupt(toks, rng_b, sentinel_ids=lambda i: VOCAB - 1 - i)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_worked_example():
    tokens = np.array([10, 11, 12, 13, 14, 15, 16, 17])
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1], dtype=bool)
    inputs, targets = span_corrupt(tokens, None, sentinel_ids=99, noise_mask=mask)
    assert inputs.tolist() == [10, 11, 99, 14, 15, 16, 98, EOS]
    assert targets.tolist() == [99, 12, 13, 98, 17, EOS]


def test_noise_density_statistic():
    # Every position is noise with probability ~density, and spans are spread over the whole sequence.
    rng = np.random.default_rng(0)
    masks = np.stack([random_spans_noise_mask(141, rng) for _ in range(2000)])
    assert masks.sum(1).tolist() == [21] * 2000  # round(141 * 0.15)
    per_position = masks[:, 10:-10].mean(0)
    assert np.all(np.abs(per_position - 21 / 141) < 0.05)


def test_lengths_helper():
    assert span_corruption_lengths(512) == (568, 114)  # T5X C4 default (paper §3: inputs 512 / targets 114)
    assert span_corruption_lengths(128) == (141, 29)
    for L in (16, 64, 128, 256, 512, 1024):
        raw, tgt = span_corruption_lengths(L)
        inputs, targets = span_corrupt(np.arange(3, 3 + raw), np.random.default_rng(L), sentinel_ids=VOCAB - 1)
        assert (len(inputs), len(targets)) == (L, tgt)  # packing fills the encoder exactly
        longer, _ = span_corrupt(np.arange(3, 4 + raw), np.random.default_rng(L), sentinel_ids=VOCAB - 1)
        assert len(longer) > L  # and raw is the longest chunk that fits


def test_errors():
    with pytest.raises(TypeError, match="sentinel_ids"):
        span_corrupt(np.arange(10), np.random.default_rng(0))
    with pytest.raises(ValueError, match="noise_density"):
        span_corrupt(np.arange(10), np.random.default_rng(0), noise_density=1.5, sentinel_ids=99)
    with pytest.raises(ValueError, match="1-D"):
        span_corrupt(np.zeros((2, 5), dtype=np.int64), np.random.default_rng(0), sentinel_ids=99)
    with pytest.raises(ValueError, match="negative"):
        span_corrupt(np.arange(100), np.random.default_rng(0), sentinel_ids=2)


# ------------------------------------------------------------------------------------------ batched (loader) path
@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(2, 600),
    batch=st.integers(1, 8),
    density=density_st,
    mean=mean_st,
    seed=st.integers(0, 2**32 - 1),
)
def test_batch_equals_single_and_keeps_t5_counts(length, batch, density, mean, seed):
    keys = chunk_keys(seed, np.arange(batch))
    masks = random_spans_noise_mask_batch(keys, length, density, mean)
    num_noise = min(max(round(length * density), 1), length - 1)
    num_spans = min(max(round(num_noise / mean), 1), length - num_noise)
    assert masks.shape == (batch, length)
    assert (masks.sum(1) == num_noise).all() and not masks[:, 0].any() and masks[:, -1].all()
    starts = masks & ~np.pad(masks[:, :-1], [(0, 0), (1, 0)])
    assert (starts.sum(1) == num_spans).all()
    tokens = np.random.default_rng(seed).integers(3, VOCAB - NUM_SENTINELS, size=(batch, length))
    inputs, targets = span_corrupt_batch(tokens, keys, density, mean, first_sentinel_id=VOCAB - 1)
    for b in range(batch):
        ref_in, ref_tgt = span_corrupt(tokens[b], None, sentinel_ids=VOCAB - 1, noise_mask=masks[b])
        np.testing.assert_array_equal(inputs[b], ref_in)
        np.testing.assert_array_equal(targets[b], ref_tgt)
        if t5_is_defined(length, density, mean):
            t5_in, t5_tgt = t5_span_corruption(tokens[b], masks[b], VOCAB)
            np.testing.assert_array_equal(inputs[b], t5_in)
            np.testing.assert_array_equal(targets[b], t5_tgt)
    # A row's noise depends only on its key, not on the rest of the batch.
    np.testing.assert_array_equal(random_spans_noise_mask_batch(keys[-1:], length, density, mean)[0], masks[-1])


def test_batch_mask_distribution_matches_t5():
    # Hash-based randomness vs T5's shuffles: compare the distribution of span lengths and of noise positions.
    n, length = 4000, 141
    ours = random_spans_noise_mask_batch(chunk_keys(7, np.arange(n)), length)
    rng = np.random.default_rng(7)
    ref = np.stack([t5_random_spans_noise_mask(length, 0.15, 3.0, rng) for _ in range(n)])

    def first_span_length(m):
        start = np.argmax(m, axis=1)
        after = np.where(np.arange(length)[None, :] >= start[:, None], ~m, False)
        return np.argmax(after, axis=1) - start

    for stat in (lambda m: m.mean(0)[5:-5], lambda m: np.bincount(first_span_length(m), minlength=25)[:10] / n):
        assert np.abs(stat(ours) - stat(ref)).max() < 0.04
    assert np.abs(first_span_length(ours).mean() - first_span_length(ref).mean()) < 0.1
