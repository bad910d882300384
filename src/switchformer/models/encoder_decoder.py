"""The Switch Transformer encoder-decoder in the T5 v1.0 style of the released checkpoints (paper §2, Table 9).

    from switchformer.models import build_model
    from switchformer.models.presets import get_preset
    model = build_model(get_preset("tiny"))
    out = model(input_ids, attention_mask=mask, labels=labels)   # out.loss = out.lm_loss + out.aux_loss
    ids = model.generate(input_ids, attention_mask=mask, max_new_tokens=20)

Pre-norm RMSNorm, relative position bias (bidirectional in the encoder, causal in the decoder, owned by block 0 of
each stack), no biases, tied embeddings with d_model**-0.5 output scaling, dropout, cross-attention; a Switch FFN in
block i when ``step == 1 or i % step == 1`` (transformers' convention), a dense FFN elsewhere. ``encoder_sparse_step =
decoder_sparse_step = 0`` is the FLOP-matched dense T5 baseline. The module tree uses transformers' key names.

Everything the model computes is in this file, top to bottom: ``encode``, ``decode``, ``forward``, and the cached
single-step decoder that ``generation.py`` drives (``init_cache``, ``decode_step``).
"""

from __future__ import annotations

import torch
from torch import nn

from switchformer.config import ModelConfig
from switchformer.models.blocks import (
    ModelOutput,
    Stack,
    add_router,
    add_routers,
    check_ids,
    check_mask,
    drop_full_mask,
    init_weights,
    lm_loss,
    mask_value,
    vocab_logits,
    weighted_aux_loss,
)
from switchformer.models.generation import DecoderCache, generate
from switchformer.moe import MoEAux


def shift_right(labels: torch.Tensor, decoder_start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """T5 teacher forcing: ``[start, y_0, ..., y_{T-2}]`` with the -100 (ignored) labels replaced by the pad id."""
    shifted = labels.new_empty(labels.shape)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


class SwitchTransformer(nn.Module):
    """T5 v1.0 encoder-decoder with Switch FFNs (or the dense T5 baseline when both sparse steps are 0).

    Args:
        cfg: a ``ModelConfig`` with ``arch == "encoder_decoder"``.
        init: apply the paper's init (§2.4); False leaves the default torch init (e.g. before loading weights, or on
            the meta device).
    """

    is_encoder_decoder = True

    def __init__(self, cfg: ModelConfig, *, init: bool = True) -> None:
        super().__init__()
        if cfg.arch != "encoder_decoder":
            raise ValueError(f"SwitchTransformer needs cfg.arch='encoder_decoder', got {cfg.arch!r}; use build_model")
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(
            cfg, num_layers=cfg.num_layers, sparse_step=cfg.encoder_sparse_step, is_decoder=False,
            cross_attention=False,
        )
        self.decoder = Stack(
            cfg, num_layers=cfg.num_decoder_layers, sparse_step=cfg.decoder_sparse_step, is_decoder=True,
            cross_attention=True,
        )
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if init:
            init_weights(self, cfg)

    # ------------------------------------------------------------------------------------------ pieces

    def output_logits(self, h: torch.Tensor, *, decode: bool = False) -> torch.Tensor:
        """Tied: ``(h * d_model**-0.5) @ shared.weight.T`` (T5 v1.0 / Mesh TF rescale); untied: ``lm_head(h)``.

        ``decode=True``: a generation step's few rows (``blocks.vocab_logits``: a faster product on CPU).
        """
        if self.config.tie_word_embeddings:
            return vocab_logits(h * self.config.d_model**-0.5, self.shared.weight, decode=decode)
        return vocab_logits(h, self.lm_head.weight, decode=decode)

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, collect_router: bool = True
    ) -> tuple[torch.Tensor, list[MoEAux]]:
        """Run the encoder.

        Args:
            input_ids: ``[B, S]`` int64.
            attention_mask: ``[B, S]`` 1 for real tokens (padding is neither attended to nor routed).

        Returns:
            (hidden ``[B, S, M]`` after the final norm and dropout, router results ``encoder.block.{i}``).
        """
        check_ids("input_ids", input_ids)
        pad = drop_full_mask(check_mask("attention_mask", attention_mask, input_ids))
        S = input_ids.shape[1]
        x = self.encoder.dropout(self.shared(input_ids))
        bias = self.encoder.position_attention.compute_bias(S, S).to(x.dtype)  # [1, H, S, S], shared by all blocks
        if pad is not None:
            bias = bias.masked_fill(~pad[:, None, None, :], mask_value(bias.dtype))  # [B, H, S, S]
        routers: list[MoEAux] = []
        for i, block in enumerate(self.encoder.block):
            x, attn_routers = block.layer[0](x, bias, padding_mask=pad)
            x, aux = block.layer[1](x, padding_mask=pad)
            if collect_router:
                add_routers(routers, f"encoder.block.{i}.layer.0.SelfAttention", attn_routers)
                if aux is not None:
                    add_router(routers, f"encoder.block.{i}", aux)
        return self.encoder.dropout(self.encoder.final_layer_norm(x)), routers

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        *,
        decoder_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[MoEAux]]:
        """Run the decoder over whole target sequences (teacher forcing).

        Args:
            decoder_input_ids: ``[B, T]``.
            encoder_hidden: ``[B, S, M]``.
            attention_mask: ``[B, S]`` encoder padding (cross-attention keys).
            decoder_attention_mask: ``[B, T]`` decoder padding (self-attention keys, and routing).
            decoder_padding_mask: ``[B, T]`` bool of tokens to route; defaults to ``decoder_attention_mask``.

        Returns:
            (hidden ``[B, T, M]`` after the final norm and dropout, router results ``decoder.block.{i}``).
        """
        check_ids("decoder_input_ids", decoder_input_ids)
        enc_pad = drop_full_mask(check_mask("attention_mask", attention_mask, encoder_hidden[..., 0]))
        dec_pad = drop_full_mask(check_mask("decoder_attention_mask", decoder_attention_mask, decoder_input_ids))
        route_pad = dec_pad if decoder_padding_mask is None else drop_full_mask(decoder_padding_mask)
        T = decoder_input_ids.shape[1]
        x = self.decoder.dropout(self.shared(decoder_input_ids))
        neg = mask_value(x.dtype)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        self_bias = self.decoder.position_attention.compute_bias(T, T).to(x.dtype).masked_fill(causal, neg)
        if dec_pad is not None:
            self_bias = self_bias.masked_fill(~dec_pad[:, None, None, :], neg)
        cross_mask = None
        if enc_pad is not None:  # T5 cross-attention has no position bias, only the encoder padding
            cross_mask = torch.zeros(enc_pad.shape[0], 1, 1, enc_pad.shape[1], dtype=x.dtype, device=x.device)
            cross_mask = cross_mask.masked_fill(~enc_pad[:, None, None, :], neg)
        routers: list[MoEAux] = []
        for i, block in enumerate(self.decoder.block):
            x, self_routers = block.layer[0](x, self_bias, padding_mask=route_pad)
            x, cross_routers = block.layer[1](
                x, cross_mask, key_value_states=encoder_hidden, padding_mask=route_pad, kv_padding_mask=enc_pad
            )
            x, aux = block.layer[2](x, padding_mask=route_pad)
            add_routers(routers, f"decoder.block.{i}.layer.0.SelfAttention", self_routers)
            add_routers(routers, f"decoder.block.{i}.layer.1.EncDecAttention", cross_routers)
            if aux is not None:
                add_router(routers, f"decoder.block.{i}", aux)
        return self.decoder.dropout(self.decoder.final_layer_norm(x)), routers

    # ---------------------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Encoder + decoder + logits (+ losses when ``labels`` are given).

        Args:
            input_ids: ``[B, S]`` encoder token ids.
            attention_mask: ``[B, S]`` 1 = real token; padding is not attended to and not routed.
            decoder_input_ids: ``[B, T]``; when None, ``labels`` shifted right with ``decoder_start_token_id``
                (-100 replaced by the pad id), like T5.
            decoder_attention_mask: ``[B, T]`` decoder padding. When None and labels are given, positions whose
                label is -100 are excluded from routing (not from attention: they are causal tail positions).
            labels: ``[B, T]`` target ids, -100 = ignored.

        Returns:
            ``ModelOutput`` (logits ``[B, T, V]``, loss, lm_loss, aux_loss, router, encoder_last_hidden_state).
        """
        cfg = self.config
        check_ids("labels", labels)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels (labels shifted right make the decoder input)")
            decoder_input_ids = shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id)
        if labels is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal decoder_input_ids shape "
                f"{tuple(decoder_input_ids.shape)}"
            )
        route_pad = None
        if decoder_attention_mask is None and labels is not None:
            route_pad = labels != -100

        enc, enc_routers = self.encode(input_ids, attention_mask)
        dec, dec_routers = self.decode(
            decoder_input_ids, enc, attention_mask, decoder_attention_mask, decoder_padding_mask=route_pad
        )
        logits = self.output_logits(dec)
        routers = enc_routers + dec_routers
        aux = weighted_aux_loss(routers, cfg, logits.device)
        lm = lm_loss(logits, labels) if labels is not None else None
        return ModelOutput(
            logits=logits, loss=None if lm is None else lm + aux, lm_loss=lm, aux_loss=aux, router=routers,
            encoder_last_hidden_state=enc,
        )

    # ------------------------------------------------------------------------------ cached decoding

    def init_cache(
        self, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor | None, max_length: int,
        *, collect_router: bool = False,
    ) -> tuple[DecoderCache, list[MoEAux]]:
        """Allocate the self-attention KV cache and compute cross-attention K/V once (generation).

        The causal relative position bias is precomputed here per distance, so a step only slices it.

        Returns:
            (cache, router results of Switch attention's K/V projections over the encoder output).
        """
        cfg = self.config
        B = encoder_hidden.shape[0]
        dtype, device = encoder_hidden.dtype, encoder_hidden.device
        enc_pad = None if attention_mask is None else attention_mask.bool()
        kv = torch.zeros(
            len(self.decoder.block), 2, B, cfg.num_heads, max_length, cfg.d_kv, dtype=dtype, device=device
        )
        self_bias = self.decoder.position_attention.causal_bias_table(max_length, dtype)
        cross_kv, routers = [], []
        for i, block in enumerate(self.decoder.block):
            kv_i, rs = block.layer[1].EncDecAttention.project_kv(encoder_hidden, enc_pad)
            cross_kv.append(kv_i)
            if collect_router:
                add_routers(routers, f"decoder.block.{i}.layer.1.EncDecAttention", rs)
        cross_mask = None
        enc_pad = drop_full_mask(enc_pad)  # an all-zero additive mask would only cost time
        if enc_pad is not None:
            cross_mask = torch.zeros(B, 1, 1, enc_pad.shape[1], dtype=dtype, device=device)
            cross_mask = cross_mask.masked_fill(~enc_pad[:, None, None, :], mask_value(dtype))
        qkv = [block.layer[0].SelfAttention.fused_qkv_weight() for block in self.decoder.block]
        cache = DecoderCache(
            kv=kv, self_bias=self_bias, key_mask=None, cross_kv=cross_kv, cross_mask=cross_mask, qkv=qkv
        )
        return cache, routers

    def decode_step(
        self,
        ids: torch.Tensor,
        cache: DecoderCache,
        *,
        padding_mask: torch.Tensor | None = None,
        collect_router: bool = False,
        last_only: bool = True,
    ) -> tuple[torch.Tensor, list[MoEAux]]:
        """Decode ``t`` new positions with the cache (positions ``cache.pos .. cache.pos+t-1``) and advance it.

        Args:
            ids: ``[B, t]`` new decoder tokens.
            padding_mask: ``[B, t]`` bool, False for rows that already finished (not routed).
            last_only: return logits of the last position only (``[B, 1, V]``).

        Returns:
            (logits ``[B, t or 1, V]``, router results of this step when ``collect_router``).
        """
        pos, t = cache.pos, ids.shape[1]
        x = self.shared(ids)
        mask = self.decoder.position_attention.step_bias(cache.self_bias, pos, t)
        routers: list[MoEAux] = []
        fast = cache.fast_path_ok(self.training, collect_router)
        for i, block in enumerate(self.decoder.block):
            if fast:
                # Fast path (eval, no router results, dense attention): fused QKV, no module-call overhead; the
                # same maths as the general path (dropout is the identity in eval mode).
                sa, ca, ff = block.layer
                k_buf, v_buf = cache.layer_kv[i]
                x = x + sa.SelfAttention.step(sa.layer_norm(x), mask, k_buf, v_buf, pos, cache.qkv[i])
                x = x + ca.EncDecAttention.cross_step(ca.layer_norm(x), cache.cross_mask, *cache.cross_kv[i])
                x, _ = ff(x, padding_mask=padding_mask, decode=True)
                continue
            x, self_routers = block.layer[0](
                x, mask, padding_mask=padding_mask, cache=cache.layer_kv[i], cache_pos=pos
            )
            x, cross_routers = block.layer[1](
                x, cache.cross_mask, static_kv=cache.cross_kv[i], padding_mask=padding_mask
            )
            x, aux = block.layer[2](x, padding_mask=padding_mask, decode=not collect_router)
            if collect_router:
                add_routers(routers, f"decoder.block.{i}.layer.0.SelfAttention", self_routers)
                add_routers(routers, f"decoder.block.{i}.layer.1.EncDecAttention", cross_routers)
                if aux is not None:
                    add_router(routers, f"decoder.block.{i}", aux)
        cache.pos = pos + t
        if last_only:
            x = x[:, -1:]
        return self.output_logits(self.decoder.final_layer_norm(x), decode=True), routers

    # -------------------------------------------------------------------------------------- helpers

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Generate decoder ids (starting with ``decoder_start_token_id``); see ``switchformer.models.generation``."""
        return generate(self, input_ids, attention_mask, **kwargs)
