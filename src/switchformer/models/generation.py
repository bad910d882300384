"""Generation for both model kinds: greedy, sampling (temperature, top-k, top-p) and beam search, with a KV cache.

    ids = model.generate(input_ids, attention_mask=mask, max_new_tokens=20)                       # greedy
    ids = model.generate(input_ids, do_sample=True, temperature=0.8, top_p=0.9, generator=g)      # sampling
    ids = model.generate(input_ids, num_beams=4, length_penalty=1.0, eos_token_id=1)              # beam search
    ids, routing = model.generate(input_ids, return_router=True)                                  # + router results

Returned ids: the encoder-decoder returns decoder ids starting with ``decoder_start_token_id`` (like transformers);
the decoder-only model returns prompt + continuation, with the prompt *left-padded* (a right-padded prompt is moved
to the left, so every row's continuation starts in the same column). Rows that emitted EOS keep emitting the pad id;
the loop stops as soon as every row has finished.

Speed (generation is Python-overhead bound at small sizes; measurements in ``GENERATION_NOTE``):
- one preallocated cache tensor ``[L, 2, B, H, max_len, Dh]`` written in place; beam reordering is a single
  ``index_select``;
- the causal relative position bias is computed once per distance (``init_cache``, O(max_len) memory); a step
  slices it;
- cross-attention keys/values are projected once, before the loop;
- prefill computes logits for the last position only; ``torch.inference_mode``; no per-step host syncs except the
  "all rows finished?" check when ``eos_token_id`` is set;
- an eval fast path in ``decode_step`` (when no router results are collected): one fused QKV projection per layer
  (``DecoderCache.qkv``, stacked in ``init_cache``), no module-call overhead, the Switch FFN's few-token path
  (``switchformer.moe.switch_ffn_decode``, also under a fixed capacity that one token per sequence cannot exceed)
  and, on CPU, the vocabulary product and other tall projections as ``weight @ h.T`` (``blocks.decode_linear``);
- greedy picks tokens with ``greedy_argmax`` (NumPy's argmax on CPU, faster than torch's on a vocabulary row).

Routing during generation: eval mode (dropout off, no jitter) and **dropless** by default (``dropless=True``: every
SwitchFFN's eval capacity factor and fixed ``expert_capacity`` are set to None for the call and restored afterwards).
A decode step routes only B tokens, so a capacity computed from them would drop tokens depending on which other rows
are in the batch; dropless makes each row's output independent of its batch (transformers' per-sequence capacity of
64 never binds at one token per step either). Pass ``dropless=False`` to keep the configured eval capacity.

``return_router=True`` returns ``(ids, GenerationRouting)``: ``.encoder`` holds the encoder's router results (and
Switch-attention K/V routers of the cross-attention), ``.steps[s]`` the decoder's results of step s (step 0 is the
prompt prefill for decoder-only models). In beam search the rows are the ``batch * num_beams`` beams of that step.

Beam search keeps ``num_beams`` hypotheses per row ranked by summed log-probability; a finished beam stays in the beam
with a frozen score (it can only be extended by pad at log-prob 0), and at the end the best beam maximises
``score / generated_length ** length_penalty``. With ``num_beams=1`` it is exactly greedy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class DecoderCache:
    """State of a cached decoder during generation.

    Attributes:
        kv: self-attention keys/values ``[L, 2, B, H, max_len, Dh]``.
        self_bias: causal relative position bias by distance ``[1, H, 1, max_len]``, reversed
            (``Attention.causal_bias_table``; a step slices it with ``Attention.step_bias``).
        key_mask: ``[B, max_len]`` bool, False for padded prompt positions (decoder-only), or None.
        cross_kv: per decoder layer ``(k, v)`` each ``[B, H, S, Dh]`` (encoder-decoder), or None.
        cross_mask: ``[B, 1, 1, S]`` additive encoder-padding mask, or None.
        pos: positions written so far.
        qkv: per decoder layer the fused self-attention projection ``Attention.fused_qkv_weight()`` (the eval-mode
            fast path), or None.
    """

    kv: torch.Tensor
    self_bias: torch.Tensor
    key_mask: torch.Tensor | None = None
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    cross_mask: torch.Tensor | None = None
    pos: int = 0
    qkv: list[torch.Tensor | None] | None = None
    layer_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Per-layer (k, v) views of ``kv``, made once: ``reorder`` writes ``kv`` in place, so they stay valid.
        self.layer_kv = [(self.kv[i, 0], self.kv[i, 1]) for i in range(self.kv.shape[0])]

    def fast_path_ok(self, training: bool, collect_router: bool) -> bool:
        """Whether ``decode_step`` may take the eval fast path: eval mode, no router results wanted, and fused
        projections available (dense attention; Switch attention has none)."""
        return not training and not collect_router and self.qkv is not None and self.qkv[0] is not None

    def reorder(self, index: torch.Tensor, *, self_attention_only: bool = False) -> None:
        """Select/reorder batch rows (beam search): row b of the result is old row ``index[b]``.

        ``self_attention_only``: the caller guarantees that ``index`` only permutes rows holding identical
        cross-attention states and prompt masks (beams of one input), so only the self-attention cache moves.
        """
        self.kv[:, :, :, :, : self.pos] = self.kv[:, :, :, :, : self.pos].index_select(2, index)
        if self_attention_only:
            return
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)
        if self.cross_kv is not None:
            # Beams of one row share the encoder output, but rows may move across the batch; index all the same.
            self.cross_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv]
        if self.cross_mask is not None:
            self.cross_mask = self.cross_mask.index_select(0, index)


@dataclass
class GenerationRouting:
    """Router results gathered during ``generate(..., return_router=True)``.

    Attributes:
        encoder: encoder router results (encoder-decoder; empty for decoder-only) plus Switch-attention routers of
            the once-computed cross-attention keys/values.
        steps: ``steps[s]`` is the list of decoder ``MoEAux`` results of decoding step s.
    """

    encoder: list = field(default_factory=list)
    steps: list[list] = field(default_factory=list)


@contextlib.contextmanager
def generation_mode(model: torch.nn.Module, dropless: bool):
    """Eval mode (restored after) and, when ``dropless``, SwitchFFN capacities set to None for the duration."""
    from switchformer.moe import SwitchFFN

    was_training = model.training
    modules = list(model.modules())
    # model.eval()/train() walk every module through nn.Module.__setattr__ (~ms at generation's scale): skip them
    # when every module already is in eval mode (then train(False) afterwards would change nothing either).
    switch_mode = any(m.training for m in modules)
    saved = []
    if dropless:
        for m in modules:
            if isinstance(m, SwitchFFN):
                saved.append((m, m.eval_capacity_factor, m.expert_capacity))
                m.eval_capacity_factor, m.expert_capacity = None, None
    if switch_mode:
        model.eval()
    try:
        yield
    finally:
        for m, factor, capacity in saved:
            m.eval_capacity_factor, m.expert_capacity = factor, capacity
        if switch_mode:
            model.train(was_training)


def left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """Move padding to the left of each row, keeping the order of real tokens. Returns (ids, bool mask or None).

    The relative position bias depends on distances only, so a left-padded prompt gives the same continuation as the
    unpadded one once padded keys are masked.
    """
    if attention_mask is None:
        return input_ids, None
    mask = attention_mask.bool()
    if bool(mask.all()):
        return input_ids, None
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # False (0) first, real tokens in order
    return input_ids.gather(1, order), mask.gather(1, order)


GENERATION_NOTE = "benchmarks/results/generation_decode_step_cpu_2026-11-29.md"
"""Where the decode-step measurements behind the fast path's choices are recorded."""


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` for ``[B, V]`` logits; on CPU in float32 it runs through NumPy.

    torch's CPU argmax walks a row element by element and is several times slower than NumPy's on the logits of a
    decode step (``GENERATION_NOTE``). Both return the first maximal index and treat NaN as maximal (tested in
    tests/models/test_generation.py), so greedy tokens do not change.
    """
    cpu_float = logits.device.type == "cpu" and logits.dtype == torch.float32
    if cpu_float and logits.dim() == 2 and not logits.requires_grad:
        return torch.from_numpy(np.ascontiguousarray(logits.numpy()).argmax(-1))
    return logits.argmax(-1)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: removed entries become -inf. ``logits`` ``[B, V]`` float."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Remove a token when the mass before it already reaches top_p (the top token always stays).
        remove_sorted = (probs.cumsum(-1) - probs) >= top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _check_args(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, length_penalty) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use do_sample=False for greedy")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables), got {top_p}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    if num_beams > 1 and do_sample:
        raise ValueError("beam sampling is not supported: use num_beams > 1 with do_sample=False, or num_beams=1")
    if not isinstance(length_penalty, (int, float)):
        raise TypeError(f"length_penalty must be a number, got {type(length_penalty).__name__}")


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    return_router: bool = False,
    dropless: bool = True,
    generator: torch.Generator | None = None,
):
    """Generate with a KV cache. See the module docstring for the conventions.

    Args:
        model: a ``SwitchTransformer`` or ``SwitchDecoderLM``.
        input_ids: ``[B, P]`` encoder input (encoder-decoder) or prompt (decoder-only).
        attention_mask: ``[B, P]`` 1 = real token.
        max_new_tokens: tokens to generate per row (fewer if every row reaches EOS).
        do_sample: sample instead of argmax.
        temperature, top_k, top_p: sampling controls (top_k 0 and top_p 1.0 disable them).
        num_beams: beam width (1 = greedy / sampling).
        length_penalty: beam search final ranking ``score / length ** length_penalty``.
        eos_token_id: stop a row when it emits this id (None: always generate max_new_tokens).
        pad_token_id: id emitted by finished rows (default ``model.config.pad_token_id``).
        return_router: also return a ``GenerationRouting``.
        dropless: route without capacity during generation (see module docstring).
        generator: torch.Generator for reproducible sampling.

    Returns:
        ``ids`` ``[B, prefix + n]``, or ``(ids, GenerationRouting)`` when ``return_router``.
    """
    from switchformer.models.blocks import check_ids, check_mask

    _check_args(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, length_penalty)
    check_ids("input_ids", input_ids)
    check_mask("attention_mask", attention_mask, input_ids)
    cfg = model.config
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    B, K = input_ids.shape[0], num_beams
    routing = GenerationRouting()
    with generation_mode(model, dropless):
        device = model.shared.weight.device
        input_ids = input_ids.to(device)
        if getattr(model, "is_encoder_decoder", False):
            mask = None if attention_mask is None else attention_mask.to(device).bool()
            enc, enc_routers = model.encode(input_ids, mask, collect_router=return_router)
            if K > 1:
                enc = enc.repeat_interleave(K, 0)
                mask = None if mask is None else mask.repeat_interleave(K, 0)
            cache, cross_routers = model.init_cache(enc, mask, 1 + max_new_tokens, collect_router=return_router)
            routing.encoder = enc_routers + cross_routers
            prefix = torch.full((B * K, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
            step_mask = None
        else:
            ids, mask = left_pad(input_ids, None if attention_mask is None else attention_mask.to(device))
            if mask is not None:  # the returned prompt shows padding as the pad id, whatever the input held there
                ids = ids.masked_fill(~mask, pad)
            if K > 1:
                ids = ids.repeat_interleave(K, 0)
                mask = None if mask is None else mask.repeat_interleave(K, 0)
            cache = model.init_cache(ids.shape[0], ids.shape[1] + max_new_tokens, mask)
            prefix, step_mask = ids, mask

        out = torch.full((B * K, max_new_tokens), pad, dtype=torch.long, device=device)
        finished = torch.zeros(B * K, dtype=torch.bool, device=device)
        cur = prefix
        if K > 1:
            beam_scores = torch.zeros(B, K, device=device)
            beam_scores[:, 1:] = float("-inf")  # all beams start identical: expand beam 0 only
            beam_scores = beam_scores.view(-1)
            lengths = torch.zeros(B * K, dtype=torch.long, device=device)
            row_base = (torch.arange(B, device=device) * K)[:, None]
            pad_row = torch.full((1, cfg.vocab_size), float("-inf"), device=device)
            pad_row[0, pad] = 0.0
        steps = 0
        for step in range(max_new_tokens):
            logits, step_routers = model.decode_step(
                cur, cache, padding_mask=step_mask, collect_router=return_router, last_only=True
            )
            if return_router:
                routing.steps.append(step_routers)
            logits = logits[:, -1].float()
            if K == 1:
                if do_sample:
                    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                else:
                    nxt = greedy_argmax(logits)
                if eos_token_id is not None:
                    nxt = nxt.masked_fill(finished, pad)
                    finished = finished | (nxt == eos_token_id)
            else:
                V = logits.shape[-1]
                logp = torch.log_softmax(logits, dim=-1)
                if eos_token_id is not None:
                    logp = torch.where(finished[:, None], pad_row, logp)
                cand = (beam_scores[:, None] + logp).view(B, K * V)
                top_scores, top_idx = cand.topk(K, dim=-1)  # [B, K]
                src = (row_base + top_idx // V).view(-1)
                nxt = (top_idx % V).view(-1)
                beam_scores = top_scores.view(-1)
                was_finished = finished.index_select(0, src)
                lengths = lengths.index_select(0, src) + (~was_finished).long()
                finished = was_finished | (nxt == eos_token_id) if eos_token_id is not None else was_finished
                out = out.index_select(0, src)
                cache.reorder(src, self_attention_only=True)  # src stays within each input's K beams
            out[:, step] = nxt
            cur = nxt[:, None]
            steps = step + 1
            if eos_token_id is not None:
                step_mask = ~finished[:, None]
                if bool(finished.all()):
                    break
            else:
                step_mask = None

        out = out[:, :steps]
        if K > 1:
            # The K beams of a row share their prefix (start token / prompt), so only `out` was reordered.
            final = beam_scores / lengths.clamp(min=1).float() ** length_penalty
            best = final.view(B, K).argmax(-1) + row_base.view(-1)
            out, prefix = out.index_select(0, best), prefix.index_select(0, best)
        ids = torch.cat([prefix, out], dim=1)
    return (ids, routing) if return_router else ids
