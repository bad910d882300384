"""Generation: KV cache == full recompute, beams, sampling, padding, EOS, router results."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from switchformer.models import GenerationRouting, build_model
from switchformer.models.generation import filter_logits, greedy_argmax


def _greedy_recompute(model, ids, mask, steps, eos=None, pad=0):
    """Oracle: no cache, the whole forward re-run for every new token."""
    enc_dec = model.config.arch == "encoder_decoder"
    cur = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id) if enc_dec else ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            if enc_dec:
                logits = model(ids, attention_mask=mask, decoder_input_ids=cur).logits
            else:
                m = None if mask is None else torch.cat([mask, torch.ones(ids.shape[0], cur.shape[1] - ids.shape[1],
                                                                         dtype=mask.dtype)], 1)
                logits = model(cur, attention_mask=m).logits
            nxt = logits[:, -1].argmax(-1)
            if eos is not None:
                nxt = nxt.masked_fill(done, pad)
                done |= nxt == eos
            cur = torch.cat([cur, nxt[:, None]], 1)
    return cur


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
@pytest.mark.parametrize("switch_attention", [False, True])
def test_cache_equals_recompute(make_cfg, arch, switch_attention):
    model = build_model(make_cfg(arch=arch, decoder_sparse_step=1, switch_attention=switch_attention)).eval()
    ids = torch.randint(2, 64, (3, 6))
    got = model.generate(ids, max_new_tokens=7)
    ref = _greedy_recompute(model, ids, None, 7)
    assert torch.equal(got, ref)
    assert got.shape == ((3, 8) if arch == "encoder_decoder" else (3, 13))


def test_padded_batch_generation_matches_single_rows(make_cfg):
    for arch in ("encoder_decoder", "decoder_only"):
        model = build_model(make_cfg(arch=arch)).eval()
        rows = [torch.randint(2, 64, (n,)) for n in (3, 6, 5)]
        ids = torch.full((3, 6), 7, dtype=torch.long)  # junk under the padding
        mask = torch.zeros(3, 6, dtype=torch.long)
        for i, r in enumerate(rows):  # right padding; decoder-only moves it to the left internally
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=5)
        for i, r in enumerate(rows):
            single = model.generate(r[None], max_new_tokens=5)
            assert torch.equal(batch[i, -5:], single[0, -5:]), (arch, i)
            if arch == "decoder_only":  # prompt returned left-padded, padding shown as the pad id
                assert torch.equal(batch[i, :6][6 - len(r):], r)
                assert (batch[i, : 6 - len(r)] == 0).all()


def test_left_padded_prompt_recompute(make_cfg):
    model = build_model(make_cfg(arch="decoder_only")).eval()
    ids = torch.randint(2, 64, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    ids[0, :2] = 0
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(got, _greedy_recompute(model, ids, mask, 6))


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_beam1_equals_greedy_and_topk1_sampling_equals_greedy(make_cfg, arch):
    model = build_model(make_cfg(arch=arch)).eval()
    ids = torch.randint(2, 64, (2, 5))
    greedy = model.generate(ids, max_new_tokens=6)
    assert torch.equal(model.generate(ids, max_new_tokens=6, num_beams=1, length_penalty=0.5), greedy)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=1, generator=g), greedy)


def _sequence_logprob(model, ids, dec):
    """Sum of log-probs of dec[:, 1:] under teacher forcing (encoder-decoder)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, decoder_input_ids=dec[:, :-1]).logits.float(), -1)
    return logp.gather(-1, dec[:, 1:, None]).squeeze(-1).sum(-1)


def test_beam_search_beats_or_ties_greedy(make_cfg):
    model = build_model(make_cfg(encoder_sparse_step=0, decoder_sparse_step=0)).eval()
    ids = torch.randint(2, 64, (4, 5))
    greedy = model.generate(ids, max_new_tokens=5)
    beam = model.generate(ids, max_new_tokens=5, num_beams=4, length_penalty=0.0)
    assert beam.shape == greedy.shape
    assert (_sequence_logprob(model, ids, beam) >= _sequence_logprob(model, ids, greedy) - 1e-5).all()


def test_beam_search_exhaustive_small_vocab(make_cfg):
    """With beams >= vocab**(steps-1) beam search is exact: compare with brute force over all sequences."""
    model = build_model(make_cfg(vocab_size=4, encoder_sparse_step=0, decoder_sparse_step=0)).eval()
    ids = torch.randint(0, 4, (1, 5))
    beam = model.generate(ids, max_new_tokens=3, num_beams=16, length_penalty=0.0)
    seqs = torch.cartesian_prod(torch.arange(4), torch.arange(4), torch.arange(4))
    dec = torch.cat([torch.zeros(64, 1, dtype=torch.long), seqs], 1)
    scores = _sequence_logprob(model, ids.expand(64, -1), dec)
    assert torch.equal(beam[0], dec[scores.argmax()])


def test_eos_stops_and_pads(make_cfg):
    model = build_model(make_cfg(arch="decoder_only")).eval()
    ids = torch.randint(2, 64, (3, 4))
    free = model.generate(ids, max_new_tokens=8)
    eos = int(free[0, 5])  # the token row 0 emits at its 2nd step
    out = model.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=63)
    ref = _greedy_recompute(model, ids, None, out.shape[1] - 4, eos=eos, pad=63)
    assert torch.equal(out, ref)
    gen = out[0, 4:]
    first = int((gen == eos).nonzero()[0])
    assert (gen[first + 1:] == 63).all()
    # all rows finished -> stops early
    if ((out[:, 4:] == eos).any(1)).all():
        assert out.shape[1] < 12


def test_return_router(make_cfg):
    model = build_model(make_cfg(decoder_sparse_step=1)).eval()
    ids = torch.randint(2, 64, (2, 5))
    out, routing = model.generate(ids, max_new_tokens=3, return_router=True)
    assert isinstance(routing, GenerationRouting)
    assert torch.equal(out, model.generate(ids, max_new_tokens=3))
    assert [r.name for r in routing.encoder] == ["encoder.block.1"]
    assert len(routing.steps) == 3 and [r.name for r in routing.steps[0]] == ["decoder.block.0", "decoder.block.1"]
    assert all(int(r.num_tokens) == 2 and int(r.dropped_tokens) == 0 for s in routing.steps for r in s)


def test_generation_restores_capacity_and_mode(make_cfg):
    cfg = make_cfg()
    cfg.moe.eval_capacity_factor = 1.0
    model = build_model(cfg).train()
    model.generate(torch.randint(2, 64, (2, 5)), max_new_tokens=2)
    assert model.training
    assert model.encoder.block[1].layer[1].mlp.eval_capacity_factor == 1.0


def test_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    p = torch.softmax(logits, -1)[0]  # sorted: 3 (0.64), 2 (0.24), 1 (0.09), 0 (0.03)
    kept = ~torch.isinf(filter_logits(logits, top_p=float(p[1]) + 1e-3))
    assert kept.tolist() == [[False, True, True, False]]
    assert (~torch.isinf(filter_logits(logits, top_p=0.01))).sum() == 1


def test_bad_generate_args(make_cfg):
    model = build_model(make_cfg())
    ids = torch.randint(2, 64, (1, 3))
    for kw, match in (({"max_new_tokens": -1}, "max_new_tokens"), ({"temperature": 0.0}, "temperature"),
                      ({"top_p": 0.0}, "top_p"), ({"num_beams": 2, "do_sample": True}, "beam"),
                      ({"num_beams": 0}, "num_beams")):
        with pytest.raises(ValueError, match=match):
            model.generate(ids, **kw)


@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_decode_fast_path_under_bfloat16_autocast(make_cfg, proj):
    """Generation under bf16 autocast: both decode methods run (the ragged kernel writes into a preallocated
    output, which autocast cannot retype) and agree with the general layer at bfloat16's resolution."""
    from switchformer.moe import switch_ffn_decode

    model = build_model(make_cfg(feed_forward_proj=proj)).eval()
    mlp = model.decoder.block[1].layer[2].mlp
    x = torch.randn(5, 1, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = mlp(x)
        for method in ("gather", "loop"):
            got = switch_ffn_decode(mlp, x, None, method=method)
            torch.testing.assert_close(got.float(), ref.float(), rtol=0.05, atol=0.02)


@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_decode_fast_path_equals_switch_layer(make_cfg, proj):
    from switchformer.moe import decode_fast_path_ok, switch_ffn_decode

    model = build_model(make_cfg(feed_forward_proj=proj)).eval()
    mlp = model.decoder.block[1].layer[2].mlp
    x = torch.randn(5, 1, 32)
    mask = torch.tensor([True, False, True, True, True])[:, None]
    assert decode_fast_path_ok(mlp, x)  # dropless eval config
    with torch.no_grad():
        ref, _ = mlp(x, padding_mask=mask)
        for method in ("gather", "loop"):
            torch.testing.assert_close(switch_ffn_decode(mlp, x, mask, method=method), ref, rtol=1e-5, atol=1e-6)
    mlp.eval_capacity_factor = 1.0
    assert not decode_fast_path_ok(mlp, x)  # a finite capacity could drop tokens: use the general layer
    # Capacities that no routing group can exceed: the fast path is exact.
    for factor, capacity in ((4.0, None), (1.0, 1), (None, 3)):
        mlp.eval_capacity_factor, mlp.expert_capacity = factor, capacity
        assert decode_fast_path_ok(mlp, x), (factor, capacity)
        with torch.no_grad():
            ref, aux = mlp(x, padding_mask=mask)
            assert int(aux.dropped_tokens) == 0
            torch.testing.assert_close(switch_ffn_decode(mlp, x, mask), ref, rtol=1e-5, atol=1e-6)
    mlp.expert_capacity = 1  # per sequence: two tokens per row could overflow it
    assert not decode_fast_path_ok(mlp, torch.randn(5, 2, 32))
    mlp.train()
    assert not decode_fast_path_ok(mlp, x)


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_fixed_capacity_generation_fast_path_equals_general_layer(make_cfg, arch):
    """dropless=False with transformers' per-sequence capacity: the decode steps take the fast path (one token per
    sequence cannot overflow it); return_router=True runs the general layer; same tokens."""
    moe = make_cfg().moe
    cfg = make_cfg(arch=arch, decoder_sparse_step=1, moe=dataclasses.replace(moe, expert_capacity=2))
    model = build_model(cfg).eval()
    ids = torch.randint(2, 64, (4, 6))
    fast = model.generate(ids, max_new_tokens=6, dropless=False)
    slow, _ = model.generate(ids, max_new_tokens=6, dropless=False, return_router=True)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_padded_batch_beam_search_matches_single_rows(make_cfg, arch):
    model = build_model(make_cfg(arch=arch, encoder_sparse_step=0, decoder_sparse_step=0)).eval()
    rows = [torch.randint(2, 64, (n,)) for n in (4, 6)]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    kw = dict(max_new_tokens=5, num_beams=3, eos_token_id=3)
    batch = model.generate(ids, attention_mask=mask, **kw)
    for i, r in enumerate(rows):
        single = model.generate(r[None], **kw)
        n = single.shape[1] - (1 if arch == "encoder_decoder" else len(r))  # generated tokens of the single row
        tail = batch[i, -(batch.shape[1] - (1 if arch == "encoder_decoder" else 6)):]
        assert torch.equal(tail[:n], single[0, -n:]), i
        assert (tail[n:] == 0).all()  # the batch ran longer for the other row: pad after EOS


def test_chunked_cached_decoding_equals_full_forward(make_cfg):
    """Several new tokens at a nonzero cache position (the t > 1 mask path) match the uncached forward."""
    model = build_model(make_cfg(arch="decoder_only", decoder_sparse_step=0)).eval()
    ids = torch.randint(2, 64, (2, 9))
    with torch.inference_mode():
        full = model(ids).logits
        cache = model.init_cache(2, 300, None)  # long max_length: the bias table is O(max_length)
        assert cache.self_bias.shape == (1, 4, 1, 300)
        a, _ = model.decode_step(ids[:, :4], cache, last_only=False)
        b, _ = model.decode_step(ids[:, 4:7], cache, last_only=False)
        c, _ = model.decode_step(ids[:, 7:8], cache)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full[:, :8], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_decode_step_fast_path_equals_module_path(make_cfg, arch):
    """The eval fast path (fused QKV projection, skinny vocabulary product) equals the module-by-module step."""
    model = build_model(make_cfg(arch=arch, decoder_sparse_step=2)).eval()
    ids = torch.randint(2, 64, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    with torch.inference_mode():
        caches = []
        for fast in (True, False):
            if arch == "encoder_decoder":
                enc, _ = model.encode(ids, mask.bool(), collect_router=False)
                cache, _ = model.init_cache(enc, mask.bool(), 8)
                first = torch.full((3, 1), model.config.decoder_start_token_id)
            else:
                cache = model.init_cache(3, 14, None)
                first = ids
            if not fast:
                cache.qkv = None  # forces the module path
            caches.append((cache, first))
        (fast_cache, cur), (slow_cache, _) = caches
        for _ in range(5):
            a, _ = model.decode_step(cur, fast_cache)
            b, _ = model.decode_step(cur, slow_cache)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fast_cache.kv, slow_cache.kv, rtol=1e-5, atol=1e-6)
            cur = a[:, -1].argmax(-1)[:, None]


def test_vocab_logits_decode_equals_linear():
    from switchformer.models.blocks import vocab_logits

    w = torch.randn(40000, 16)  # tall and large enough for the skinny product
    for shape in ((5, 1, 16), (2, 3, 16), (4, 16), (70, 1, 16)):  # 70 rows: above the skinny limit, F.linear
        h = torch.randn(*shape)
        got = vocab_logits(h, w, decode=True)
        assert got.shape == (*shape[:-1], 40000)
        torch.testing.assert_close(got, torch.nn.functional.linear(h, w), rtol=1e-5, atol=1e-5)
    assert torch.equal(vocab_logits(h, w), torch.nn.functional.linear(h, w))


def test_decode_linear_picks_the_skinny_product_only_for_large_tall_weights():
    from switchformer.models.blocks import decode_linear

    h = torch.randn(8, 1, 512)
    tall = torch.randn(2048, 512) * 0.05
    got = decode_linear(h, tall)
    assert not got.is_contiguous()  # the transposed (weight @ h.T).T view
    torch.testing.assert_close(got, torch.nn.functional.linear(h, tall), rtol=1e-5, atol=1e-5)
    for w in (torch.randn(512, 2048), torch.randn(384, 128)):  # wide, or too small: exactly F.linear
        x = torch.randn(8, 1, w.shape[1])
        assert torch.equal(decode_linear(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("activation", ["relu", "gated-gelu"])
def test_dense_ffn_decode_equals_forward(activation):
    from switchformer.models.blocks import DenseFFN

    ffn = DenseFFN(512, 2048, activation, dropout=0.1).eval()
    x = torch.randn(8, 1, 512)
    with torch.no_grad():
        torch.testing.assert_close(ffn.decode(x), ffn(x), rtol=1e-5, atol=1e-6)


def test_greedy_argmax_equals_torch_argmax():
    """The NumPy path picks exactly torch's index: first of tied maxima, NaN counted as maximal, strided views."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g)
    logits[1, [3, 700]] = 50.0  # a tie: the first index wins
    logits[2, 10] = float("nan")  # NaN wins over any number
    logits[3, [5, 9]] = float("nan")  # the first NaN
    logits[4] = float("-inf")  # all -inf: index 0
    logits[5, -1] = float("inf")
    transposed = logits.T.contiguous().T  # the [V, B]-backed view that vocab_logits returns on CPU
    for x in (logits, transposed, logits[:, ::3]):
        assert torch.equal(greedy_argmax(x), x.argmax(-1))
    assert greedy_argmax(logits).dtype == torch.long
    double = logits.double()  # other dtypes keep torch's argmax
    assert torch.equal(greedy_argmax(double), double.argmax(-1))
