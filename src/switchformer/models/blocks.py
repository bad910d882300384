"""Shared building blocks of the Switch / T5 v1.0 models (paper §2, Table 9; the T5 v1.0 architecture of the
released checkpoints).

What lives here: ``RMSNorm`` (T5LayerNorm), ``relative_position_bucket``, ``Attention`` (T5 attention with optional
relative position bias, no 1/sqrt(d) scaling, optional KV cache; Switch attention's projections are
``switchformer.moe.RoutedLinear``), ``DenseFFN``, the three sublayer wrappers (``LayerSelfAttention``,
``LayerCrossAttention``, ``LayerFF``), the ``Block`` / ``Stack`` containers, the init, and the outputs and losses.
The MoE compute (the Switch layer and its generation fast path) lives in ``switchformer.moe``. The *loops* over
blocks are in the model files (``encoder_decoder.py``, ``decoder_only.py``), which read top to bottom.

The module tree mirrors transformers' ``SwitchTransformers`` key names so that the checkpoint adapter
(``switchformer.interop.state_dict``) only has to stack/unstack experts:
``block[i].layer[0].SelfAttention.{q,k,v,o}``, ``block[0].layer[0].SelfAttention.relative_attention_bias``,
``block[i].layer[j].layer_norm``, ``block[i].layer[-1].mlp.{wi,wo}`` (dense) or SwitchFFN (sparse).

Shapes: B batch, T query length, S key length, H heads, Dh d_kv, M d_model, F d_ff.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from switchformer.config import IGNORE_INDEX, ModelConfig, is_sparse_block
from switchformer.dtypes import parse_dtype
from switchformer.moe import MoEAux, RoutedLinear, SwitchFFN, decode_fast_path_ok, switch_ffn_decode
from switchformer.moe.experts import truncated_normal_


def add_router(routers: list[MoEAux], name: str, aux: MoEAux) -> None:
    """Append a Switch FFN's ``aux`` to ``routers``, named ``name`` (e.g. ``"encoder.block.1"``)."""
    aux.name = name
    routers.append(aux)


def add_routers(routers: list[MoEAux], prefix: str, results: list[MoEAux]) -> None:
    """Append ``results`` (Switch-attention projections ``q``/``k``/``v``) to ``routers``, each renamed
    ``{prefix}.{name}`` so the name says where in the model it routed."""
    for r in results:
        r.name = f"{prefix}.{r.name}"
        routers.append(r)


def mask_value(dtype: torch.dtype) -> float:
    """Additive mask for disallowed keys: the dtype's most negative finite value (finite, so a fully masked row
    gives a uniform softmax rather than NaN)."""
    return torch.finfo(dtype).min


# ----------------------------------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """T5LayerNorm: scale only, no mean subtraction, no bias; the variance is computed in float32.

    ``y = weight * x / sqrt(mean(x**2) + eps)``; in half precision the normalised value is cast back to the weight's
    dtype before the scale (exactly transformers' ``T5LayerNorm``).
    """

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op, bitwise equal to the expression below in float32 (matters for generation speed).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


# ------------------------------------------------------------------------------------------ position bias


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5 / Mesh TensorFlow relative position buckets.

    ``relative_position = key_pos - query_pos``. Half of the buckets (per direction when bidirectional) are exact
    distances 0..max_exact-1, the other half log-spaced up to ``max_distance``; farther distances share the last
    bucket. Causal (``bidirectional=False``): positive (future) positions fall into bucket 0, they are masked anyway.

    Args:
        relative_position: int tensor of any shape.

    Returns:
        int64 tensor of the same shape with values in [0, num_buckets).
    """
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamp(min=1) only keeps log() finite for the small distances that torch.where discards below.
    large = max_exact + (
        torch.log(distance.clamp(min=1).float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


# --------------------------------------------------------------------------------------------- attention


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Eval-mode T5 attention ``softmax(q k^T + mask) v`` (no scaling) for ``[B, H, T, Dh]`` inputs.

    (For one query on CPU an explicit matmul/softmax/matmul is no faster than SDPA, and differs by ~1e-6.)
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)


class Attention(nn.Module):
    """T5 multi-head attention: no biases, no 1/sqrt(d_kv) scaling (T5 folds it into the init), optional relative
    position bias (owned by block 0 of a stack and shared by the later blocks, which receive it as a mask).

    Uses ``F.scaled_dot_product_attention`` with the position bias + padding/causal mask as one additive float
    mask and ``scale=1.0``.

    Args:
        cfg: model config (d_model, num_heads, d_kv, buckets, dropout, switch_attention).
        has_relative_attention_bias: create ``relative_attention_bias`` (block 0 of a stack).
        bidirectional: bucket convention of the bias (encoder True, decoder False).
    """

    def __init__(self, cfg: ModelConfig, *, has_relative_attention_bias: bool, bidirectional: bool) -> None:
        super().__init__()
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.inner = cfg.num_heads * cfg.d_kv
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.dropout = cfg.dropout_rate
        self.switch = cfg.switch_attention
        if self.switch:
            moe = cfg.moe
            kw = dict(
                router_dtype=parse_dtype(moe.router_dtype, name="moe.router_dtype"), exploration=moe.exploration,
                jitter_eps=moe.jitter_eps, router_input_dropout=moe.router_input_dropout,
            )
            self.q = RoutedLinear(cfg.d_model, self.inner, moe.num_experts, **kw)
            self.k = RoutedLinear(cfg.d_model, self.inner, moe.num_experts, **kw)
            self.v = RoutedLinear(cfg.d_model, self.inner, moe.num_experts, **kw)
        else:
            self.q = nn.Linear(cfg.d_model, self.inner, bias=False)
            self.k = nn.Linear(cfg.d_model, self.inner, bias=False)
            self.v = nn.Linear(cfg.d_model, self.inner, bias=False)
        self.o = nn.Linear(self.inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.num_heads)

    def compute_bias(self, query_length: int, key_length: int, *, device=None, query_offset: int = 0) -> torch.Tensor:
        """Relative position bias ``[1, H, T, S]`` for queries at ``query_offset + 0..T-1`` and keys ``0..S-1``."""
        device = device if device is not None else self.relative_attention_bias.weight.device
        q_pos = torch.arange(query_offset, query_offset + query_length, device=device)[:, None]
        k_pos = torch.arange(key_length, device=device)[None, :]
        buckets = relative_position_bucket(
            k_pos - q_pos, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, T, S]

    def causal_bias_table(self, max_length: int, dtype: torch.dtype) -> torch.Tensor:
        """Causal bias by distance, reversed: ``table[0, h, 0, j]`` is the bias of a key ``max_length - 1 - j``
        positions before the query. A decode step at position p slices ``table[..., max_length - 1 - p:]``: the
        ``[1, H, 1, p + 1]`` bias row for keys 0..p, contiguous, with O(max_length) memory."""
        distance = torch.arange(max_length - 1, -1, -1, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(
            -distance, bidirectional=False, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        return self.relative_attention_bias(buckets).to(dtype).T.contiguous()[None, :, None, :]

    def step_bias(self, table: torch.Tensor, pos: int, t: int) -> torch.Tensor:
        """Self-attention mask ``[1, H, t, pos + t]`` for ``t`` new queries at positions pos..pos+t-1 (generation)."""
        if t == 1:
            return table[..., table.shape[-1] - 1 - pos :]
        bias = self.compute_bias(t, pos + t, query_offset=pos).to(table.dtype)
        future = torch.ones(t, pos + t, dtype=torch.bool, device=bias.device).triu(pos + 1)
        return bias.masked_fill(future, mask_value(bias.dtype))

    def _project(self, proj: nn.Module, x: torch.Tensor, mask, routers: list, name: str) -> torch.Tensor:
        if self.switch:
            y, result = proj(x, mask)
            result.name = name
            routers.append(result)
            return y
        return proj(x)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        *,
        key_value_states: torch.Tensor | None = None,
        static_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_pos: int = 0,
        padding_mask: torch.Tensor | None = None,
        kv_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[MoEAux]]:
        """Attend.

        Args:
            x: queries' hidden states ``[B, T, M]``.
            attn_mask: additive float mask ``[B or 1, H or 1, T, S]`` (position bias + causal/padding), or None.
            key_value_states: cross-attention source ``[B, S, M]`` (None = self-attention).
            static_kv: precomputed cross-attention ``(k, v)`` each ``[B, H, S, Dh]`` (generation).
            cache: self-attention buffers ``(k, v)`` each ``[B, H, S_max, Dh]``; the new keys/values are written at
                ``cache_pos`` and attention covers positions ``0..cache_pos+T-1``.
            padding_mask: ``[B, T]`` bool of real query tokens (routing statistics of Switch attention only).
            kv_padding_mask: ``[B, S]`` bool of real source tokens (ditto, for K/V routing in cross-attention).

        Returns:
            (``[B, T, M]``, router results of Switch attention, empty otherwise).
        """
        B, T, _ = x.shape
        routers: list[MoEAux] = []
        q = self._project(self.q, x, padding_mask, routers, "q").view(B, T, self.num_heads, self.d_kv).transpose(1, 2)
        if static_kv is not None:
            k, v = static_kv
        else:
            src = x if key_value_states is None else key_value_states
            src_mask = padding_mask if key_value_states is None else kv_padding_mask
            S = src.shape[1]
            k = self._project(self.k, src, src_mask, routers, "k").view(B, S, self.num_heads, self.d_kv)
            v = self._project(self.v, src, src_mask, routers, "v").view(B, S, self.num_heads, self.d_kv)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if cache is not None:
                k_buf, v_buf = cache
                k_buf[:, :, cache_pos : cache_pos + T] = k
                v_buf[:, :, cache_pos : cache_pos + T] = v
                k, v = k_buf[:, :, : cache_pos + T], v_buf[:, :, : cache_pos + T]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, scale=1.0
        )
        return self.o(out.transpose(1, 2).reshape(B, T, self.inner)), routers

    def fused_qkv_weight(self) -> torch.Tensor | None:
        """``[3 * inner, M]``: the q, k and v weights stacked for one projection (``step``); None for Switch
        attention. Built per generation (``init_cache``), so it always reflects the current weights."""
        if self.switch:
            return None
        return torch.cat([self.q.weight, self.k.weight, self.v.weight], 0)

    def step(
        self, h: torch.Tensor, attn_mask: torch.Tensor | None, k_buf: torch.Tensor, v_buf: torch.Tensor, pos: int,
        w_qkv: torch.Tensor,
    ) -> torch.Tensor:
        """Cached self-attention of ``t`` new positions in eval mode (the generation fast path): one fused QKV
        projection, the new keys/values written into ``k_buf``/``v_buf`` at ``pos``. Same maths as ``forward``
        with ``cache=(k_buf, v_buf)``.

        Args:
            h: normalised hidden states ``[B, t, M]``.
            attn_mask: additive ``[B or 1, H, t, pos + t]``.
            w_qkv: ``fused_qkv_weight()``.
        """
        B, T, _ = h.shape
        qkv = decode_linear(h, w_qkv).reshape(B, T, 3, self.num_heads, self.d_kv).permute(2, 0, 3, 1, 4)
        k_buf[:, :, pos : pos + T] = qkv[1]
        v_buf[:, :, pos : pos + T] = qkv[2]
        out = attend(qkv[0], k_buf[:, :, : pos + T], v_buf[:, :, : pos + T], attn_mask)
        return self.o(out.transpose(1, 2).reshape(B, T, self.inner))

    def cross_step(self, h: torch.Tensor, attn_mask: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor):
        """Cross-attention in eval mode over precomputed keys/values ``[B, H, S, Dh]`` (generation fast path)."""
        B, T, _ = h.shape
        q = self.q(h).view(B, T, self.num_heads, self.d_kv).transpose(1, 2)
        out = attend(q, k, v, attn_mask)
        return self.o(out.transpose(1, 2).reshape(B, T, self.inner))

    def project_kv(self, src: torch.Tensor, kv_padding_mask: torch.Tensor | None = None):
        """Cross-attention keys and values ``[B, H, S, Dh]`` computed once per generation (plus router results)."""
        B, S, _ = src.shape
        routers: list[MoEAux] = []
        k = self._project(self.k, src, kv_padding_mask, routers, "k").view(B, S, self.num_heads, self.d_kv)
        v = self._project(self.v, src, kv_padding_mask, routers, "v").view(B, S, self.num_heads, self.d_kv)
        return (k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()), routers


# ------------------------------------------------------------------------------------------------ FFN


class DenseFFN(nn.Module):
    """T5 dense FFN without biases: ``relu``: ``wo(drop(relu(wi x)))``; ``gated-gelu``:
    ``wo(drop(gelu(wi_0 x) * wi_1 x))`` (GEGLU, Table 9; tanh-approximate gelu as T5 v1.1 / flaxformer)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, dropout: float) -> None:
        super().__init__()
        if activation not in ("relu", "gated-gelu"):
            raise ValueError(f"feed_forward_proj must be 'relu' or 'gated-gelu', got {activation!r}")
        self.gated = activation == "gated-gelu"
        if self.gated:
            self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
            self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        else:
            self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x) if self.gated else F.relu(self.wi(x))
        return self.wo(self.dropout(h))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode ``forward`` for a generation step's few rows: the tall input projections go through
        ``decode_linear``."""
        if self.gated:
            h = F.gelu(decode_linear(x, self.wi_0.weight), approximate="tanh") * decode_linear(x, self.wi_1.weight)
        else:
            h = F.relu(decode_linear(x, self.wi.weight))
        return self.wo(h)


# ---------------------------------------------------------------------------------------------- sublayers


class LayerSelfAttention(nn.Module):
    """``x + drop(SelfAttention(layer_norm(x)))`` (pre-norm residual sublayer)."""

    def __init__(self, cfg: ModelConfig, *, has_relative_attention_bias: bool, bidirectional: bool) -> None:
        super().__init__()
        self.SelfAttention = Attention(
            cfg, has_relative_attention_bias=has_relative_attention_bias, bidirectional=bidirectional
        )
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x, attn_mask, *, padding_mask=None, cache=None, cache_pos: int = 0):
        h, routers = self.SelfAttention(
            self.layer_norm(x), attn_mask, cache=cache, cache_pos=cache_pos, padding_mask=padding_mask
        )
        return x + self.dropout(h), routers


class LayerCrossAttention(nn.Module):
    """``x + drop(EncDecAttention(layer_norm(x), encoder_states))``; no position bias (T5)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.EncDecAttention = Attention(cfg, has_relative_attention_bias=False, bidirectional=True)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(
        self, x, attn_mask, *, key_value_states=None, static_kv=None, padding_mask=None, kv_padding_mask=None
    ):
        h, routers = self.EncDecAttention(
            self.layer_norm(x), attn_mask, key_value_states=key_value_states, static_kv=static_kv,
            padding_mask=padding_mask, kv_padding_mask=kv_padding_mask,
        )
        return x + self.dropout(h), routers


class LayerFF(nn.Module):
    """``x + drop(mlp(layer_norm(x)))`` where ``mlp`` is a ``DenseFFN`` or a ``SwitchFFN`` (sparse block)."""

    def __init__(self, cfg: ModelConfig, *, sparse: bool) -> None:
        super().__init__()
        self.sparse = sparse
        if sparse:
            self.mlp = SwitchFFN.from_config(
                cfg.d_model, cfg.d_ff, cfg.moe, activation=cfg.feed_forward_proj, init_scale=cfg.init_scale
            )
        else:
            self.mlp = DenseFFN(cfg.d_model, cfg.d_ff, cfg.feed_forward_proj, cfg.dropout_rate)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, *, decode: bool = False):
        """Returns ``(x + drop(mlp(norm(x))), MoEAux or None)``; padding is not routed (SwitchFFN padding_mask).

        ``decode=True`` (generation steps that do not collect router results) lets a sparse block take the
        ``switch_ffn_decode`` fast path when it is exact; the aux is then None.
        """
        h = self.layer_norm(x)
        if self.sparse and decode and decode_fast_path_ok(self.mlp, h):
            return x + self.dropout(switch_ffn_decode(self.mlp, h, padding_mask)), None
        if self.sparse:
            y, aux = self.mlp(h, padding_mask=padding_mask)
            return x + self.dropout(y), aux
        if decode and not self.training:
            return x + self.mlp.decode(h), None
        return x + self.dropout(self.mlp(h)), None


class Block(nn.Module):
    """One transformer block: ``layer = [self-attention, (cross-attention,) FF]`` as in transformers' T5 blocks."""

    def __init__(self, cfg: ModelConfig, *, index: int, is_decoder: bool, cross_attention: bool, sparse: bool):
        super().__init__()
        layers: list[nn.Module] = [
            LayerSelfAttention(cfg, has_relative_attention_bias=index == 0, bidirectional=not is_decoder)
        ]
        if cross_attention:
            layers.append(LayerCrossAttention(cfg))
        layers.append(LayerFF(cfg, sparse=sparse))
        self.layer = nn.ModuleList(layers)
        self.sparse = sparse


class Stack(nn.Module):
    """``block`` list + ``final_layer_norm`` + dropout; the model files run the loop (no forward here)."""

    def __init__(
        self, cfg: ModelConfig, *, num_layers: int, sparse_step: int, is_decoder: bool, cross_attention: bool
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            Block(cfg, index=i, is_decoder=is_decoder, cross_attention=cross_attention,
                  sparse=is_sparse_block(i, sparse_step))
            for i in range(num_layers)
        )
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    @property
    def position_attention(self) -> Attention:
        """Block 0's self-attention, owner of the stack's relative position bias."""
        return self.block[0].layer[0].SelfAttention


# --------------------------------------------------------------------------------------------- init


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Paper §2.4 init: truncated normal, std sqrt(init_scale / fan_in) (resampled beyond 2 std) for every matrix.

    - ``nn.Linear`` (q/k/v/o, wi/wi_0/wi_1/wo, an untied ``lm_head``): fan_in = in_features.
    - ``RoutedLinear`` experts and routers: fan_in = d_in.
    - ``shared`` embedding: plain normal with std 1.0, as T5X (``nn.initializers.normal(stddev=1.0)``) and Mesh
      TensorFlow; with tied output logits the d_model**-0.5 rescale then gives unit-variance logits at init.
    - ``relative_attention_bias``: truncated normal std sqrt(init_scale / num_buckets) (small: the bias is added
      straight to attention logits).
    - Norm scales: ones. SwitchFFN initialises itself (same rule) in its constructor and is left untouched.
    """
    switch_ids = {id(m) for mod in model.modules() if isinstance(mod, SwitchFFN) for m in mod.modules()}
    for name, module in model.named_modules():
        if id(module) in switch_ids:
            continue
        if isinstance(module, nn.Linear):
            truncated_normal_(module.weight.data, module.in_features, cfg.init_scale)
        elif isinstance(module, RoutedLinear):
            fan_in = module.weight.shape[-1]
            truncated_normal_(module.weight.data, fan_in, cfg.init_scale)
            truncated_normal_(module.router.weight.data, fan_in, cfg.init_scale)
        elif isinstance(module, nn.Embedding):
            if name.endswith("relative_attention_bias"):
                truncated_normal_(module.weight.data, module.num_embeddings, cfg.init_scale)
            else:
                nn.init.normal_(module.weight.data, mean=0.0, std=1.0)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight.data)


# ------------------------------------------------------------------------------------------ outputs, losses

# When a decode step's projection runs as ``weight @ h.T`` on CPU (``decode_linear``): at most this many rows and
# a weight of at least this many elements, twice as tall as wide. Set by decode-step timings of the model
# benchmark (benchmarks/bench_models.py); the measurements are in benchmarks/results/decode_linear_cpu_2026-11-29.md.
_SKINNY_ROWS = 64
_SKINNY_MIN_WEIGHT = 2**19
DECODE_LINEAR_NOTE = "benchmarks/results/decode_linear_cpu_2026-11-29.md"


def decode_linear(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(h, weight)`` for the few rows of a generation step.

    On CPU, with at most ``_SKINNY_ROWS`` rows and a large weight (``_SKINNY_MIN_WEIGHT`` elements or more) at least
    twice as tall as it is wide (``[out, in]``), it computes ``(weight @ h.T).T``: MKL runs that tall-skinny product
    faster than ``F.linear`` with a few rows and cold weights, and slower for wide weights; small weights gain
    nothing (``DECODE_LINEAR_NOTE``). The values agree to float32 rounding (another summation order); the result
    is a transposed view.
    """
    rows = h.numel() // h.shape[-1]
    tall = weight.shape[0] >= 2 * weight.shape[1] and weight.numel() >= _SKINNY_MIN_WEIGHT
    if h.device.type == "cpu" and 0 < rows <= _SKINNY_ROWS and tall:
        return torch.mm(weight, h.reshape(rows, h.shape[-1]).t()).t().unflatten(0, h.shape[:-1])
    return F.linear(h, weight)


def vocab_logits(h: torch.Tensor, weight: torch.Tensor, *, decode: bool = False) -> torch.Tensor:
    """``h @ weight.T`` (``weight`` ``[V, M]``), the output layer; ``decode=True`` (a generation step: a few rows
    against the whole vocabulary, the largest single op of a step) goes through ``decode_linear``."""
    return decode_linear(h, weight) if decode else F.linear(h, weight)


@dataclass
class ModelOutput:
    """What a forward pass returns.

    Attributes:
        logits: ``[B, T, V]`` (decoder positions for the encoder-decoder).
        loss: ``lm_loss + aux_loss`` when labels were given, else None.
        lm_loss: mean token cross-entropy over labels != ``IGNORE_INDEX`` (float32), or None.
        aux_loss: weighted router loss ``aux_loss_coef * mean_l(lb_l) + z_loss_coef * mean_l(z_l)`` over every routed
            layer l of the call (Switch FFNs and Switch attention projections); a float32 zero when nothing is
            routed (dense model).
        router: one ``MoEAux`` per routed layer, in execution order (encoder first).
        encoder_last_hidden_state: ``[B, S, M]`` (encoder-decoder only).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    router: list[MoEAux]
    encoder_last_hidden_state: torch.Tensor | None = None


def weighted_aux_loss(routers: list[MoEAux], cfg: ModelConfig, device) -> torch.Tensor:
    """``aux_loss_coef * mean(load_balancing) + z_loss_coef * mean(z)`` over the routed layers.

    Why the mean (T5X ``t5x/contrib/moe/models.py`` convention) rather than the sum (Mesh TensorFlow) or
    transformers' concatenation: alpha (paper §2.2, Eq. 4) then means the same thing at any depth or sparse step,
    and one layer's imbalance cannot cancel another's. With alpha = 0.01 and balanced routing
    the weighted term is 0.01 whatever the number of sparse layers.
    """
    if not routers:
        return torch.zeros((), dtype=torch.float32, device=device)
    lb = torch.stack([r.load_balancing_loss.float() for r in routers]).mean()
    z = torch.stack([r.router_z_loss.float() for r in routers]).mean()
    return cfg.aux_loss_coef * lb + cfg.z_loss_coef * z


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the real target tokens (labels != ``IGNORE_INDEX``; T5X ``NUM_REAL_TARGET_TOKENS``),
    float32.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` int64, ``IGNORE_INDEX`` (-100) = ignored.
    """
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def check_ids(name: str, ids: torch.Tensor | None, vocab_size: int | None = None) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``ids`` is a 2-D integer tensor."""
    if ids is None:
        return
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids [batch, seq], got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}; use .long()")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, seq], got shape {tuple(ids.shape)}; add .unsqueeze(0)")


def drop_full_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """None for a bool padding mask without padding (all True), which means the same; else ``mask``.

    Saves the ``[B, H, T, S]`` masked copy of the position bias and the padding work of routing. CPU only: the
    check is a host sync, free there but not on accelerators.
    """
    if mask is not None and mask.device.type == "cpu" and bool(mask.all()):
        return None
    return mask


def check_mask(name: str, mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor | None:
    """Validate a [batch, seq] 0/1 mask against ``ids``; return it as bool (True = real token) or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor of shape {tuple(ids.shape)} (1 = real token), got {got}")
    return mask.bool()
