"""A decoder-only causal Switch LM built from the same T5 blocks (no cross-attention).

    cfg = ModelConfig(arch="decoder_only", num_layers=4, d_model=128, num_heads=4, d_ff=512)
    model = build_model(cfg)
    out = model(input_ids, attention_mask=mask, labels=input_ids)   # next-token loss (labels shifted inside)
    ids = model.generate(prompt_ids, attention_mask=prompt_mask, max_new_tokens=20)   # prompt + continuation

Module tree (transformers-style names): ``shared``, ``decoder.block[i].layer[0].SelfAttention`` (+ causal
``relative_attention_bias`` on block 0), ``decoder.block[i].layer[0].layer_norm``, ``decoder.block[i].layer[1].mlp``
(dense FFN, or SwitchFFN when ``decoder_sparse_step`` selects block i), ``decoder.block[i].layer[1].layer_norm``,
``decoder.final_layer_norm``, ``lm_head`` only when the embeddings are not tied. ``num_layers`` sets the depth.
Everything the model computes is in this file, top to bottom.
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


class SwitchDecoderLM(nn.Module):
    """Causal language model with T5 blocks and Switch FFNs.

    Args:
        cfg: a ``ModelConfig`` with ``arch == "decoder_only"`` (depth ``num_layers``, sparsity
            ``decoder_sparse_step``).
        init: apply the paper's init (§2.4).
    """

    is_encoder_decoder = False

    def __init__(self, cfg: ModelConfig, *, init: bool = True) -> None:
        super().__init__()
        if cfg.arch != "decoder_only":
            raise ValueError(f"SwitchDecoderLM needs cfg.arch='decoder_only', got {cfg.arch!r}; use build_model")
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.decoder = Stack(
            cfg, num_layers=cfg.num_layers, sparse_step=cfg.decoder_sparse_step, is_decoder=True,
            cross_attention=False,
        )
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if init:
            init_weights(self, cfg)

    def output_logits(self, h: torch.Tensor, *, decode: bool = False) -> torch.Tensor:
        """Tied: ``(h * d_model**-0.5) @ shared.weight.T``; untied: ``lm_head(h)``.

        ``decode=True``: a generation step's few rows (``blocks.vocab_logits``: a faster product on CPU).
        """
        if self.config.tie_word_embeddings:
            return vocab_logits(h * self.config.d_model**-0.5, self.shared.weight, decode=decode)
        return vocab_logits(h, self.lm_head.weight, decode=decode)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Causal LM forward.

        Args:
            input_ids: ``[B, T]``.
            attention_mask: ``[B, T]`` 1 = real token (left or right padding); padded keys are masked and padding
                is not routed.
            labels: ``[B, T]`` aligned with ``input_ids`` (usually ``input_ids`` with padding set to -100); position t
                predicts ``labels[:, t+1]``, i.e. the shift happens inside, like transformers' causal LMs.

        Returns:
            ``ModelOutput`` with logits ``[B, T, V]``.
        """
        check_ids("input_ids", input_ids)
        check_ids("labels", labels)
        pad = drop_full_mask(check_mask("attention_mask", attention_mask, input_ids))
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        T = input_ids.shape[1]
        x = self.decoder.dropout(self.shared(input_ids))
        neg = mask_value(x.dtype)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        bias = self.decoder.position_attention.compute_bias(T, T).to(x.dtype).masked_fill(causal, neg)
        if pad is not None:
            bias = bias.masked_fill(~pad[:, None, None, :], neg)  # [B, H, T, T]
        routers: list[MoEAux] = []
        for i, block in enumerate(self.decoder.block):
            x, attn_routers = block.layer[0](x, bias, padding_mask=pad)
            x, aux = block.layer[1](x, padding_mask=pad)
            add_routers(routers, f"decoder.block.{i}.layer.0.SelfAttention", attn_routers)
            if aux is not None:
                add_router(routers, f"decoder.block.{i}", aux)
        logits = self.output_logits(self.decoder.dropout(self.decoder.final_layer_norm(x)))
        aux_loss = weighted_aux_loss(routers, self.config, logits.device)
        lm = None
        if labels is not None:
            lm = lm_loss(logits[:, :-1], labels[:, 1:])
        return ModelOutput(
            logits=logits, loss=None if lm is None else lm + aux_loss, lm_loss=lm, aux_loss=aux_loss, router=routers
        )

    # ------------------------------------------------------------------------------ cached decoding

    def init_cache(self, batch_size: int, max_length: int, prompt_mask: torch.Tensor | None) -> DecoderCache:
        """Allocate the KV cache and precompute the causal position bias per distance (``max_length`` entries).

        Args:
            prompt_mask: ``[B, P]`` bool of a left-padded prompt (None = no padding).
        """
        cfg = self.config
        weight = self.shared.weight
        kv = torch.zeros(
            len(self.decoder.block), 2, batch_size, cfg.num_heads, max_length, cfg.d_kv,
            dtype=weight.dtype, device=weight.device,
        )
        bias = self.decoder.position_attention.causal_bias_table(max_length, weight.dtype)
        key_mask = None
        if prompt_mask is not None:
            key_mask = torch.ones(batch_size, max_length, dtype=torch.bool, device=weight.device)
            key_mask[:, : prompt_mask.shape[1]] = prompt_mask
        qkv = [block.layer[0].SelfAttention.fused_qkv_weight() for block in self.decoder.block]
        return DecoderCache(kv=kv, self_bias=bias, key_mask=key_mask, qkv=qkv)

    def decode_step(
        self,
        ids: torch.Tensor,
        cache: DecoderCache,
        *,
        padding_mask: torch.Tensor | None = None,
        collect_router: bool = False,
        last_only: bool = True,
    ) -> tuple[torch.Tensor, list[MoEAux]]:
        """Process ``t`` new tokens (the prompt at step 0, then one token) with the cache, and advance it.

        Args:
            ids: ``[B, t]``.
            padding_mask: ``[B, t]`` bool of tokens to route (prompt padding / finished rows are not routed).
            last_only: logits for the last position only.

        Returns:
            (logits ``[B, t or 1, V]``, router results when ``collect_router``).
        """
        pos, t = cache.pos, ids.shape[1]
        x = self.shared(ids)
        mask = self.decoder.position_attention.step_bias(cache.self_bias, pos, t)
        if cache.key_mask is not None:
            mask = mask.masked_fill(~cache.key_mask[:, None, None, : pos + t], mask_value(mask.dtype))
        routers: list[MoEAux] = []
        fast = cache.fast_path_ok(self.training, collect_router)
        for i, block in enumerate(self.decoder.block):
            if fast:
                # Fast path (eval, no router results, dense attention): fused QKV, no module-call overhead; the
                # same maths as the general path (dropout is the identity in eval mode).
                sa, ff = block.layer
                k_buf, v_buf = cache.layer_kv[i]
                x = x + sa.SelfAttention.step(sa.layer_norm(x), mask, k_buf, v_buf, pos, cache.qkv[i])
                x, _ = ff(x, padding_mask=padding_mask, decode=True)
                continue
            x, attn_routers = block.layer[0](
                x, mask, padding_mask=padding_mask, cache=cache.layer_kv[i], cache_pos=pos
            )
            x, aux = block.layer[1](x, padding_mask=padding_mask, decode=not collect_router)
            if collect_router:
                add_routers(routers, f"decoder.block.{i}.layer.0.SelfAttention", attn_routers)
                if aux is not None:
                    add_router(routers, f"decoder.block.{i}", aux)
        cache.pos = pos + t
        if last_only:
            x = x[:, -1:]
        return self.output_logits(self.decoder.final_layer_norm(x), decode=True), routers

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Generate prompt + continuation; see ``switchformer.models.generation``."""
        return generate(self, input_ids, attention_mask, **kwargs)
