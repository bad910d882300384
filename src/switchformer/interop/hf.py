"""Hugging Face interop: load released Switch checkpoints and save models transformers can load.

Checkpoints are read and written as **safetensors only**; pickled ``pytorch_model.bin`` files are refused, never
unpickled. The module tree of :mod:`switchformer.models` mirrors transformers' key names one to one except for the
Switch FFN, whose experts are stacked into ``[E, ...]`` tensors (anchors.md §4):

==========================================================  ================================================
transformers (``SwitchTransformersForConditionalGeneration``)  switchformer
==========================================================  ================================================
``<ffn>.mlp.router.classifier.weight``        [E, M]            ``<ffn>.mlp.router.weight``        [E, M]
``<ffn>.mlp.experts.expert_{j}.wi.weight``    [F, M]            ``<ffn>.mlp.experts.w_in[j]``      [E, F, M]
``<ffn>.mlp.experts.expert_{j}.wi_1.weight``  [F, M] (gated)    ``<ffn>.mlp.experts.w_in[j]``
``<ffn>.mlp.experts.expert_{j}.wi_0.weight``  [F, M] (gated)    ``<ffn>.mlp.experts.w_gate[j]``    [E, F, M]
``<ffn>.mlp.experts.expert_{j}.wo.weight``    [M, F]            ``<ffn>.mlp.experts.w_out[j]``     [E, M, F]
every other key                                                 the same key
``encoder/decoder.embed_tokens.weight``, tied ``lm_head``       not stored (aliases of ``shared.weight``)
==========================================================  ================================================

``<ffn>`` is ``encoder.block.{i}.layer.1`` or ``decoder.block.{i}.layer.2``. Which blocks are sparse is read from
the keys present, not trusted from ``config.json`` (anchors.md §4: transformers recomputes the sparse step in
``__init__`` but saved JSON values override it; switch-c-2048's JSON says ``decoder_sparse_step: 0``).

Routing semantics (documented in docs/checkpoints.md): a checkpoint converted from transformers gets
``moe.expert_capacity = expert_capacity``, i.e. transformers' per-sequence capacity in token order, float32 router,
and dropped tokens contribute zero (residual only), which is what transformers 5.24 computes in eval mode.

Shape suffixes: E experts, F d_ff, M d_model, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from switchformer.config import ModelConfig, MoEConfig
from switchformer.errors import CheckpointError

__all__ = [
    "CheckpointError",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "from_transformers",
    "hf_param_shapes",
    "save_pretrained",
    "sparse_step_from_blocks",
    "state_dict_from_hf",
    "state_dict_to_hf",
]

HF_MODEL_TYPE = "switch_transformers"
HF_ARCHITECTURE = "SwitchTransformersForConditionalGeneration"
MARKER = "switchformer"
"""Key of config.json that holds switchformer's own ModelConfig (transformers keeps unknown keys and ignores them)."""
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", INDEX_NAME, "spiece.model", "tokenizer*"]
TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")

_EXPERT_RE = re.compile(r"^(?P<ffn>.+\.mlp)\.experts\.expert_(?P<j>\d+)\.(?P<w>wi|wi_0|wi_1|wo)\.weight$")
_STACKED_RE = re.compile(r"^(?P<ffn>.+\.mlp)\.experts\.(?P<w>w_in|w_gate|w_out)$")
_ROUTER_HF_RE = re.compile(r"^(?P<ffn>.+\.mlp)\.router\.classifier\.weight$")
_ROUTER_RE = re.compile(r"^(?P<ffn>.+\.mlp)\.router\.weight$")
_T5_FFN_RE = re.compile(r"\.layer\.(\d+)\.DenseReluDense\.")
_BLOCK_FFN_RE = re.compile(r"^(?P<stack>encoder|decoder)\.block\.(?P<i>\d+)\.layer\.(?P<l>\d+)\.mlp\.(?P<rest>.+)$")


def canonical_key(key: str) -> str:
    """transformers' T5 names the dense FFN ``DenseReluDense``; SwitchTransformers and switchformer use ``mlp``."""
    return _T5_FFN_RE.sub(r".layer.\1.mlp.", key)


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


def _is_sparse(i: int, step: int) -> bool:
    """transformers' rule (anchors.md §4): block i is sparse when step == 1 or i % step == 1; step 0 = all dense."""
    return step > 0 and (step == 1 or i % step == 1)


def sparse_blocks(num_layers: int, step: int) -> list[int]:
    """Indices of the sparse blocks of a stack of ``num_layers`` blocks under sparse step ``step``."""
    return [i for i in range(num_layers) if _is_sparse(i, step)]


def sparse_step_from_blocks(blocks: Iterable[int], num_layers: int, *, stack: str = "encoder") -> int:
    """The sparse step that makes exactly ``blocks`` sparse in a stack of ``num_layers`` blocks.

    Args:
        blocks: indices of the blocks that hold a router (read from checkpoint keys).
        num_layers: blocks in the stack.
        stack: name used in the error message.

    Returns:
        0 when no block is sparse, 1 when all are, otherwise the smallest step >= 2 reproducing the set.

    Raises:
        CheckpointError: the set is not expressible as transformers' ``i % step == 1`` pattern.
    """
    want = sorted(set(blocks))
    if not want:
        return 0
    for step in range(1, num_layers + 2):
        if sparse_blocks(num_layers, step) == want:
            return step
    raise CheckpointError(
        f"{stack}: sparse blocks {want} of {num_layers} do not follow any 'i % step == 1' pattern; switchformer "
        "models (like transformers') cannot represent this layout"
    )


def _hf_default_step(num_layers: int, num_sparse: int) -> int:
    """What ``SwitchTransformersConfig.__post_init__`` computes when the JSON has no explicit step."""
    return num_layers // num_sparse if num_sparse > 0 else num_layers


def _activation_from_hf(hf: Mapping[str, Any]) -> tuple[str, bool]:
    """(activation name for ModelConfig, gated?) from feed_forward_proj / dense_act_fn / is_gated_act."""
    proj = str(hf.get("feed_forward_proj") or "")
    gated = bool(hf.get("is_gated_act", False)) or proj.startswith("gated-")
    act = proj.split("-")[-1] if proj else str(hf.get("dense_act_fn", "relu"))
    if gated:
        if act not in ("gelu", "gelu_new"):
            raise ValueError(f"feed_forward_proj={proj!r}: only 'relu' and 'gated-gelu' FFNs are supported")
        return "gated-gelu", True
    act = str(hf.get("dense_act_fn", act) or act)
    if act != "relu":
        raise ValueError(
            f"dense_act_fn={act!r}: switchformer supports 'relu' (T5 v1.0, the released Switch checkpoints) and "
            "'gated-gelu' FFNs only"
        )
    return "relu", False


def config_from_hf(hf_config: Mapping[str, Any] | Any) -> ModelConfig:
    """Translate a transformers ``SwitchTransformersConfig`` (object or config.json dict) into a :class:`ModelConfig`.

    The routing is set to transformers' semantics: ``moe.expert_capacity = expert_capacity`` (a fixed capacity per
    sequence, tokens served in order), float32 router, top-1, input jitter ``router_jitter_noise`` (training only).
    A config.json written by :func:`save_pretrained` carries switchformer's own config under the ``"switchformer"``
    key; that one is returned as is, so a save/load round trip is exact.

    The sparse steps are taken from explicit ``encoder_sparse_step``/``decoder_sparse_step`` values when present
    (saved JSON values override transformers' recomputation), otherwise recomputed as transformers does
    (``num_layers // num_sparse_layers``). :func:`from_pretrained` then replaces them by what the weights show.

    Args:
        hf_config: a mapping (config.json) or an object with the same attributes.

    Returns:
        The equivalent ModelConfig.

    Raises:
        ValueError: unsupported features (router bias, activations other than relu / gated-gelu, other model types).
    """
    if isinstance(hf_config, Mapping):
        hf = dict(hf_config)
    else:
        hf = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else vars(hf_config))
    marker = hf.get(MARKER)
    if isinstance(marker, Mapping) and "model_config" in marker:
        return ModelConfig.from_dict(dict(marker["model_config"]))
    model_type = hf.get("model_type", HF_MODEL_TYPE)
    if model_type not in (HF_MODEL_TYPE, "t5"):
        raise ValueError(f"hf_config: model_type {model_type!r} is not 'switch_transformers'")
    if hf.get("router_bias", False):
        raise ValueError("hf_config: router_bias=True is not supported (the Switch router has no bias, Eq. 1)")
    activation, _ = _activation_from_hf(hf)
    num_layers = int(hf.get("num_layers", 12))
    num_decoder_layers = hf.get("num_decoder_layers")
    num_decoder_layers = num_layers if num_decoder_layers is None else int(num_decoder_layers)
    if model_type == "t5":  # a dense T5 (v1.0 relu or v1.1 gated-gelu): the FLOP-matched baseline, no experts
        enc_step = dec_step = 0
    elif "encoder_sparse_step" in hf:
        enc_step = int(hf["encoder_sparse_step"])
    else:
        enc_step = _hf_default_step(num_layers, int(hf.get("num_sparse_encoder_layers", 3)))
    if model_type == "t5":
        pass
    elif "decoder_sparse_step" in hf:
        dec_step = int(hf["decoder_sparse_step"])
    else:
        dec_step = _hf_default_step(num_decoder_layers, int(hf.get("num_sparse_decoder_layers", 3)))
    jitter = float(hf.get("router_jitter_noise", 0.01) or 0.0)
    eos = hf.get("eos_token_id", 1)
    if isinstance(eos, list):  # generation configs allow several; the model config needs one
        eos = eos[0]
    pad = hf.get("pad_token_id", 0)
    pad = 0 if pad is None else int(pad)
    start = hf.get("decoder_start_token_id")
    tied = bool(hf.get("tie_word_embeddings", True))
    if model_type == "t5":
        # transformers 5.x T5 forces tie_word_embeddings=True and keeps the v1.1 "no output scaling" flag apart as
        # scale_decoder_outputs. Our tie implies the d_model**-0.5 scaling (T5 v1.0), so unscaled means untied.
        tied = bool(hf.get("scale_decoder_outputs", tied))
    moe = MoEConfig(
        num_experts=int(hf.get("num_experts", 8)),
        top_k=1,
        expert_capacity=int(hf.get("expert_capacity", 64)),
        router_dtype=str(hf.get("router_dtype", "float32")),  # type: ignore[arg-type]
        exploration="input_jitter" if jitter > 0 else "argmax",
        jitter_eps=jitter,
    )
    return ModelConfig(
        arch="encoder_decoder",
        vocab_size=int(hf.get("vocab_size", 32128)),
        d_model=int(hf.get("d_model", 768)),
        d_ff=int(hf.get("d_ff", 2048)),
        d_kv=int(hf.get("d_kv", 64)),
        num_heads=int(hf.get("num_heads", 12)),
        num_layers=num_layers,
        num_decoder_layers=num_decoder_layers,
        encoder_sparse_step=enc_step,
        decoder_sparse_step=dec_step,
        feed_forward_proj=activation,  # type: ignore[arg-type]
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        dropout_rate=float(hf.get("dropout_rate", 0.1)),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        tie_word_embeddings=tied,
        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        z_loss_coef=float(hf.get("router_z_loss_coef", 0.001)),
        pad_token_id=pad,
        eos_token_id=int(eos if eos is not None else 1),
        decoder_start_token_id=int(start if start is not None else pad),
        moe=moe,
    )


def hf_unsupported(cfg: ModelConfig) -> list[str]:
    """Features of ``cfg`` that transformers' SwitchTransformers cannot load or reproduce (empty: fully compatible).

    Entries starting with ``'load:'`` prevent loading (transformers has no such module); the others load but route
    differently in transformers.
    """
    out = []
    if cfg.arch != "encoder_decoder":
        out.append("load: decoder-only models have no transformers Switch class")
    if cfg.switch_attention:
        out.append("load: switch_attention (experts in Q/K/V, App. A)")
    if cfg.feed_forward_proj != "relu":
        out.append("load: gated FFNs (transformers' Switch implements only DenseActDense)")
    m = cfg.moe
    if m.top_k != 1:
        out.append(f"top_k={m.top_k} (transformers routes top-1)")
    if m.expert_capacity is None:
        out.append("capacity factors (transformers uses a fixed per-sequence expert_capacity)")
    if m.group_size is not None:
        out.append("group_size (transformers routes each sequence as a group)")
    if m.batch_prioritized_routing:
        out.append("batch_prioritized_routing (transformers serves tokens in order)")
    if m.no_token_left_behind:
        out.append("no_token_left_behind")
    return out


def config_to_hf(cfg: ModelConfig, *, expert_capacity: int | None = None) -> dict[str, Any]:
    """Translate a :class:`ModelConfig` into a transformers ``SwitchTransformersConfig`` dict (config.json).

    Both ``num_sparse_*_layers`` and explicit ``*_sparse_step`` values are written: transformers recomputes the step
    from the former in ``__init__`` and then lets the saved step override it, so the sparse layout survives for
    every step (including the ones ``num_layers // num_sparse`` cannot express). The full switchformer config is
    stored under the ``"switchformer"`` key (transformers ignores it) so :func:`config_from_hf` restores it exactly.

    Args:
        cfg: the model config (``arch`` must be 'encoder_decoder').
        expert_capacity: per-sequence capacity to write; default ``cfg.moe.expert_capacity`` or, for models
            routed with capacity factors, 64 (the released checkpoints' value).

    Returns:
        A JSON-serialisable dict.

    Raises:
        ValueError: ``cfg`` is decoder-only.
    """
    if cfg.arch != "encoder_decoder":
        raise ValueError("cfg: transformers' SwitchTransformers is encoder-decoder; decoder-only models are saved "
                         "in switchformer's native format (save_pretrained does this automatically)")
    cap = expert_capacity if expert_capacity is not None else cfg.moe.expert_capacity
    cap = 64 if cap is None else int(cap)
    gated = cfg.feed_forward_proj == "gated-gelu"
    enc_sparse = sparse_blocks(cfg.num_layers, cfg.encoder_sparse_step)
    dec_sparse = sparse_blocks(cfg.num_decoder_layers, cfg.decoder_sparse_step)
    jitter = cfg.moe.jitter_eps if cfg.moe.exploration == "input_jitter" else 0.0
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_ff": cfg.d_ff,
        "d_kv": cfg.d_kv,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "num_sparse_encoder_layers": len(enc_sparse),
        "num_sparse_decoder_layers": len(dec_sparse),
        "encoder_sparse_step": cfg.encoder_sparse_step,
        "decoder_sparse_step": cfg.decoder_sparse_step,
        "num_experts": cfg.moe.num_experts,
        "expert_capacity": cap,
        "router_bias": False,
        "router_jitter_noise": float(jitter),
        "router_dtype": cfg.moe.router_dtype,
        "router_ignore_padding_tokens": False,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout_rate,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "router_z_loss_coef": cfg.z_loss_coef,
        "router_aux_loss_coef": cfg.aux_loss_coef,
        "initializer_factor": 1.0,
        "feed_forward_proj": cfg.feed_forward_proj,
        "dense_act_fn": "gelu_new" if gated else "relu",
        "is_gated_act": gated,
        "is_encoder_decoder": True,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        MARKER: {"format_version": FORMAT_VERSION, "format": "hf", "model_config": cfg.to_dict()},
    }


# ----------------------------------------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------------------------------------


def _ffn_names(gated: bool) -> tuple[str, ...]:
    return ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")


def hf_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a transformers checkpoint of ``cfg`` holds, with its shape (tied aliases excluded).

    Args:
        cfg: an encoder-decoder ModelConfig.

    Returns:
        ``{hf_key: shape}`` in transformers' module order.
    """
    M, F, V, E = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.moe.num_experts
    inner = cfg.num_heads * cfg.d_kv
    gated = cfg.feed_forward_proj == "gated-gelu"
    shapes: dict[str, tuple[int, ...]] = {"shared.weight": (V, M)}
    if not cfg.tie_word_embeddings:
        # transformers 5.x unties *all* embeddings when tie_word_embeddings is False.
        shapes["encoder.embed_tokens.weight"] = (V, M)
        shapes["decoder.embed_tokens.weight"] = (V, M)

    def attn(prefix: str, rel_bias: bool) -> None:
        for p in "qkv":
            shapes[f"{prefix}.{p}.weight"] = (inner, M)
        shapes[f"{prefix}.o.weight"] = (M, inner)
        if rel_bias:
            shapes[f"{prefix}.relative_attention_bias.weight"] = (cfg.relative_attention_num_buckets, cfg.num_heads)

    def ffn(prefix: str, sparse: bool) -> None:
        names = _ffn_names(gated)
        if sparse:
            shapes[f"{prefix}.mlp.router.classifier.weight"] = (E, M)
            for j in range(E):
                for n in names:
                    shapes[f"{prefix}.mlp.experts.expert_{j}.{n}.weight"] = (M, F) if n == "wo" else (F, M)
        else:
            for n in names:
                shapes[f"{prefix}.mlp.{n}.weight"] = (M, F) if n == "wo" else (F, M)
        shapes[f"{prefix}.layer_norm.weight"] = (M,)

    for stack, n_layers, step in (
        ("encoder", cfg.num_layers, cfg.encoder_sparse_step),
        ("decoder", cfg.num_decoder_layers, cfg.decoder_sparse_step),
    ):
        for i in range(n_layers):
            b = f"{stack}.block.{i}.layer"
            attn(f"{b}.0.SelfAttention", rel_bias=i == 0)
            shapes[f"{b}.0.layer_norm.weight"] = (M,)
            if stack == "decoder":
                attn(f"{b}.1.EncDecAttention", rel_bias=False)
                shapes[f"{b}.1.layer_norm.weight"] = (M,)
            ffn(f"{b}.{2 if stack == 'decoder' else 1}", _is_sparse(i, step))
        shapes[f"{stack}.final_layer_norm.weight"] = (M,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, M)
    return shapes


def _check_keys(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], *, what: str,
                strict: bool = True) -> list[str]:
    """Compare key->shape maps; raise CheckpointError listing every problem. Returns the missing keys."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
                 for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if misshaped or (strict and (missing or unexpected)):
        lines = [f"{what} does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title} key(s): " + ", ".join(items[:50])
                             + (f", ... ({len(items) - 50} more)" if len(items) > 50 else ""))
        if not misshaped:
            lines.append("  (pass strict=False to load anyway; missing weights keep their random init)")
        raise CheckpointError("\n".join(lines))
    if missing or unexpected:
        warnings.warn(f"{what}: {len(missing)} missing key(s) left at random init: {missing[:20]}; "
                      f"{len(unexpected)} unexpected key(s) ignored: {unexpected[:20]}", stacklevel=3)
    return missing


def infer_sparse_steps(keys: Iterable[str], cfg: ModelConfig) -> ModelConfig:
    """Return ``cfg`` with its sparse steps (and gated activation) replaced by what the checkpoint keys show.

    Routers (``...mlp.router.classifier.weight``) mark sparse blocks. A disagreement with config.json warns, since
    the weights are the ground truth (e.g. switch-c-2048's JSON says ``decoder_sparse_step: 0``).
    """
    keys = list(keys)
    sparse: dict[str, set[int]] = {"encoder": set(), "decoder": set()}
    gated = None
    for k in keys:
        m = _BLOCK_FFN_RE.match(k)
        if not m:
            continue
        if m["rest"] == "router.classifier.weight":
            sparse[m["stack"]].add(int(m["i"]))
        elif m["rest"].endswith(("wi_0.weight", "wi_1.weight")):
            gated = True
        elif m["rest"].endswith("wi.weight"):
            gated = False if gated is None else gated
    enc = sparse_step_from_blocks(sparse["encoder"], cfg.num_layers, stack="encoder")
    dec = sparse_step_from_blocks(sparse["decoder"], cfg.num_decoder_layers, stack="decoder")
    changes: dict[str, Any] = {}
    if sparse["encoder"] != set(sparse_blocks(cfg.num_layers, cfg.encoder_sparse_step)):
        changes["encoder_sparse_step"] = enc
    if sparse["decoder"] != set(sparse_blocks(cfg.num_decoder_layers, cfg.decoder_sparse_step)):
        changes["decoder_sparse_step"] = dec
    if gated is not None and gated != (cfg.feed_forward_proj == "gated-gelu"):
        changes["feed_forward_proj"] = "gated-gelu" if gated else "relu"
    if changes:
        warnings.warn(f"config.json disagrees with the weights; using the weights' layout: {changes}", stacklevel=2)
        cfg = dataclasses.replace(cfg, **changes)
    return cfg


def _map_hf_key(key: str, gated: bool) -> tuple[str, int | None]:
    """transformers key -> (switchformer key, expert index or None)."""
    m = _EXPERT_RE.match(key)
    if m:
        w = m["w"]
        name = {"wi": "w_in", "wi_1": "w_in", "wi_0": "w_gate", "wo": "w_out"}[w]
        if (w == "wi" and gated) or (w in ("wi_0", "wi_1") and not gated):
            raise CheckpointError(f"{key}: {'gated' if gated else 'non-gated'} model cannot take this expert weight")
        return f"{m['ffn']}.experts.{name}", int(m["j"])
    m = _ROUTER_HF_RE.match(key)
    if m:
        return f"{m['ffn']}.router.weight", None
    return key, None


def _convert_from_hf(
    items: Iterable[tuple[str, Callable[[], torch.Tensor]]],
    cfg: ModelConfig,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Stream (hf_key, loader) pairs into a switchformer state dict, stacking experts in place.

    Each stacked expert tensor is allocated once at its final dtype/device and filled slice by slice, so peak
    memory is the converted model plus one source tensor (shards are never all resident).
    """
    gated = cfg.feed_forward_proj == "gated-gelu"
    E = cfg.moe.num_experts
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, set[int]] = {}
    for key, load in items:
        if cfg.tie_word_embeddings and key in TIED_ALIASES:
            continue  # aliases of shared.weight (older checkpoints store them); transformers ties them too
        if not cfg.tie_word_embeddings and key in TIED_ALIASES[:2]:
            continue  # checked equal to shared.weight by the caller
        new_key, j = _map_hf_key(key, gated)
        t = load()
        t = t.to(device=device if device is not None else t.device,
                 dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
        if j is None:
            out[new_key] = t
            continue
        if new_key not in out:
            out[new_key] = torch.empty((E, *t.shape), dtype=t.dtype, device=t.device)
            filled[new_key] = set()
        out[new_key][j].copy_(t)
        filled[new_key].add(j)
    incomplete = {k: sorted(set(range(E)) - v) for k, v in filled.items() if len(v) != E}
    if incomplete:
        raise CheckpointError(f"experts missing from the checkpoint (never left at random init): {incomplete}")
    return out


def state_dict_from_hf(hf_sd: Mapping[str, torch.Tensor], cfg: ModelConfig, *, strict: bool = True
                       ) -> dict[str, torch.Tensor]:
    """Convert a transformers SwitchTransformers state dict into switchformer's (experts stacked, router renamed).

    Args:
        hf_sd: ``{hf_key: tensor}``; the tied aliases ``encoder/decoder.embed_tokens.weight`` and (tied)
            ``lm_head.weight`` may be present and are dropped.
        cfg: the target config (its sparse steps must match the keys; see :func:`infer_sparse_steps`).
        strict: raise on missing or unexpected keys (mis-shaped keys always raise).

    Returns:
        ``{switchformer_key: tensor}``; expert tensors ``[E, F, M]`` / ``[E, M, F]`` are new stacked copies.

    Raises:
        CheckpointError: lists missing, unexpected and mis-shaped keys.
    """
    hf_sd = {canonical_key(k): v for k, v in hf_sd.items()}
    found = {k: tuple(v.shape) for k, v in hf_sd.items()}
    _validate_hf(found, cfg, strict=strict, get=lambda k: hf_sd[k])
    return _convert_from_hf(((k, (lambda k=k: hf_sd[k])) for k in hf_sd if k in hf_param_shapes(cfg)
                             or k in TIED_ALIASES), cfg)


def _validate_hf(found: Mapping[str, tuple[int, ...]], cfg: ModelConfig, *, strict: bool,
                 get: Callable[[str], torch.Tensor], what: str = "checkpoint") -> list[str]:
    # The embed_tokens copies are optional even when untied: transformers 4.x always tied them to shared.weight and
    # did not save them (switch-c-2048 is untied and has none); transformers 5.x saves them for untied models.
    aliases = TIED_ALIASES if cfg.tie_word_embeddings else TIED_ALIASES[:2]
    expected = {k: v for k, v in hf_param_shapes(cfg).items() if k not in aliases}
    tolerated = {k: v for k, v in found.items() if k not in aliases}
    missing = _check_keys(tolerated, expected, what=what, strict=strict)
    for k in aliases:
        if k in found and tuple(found[k]) != expected["shared.weight"]:
            raise CheckpointError(f"{what}: {k} (an alias of shared.weight) has shape {found[k]}, shared.weight is "
                                  f"{expected['shared.weight']}")
    if not cfg.tie_word_embeddings:
        # switchformer has one input embedding; transformers 5.x keeps three untied copies. Accept only equal ones.
        shared = get("shared.weight") if "shared.weight" in found else None
        for k in TIED_ALIASES[:2]:
            if shared is not None and k in found and not torch.equal(get(k), shared):
                raise CheckpointError(
                    f"{what}: {k} differs from shared.weight; switchformer models share one input embedding "
                    "between encoder and decoder (untied means only lm_head is separate)")
    return missing


def state_dict_to_hf(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, *, include_tied_aliases: bool = False
                     ) -> dict[str, torch.Tensor]:
    """Convert a switchformer state dict into transformers' key layout (experts unstacked, router renamed).

    transformers 5.x ``save_pretrained`` writes only ``shared.weight`` for tied models and ties the aliases when
    loading; ``include_tied_aliases=True`` adds ``encoder/decoder.embed_tokens.weight`` and ``lm_head.weight``
    (views of ``shared.weight``) for consumers that expect the old pickled layout. Untied models get the
    ``encoder/decoder.embed_tokens.weight`` copies transformers 5.x requires.

    Args:
        sd: switchformer state dict (``model.state_dict()``).
        cfg: its config (encoder-decoder).
        include_tied_aliases: also emit the tied aliases.

    Returns:
        ``{hf_key: tensor}``; expert tensors are views ``w[j]`` of the stacked weights (clone before saving).

    Raises:
        CheckpointError: the result does not match :func:`hf_param_shapes` (e.g. unknown switchformer keys).
    """
    if cfg.arch != "encoder_decoder" or cfg.switch_attention:
        raise ValueError("cfg: only encoder-decoder models without switch_attention have a transformers layout")
    gated = cfg.feed_forward_proj == "gated-gelu"
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue
        m = _STACKED_RE.match(key)
        if m:
            hf_name = {"w_in": "wi_1" if gated else "wi", "w_gate": "wi_0", "w_out": "wo"}[m["w"]]
            for j in range(t.shape[0]):
                out[f"{m['ffn']}.experts.expert_{j}.{hf_name}.weight"] = t[j]
            continue
        m = _ROUTER_RE.match(key)
        if m:
            out[f"{m['ffn']}.router.classifier.weight"] = t
            continue
        out[key] = t
    if not cfg.tie_word_embeddings:
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
        out["decoder.embed_tokens.weight"] = out["shared.weight"]
    _check_keys({k: tuple(v.shape) for k, v in out.items()}, hf_param_shapes(cfg), what="switchformer state dict")
    ordered = {k: out[k] for k in hf_param_shapes(cfg)}
    if include_tied_aliases and cfg.tie_word_embeddings:
        for k in TIED_ALIASES:
            ordered[k] = ordered["shared.weight"]
    return ordered


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def _resolve_dir(path_or_id: str | os.PathLike, *, revision: str | None, cache_dir: str | os.PathLike | None,
                 local_files_only: bool) -> Path:
    """A local directory, or a Hub repo id downloaded (safetensors, config, tokenizer only) with huggingface_hub."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        raise ValueError(f"path_or_id: {p} is a file; pass the directory that holds config.json and the weights")
    name = str(path_or_id)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.startswith((".", "/")):
        raise FileNotFoundError(f"path_or_id: {name!r} is not a directory and not a Hub repo id like "
                                "'google/switch-base-8'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise FileNotFoundError(
            f"{name!r} is not a local directory and huggingface_hub is not installed to download it. Install it "
            "(`pip install huggingface_hub`) or pass a local directory holding config.json and model.safetensors"
        ) from e
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS,
                                      local_files_only=local_files_only))
    except Exception as e:  # offline, unknown repo, gated repo, proxy: all end in the same advice
        raise FileNotFoundError(
            f"could not download {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). If this machine is "
            "offline, download it elsewhere, e.g. `huggingface-cli download "
            f"{name} --include 'config.json' '*.safetensors' '{INDEX_NAME}' 'spiece.model' --local-dir DIR`, "
            "copy DIR here and pass that local directory"
        ) from e


def _weight_files(d: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory; refuses pickled-only checkpoints."""
    index = d / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not present: {absent}")
        return files
    if (d / WEIGHTS_NAME).is_file():
        return [d / WEIGHTS_NAME]
    pickles = [n for n in PICKLE_NAMES if (d / n).exists()]
    if pickles:
        raise ValueError(
            f"{d} holds only pickled weights ({', '.join(pickles)}); switchformer never unpickles checkpoints "
            "(arbitrary code execution). Convert them to safetensors on a machine you trust, e.g. with "
            "transformers: SwitchTransformersForConditionalGeneration.from_pretrained(DIR)"
            ".save_pretrained(NEW_DIR), or download the repo's model.safetensors"
        )
    raise FileNotFoundError(f"{d}: no {WEIGHTS_NAME} or {INDEX_NAME} found")


def _dtype(d: torch.dtype | str | None) -> torch.dtype | None:
    if d is None or isinstance(d, torch.dtype):
        return d
    t = getattr(torch, str(d), None)
    if not isinstance(t, torch.dtype):
        raise ValueError(f"dtype: {d!r} is not a torch dtype (use e.g. 'float32' or torch.bfloat16)")
    return t


class _Shards:
    """Lazy access to all tensors of a (sharded) safetensors checkpoint: headers first, data on demand."""

    def __init__(self, files: list[Path], device: str) -> None:
        from safetensors import safe_open

        self._open = safe_open
        self.files = files
        self.device = device
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.stored: dict[str, str] = {}  # canonical key -> key in the file
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as h:
                for k in h.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    c = canonical_key(k)
                    self.where[c], self.stored[c] = f, k
                    self.shapes[c] = tuple(h.get_slice(k).get_shape())

    def alias(self, new: str, existing: str) -> None:
        """Make ``new`` read the tensor stored as ``existing``."""
        self.where[new], self.stored[new], self.shapes[new] = (
            self.where[existing], self.stored[existing], self.shapes[existing])

    def get(self, key: str) -> torch.Tensor:
        with self._open(str(self.where[key]), framework="pt", device=self.device) as h:
            return h.get_tensor(self.stored[key])

    def stream(self, keys: Iterable[str]) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        """Yield (canonical key, loader) shard by shard, each shard opened once."""
        wanted = set(keys)
        for f in self.files:
            with self._open(str(f), framework="pt", device=self.device) as h:
                for c in self.shapes:  # insertion order: the file's order, aliases last
                    if c in wanted and self.where[c] == f:
                        yield c, (lambda k=self.stored[c], h=h: h.get_tensor(k))


def _build(cfg: ModelConfig, *, meta: bool) -> nn.Module:
    from switchformer.models import build_model

    # init=False on meta: no random init is computed for weights that are about to be assigned.
    return build_model(cfg, init=False, device="meta") if meta else build_model(cfg)


def _load_into(cfg: ModelConfig, sd: dict[str, torch.Tensor], *, strict: bool, device: torch.device | str | None,
               dtype: torch.dtype | None) -> nn.Module:
    """Build the model without allocating random weights (meta device) and assign the loaded tensors."""
    model = _build(cfg, meta=strict)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # a tied lm_head shares shared.weight; assigned below
    _check_keys({k: tuple(v.shape) for k, v in sd.items()}, expected, what="converted checkpoint", strict=strict)
    if strict:
        model.load_state_dict(sd, strict=False, assign=True)
        _retie(model, cfg)
        leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftovers:
            # Non-persistent buffers (not in any checkpoint) cannot be assigned: rebuild for real and copy instead.
            real = _build(cfg, meta=False)
            real.load_state_dict(sd, strict=False)
            _retie(real, cfg)
            model = real
    else:
        model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
        _retie(model, cfg)
    if dtype is not None:
        model.to(dtype=dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def _retie(model: nn.Module, cfg: ModelConfig) -> None:
    """Re-establish a shared lm_head after assign-loading, when the model implements the tie as a module."""
    if not cfg.tie_word_embeddings:
        return
    if hasattr(model, "tie_weights"):
        model.tie_weights()
        return
    head = getattr(model, "lm_head", None)
    shared = getattr(model, "shared", None)
    if isinstance(head, nn.Linear) and isinstance(shared, nn.Embedding):
        head.weight = shared.weight


def from_pretrained(
    path_or_id: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    strict: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> nn.Module:
    """Load a switchformer model from a checkpoint directory or a Hugging Face Hub id.

    Accepts transformers SwitchTransformers checkpoints (config.json + ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``; e.g. ``google/switch-base-8``), dense transformers T5 checkpoints (v1.0 relu
    or v1.1 gated-gelu; loaded as the all-dense baseline, sparse steps 0) and switchformer's native format
    (decoder-only and gated models). The model is built on the meta device and the checkpoint tensors are assigned
    shard by shard, so the weights are allocated once. Returned in eval mode.

    Args:
        path_or_id: a local directory, or a Hub repo id (downloaded with ``huggingface_hub`` when installed and
            online; only config, safetensors and tokenizer files).
        dtype: parameter dtype (default: as stored, float32 for the released checkpoints).
        device: where to put the model (default CPU).
        strict: raise on missing or unexpected keys (mis-shaped keys always raise). With ``strict=False`` missing
            weights keep their random init and a warning lists them.
        revision: Hub revision.
        cache_dir: Hub cache directory.
        local_files_only: use only the local Hub cache.

    Returns:
        The model (an ``nn.Module`` with ``.config``), in eval mode.

    Raises:
        CheckpointError: missing / unexpected / mis-shaped keys, listed.
        ValueError: pickled-only checkpoint, unsupported config.
        FileNotFoundError: no such directory, or the Hub is unreachable.
    """
    dt = _dtype(dtype)
    d = _resolve_dir(path_or_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    if not (d / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{d}: no {CONFIG_NAME}")
    raw = json.loads((d / CONFIG_NAME).read_text())
    files = _weight_files(d)
    shards = _Shards(files, device=str(device) if device is not None and str(device) != "meta" else "cpu")
    marker = raw.get(MARKER) if isinstance(raw.get(MARKER), Mapping) else {}
    if marker.get("format") == "native":
        cfg = ModelConfig.from_dict(dict(marker["model_config"]))
        sd = _convert_native(shards, dt)
        return _load_into(cfg, sd, strict=strict, device=device, dtype=dt)
    cfg = infer_sparse_steps(shards.shapes, config_from_hf(raw))
    if not cfg.tie_word_embeddings and "lm_head.weight" not in shards.shapes and raw.get("model_type") == "t5":
        shards.alias("lm_head.weight", "shared.weight")  # transformers 5.x T5 ties the head without scaling
    _validate_hf(shards.shapes, cfg, strict=strict, get=shards.get, what=str(d))
    keep = [k for k in shards.shapes if k in hf_param_shapes(cfg)]
    sd = _convert_from_hf(shards.stream(keep), cfg, dtype=dt, device=device)
    return _load_into(cfg, sd, strict=strict, device=device, dtype=dt)


def from_transformers(hf_model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Convert an in-memory transformers ``SwitchTransformersForConditionalGeneration`` into a switchformer model.

    Same mapping and checks as :func:`from_pretrained` (sparse layout read from the module's keys); the weights are
    copied (experts stacked), so the two models are independent. Returned in eval mode.

    Args:
        hf_model: the transformers model (``.config`` and ``.state_dict()`` are used).
        strict: raise on missing or unexpected keys.
    """
    hf_sd = {canonical_key(k): v for k, v in hf_model.state_dict().items()}
    cfg = infer_sparse_steps(hf_sd.keys(), config_from_hf(hf_model.config))
    sd = state_dict_from_hf(hf_sd, cfg, strict=strict)
    # Stacked expert tensors are new; everything else still shares storage with the transformers model.
    sd = {k: v if _STACKED_RE.match(k) else v.detach().clone() for k, v in sd.items()}
    return _load_into(cfg, sd, strict=strict, device=None, dtype=None)


def _convert_native(shards: _Shards, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for k, load in shards.stream(shards.shapes):
        t = load()
        out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size: {size!r} is not a size like 5GB, 500MB or an int number of bytes")
    unit = m[2].upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m[1]) * base**power)


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], *, max_shard_size: int | str,
                       metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write tensors as one file or as shards plus an index (transformers' naming), one shard in memory at a time."""
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    for old in [*path.glob("model-*-of-*.safetensors"), path / WEIGHTS_NAME, path / INDEX_NAME]:
        if old.is_file():
            old.unlink()  # stale shards of an earlier save would be picked up next to the new index
    groups: list[list[str]] = [[]]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    meta = {"format": "pt", **(metadata or {})}
    names = [WEIGHTS_NAME] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, keys in zip(names, groups, strict=True):
        # clone: expert slices are views of one stacked tensor and safetensors refuses shared storage.
        chunk = {k: tensors[k].detach().to("cpu").contiguous().clone() for k in keys}
        save_file(chunk, str(path / name), metadata=meta)
        del chunk
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, keys in zip(names, groups, strict=True) for k in keys}}
        (path / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return [path / n for n in names]


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    format: Literal["auto", "hf", "native"] = "auto",
    expert_capacity: int | None = None,
) -> Path:
    """Save a model as config.json + safetensors that transformers (encoder-decoder) or switchformer loads.

    ``format='auto'`` writes transformers' layout (``SwitchTransformersForConditionalGeneration.from_pretrained``
    loads it) for encoder-decoder relu models, and switchformer's native layout (config.json with a
    ``"switchformer"`` marker + our keys) for what transformers has no module for: decoder-only, gated FFN,
    switch_attention. Routing features transformers does not reproduce (top-2, capacity factors, BPR, NTLB) are
    saved, restored by :func:`from_pretrained`, and reported with a warning.

    Args:
        model: a switchformer model (has ``.config``).
        path: output directory (created).
        max_shard_size: shard limit (bytes or '5GB'); larger checkpoints get ``model-0000i-of-0000n.safetensors``
            and ``model.safetensors.index.json``.
        format: 'auto', 'hf' or 'native'.
        expert_capacity: per-sequence capacity written for transformers (see :func:`config_to_hf`).

    Returns:
        The directory.
    """
    cfg: ModelConfig = model.config
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"model: expected a switchformer model with a ModelConfig .config, got {type(cfg)}")
    if format not in ("auto", "hf", "native"):
        raise ValueError(f"format: {format!r} is not one of 'auto', 'hf', 'native'")
    problems = hf_unsupported(cfg)
    blocking = [p for p in problems if p.startswith("load:")]
    if format == "hf" and blocking:
        raise ValueError(f"format='hf': transformers cannot load this model: {blocking}; use format='native'")
    use_hf = format == "hf" or (format == "auto" and not blocking)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    if use_hf:
        if problems:
            warnings.warn(f"saved for transformers, which will route differently: {problems}", stacklevel=2)
        config = config_to_hf(cfg, expert_capacity=expert_capacity)
        tensors = state_dict_to_hf(sd, cfg)
        gen = {"decoder_start_token_id": cfg.decoder_start_token_id, "eos_token_id": cfg.eos_token_id,
               "pad_token_id": cfg.pad_token_id}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    else:
        config = {"model_type": "switchformer", "architectures": ["switchformer"],
                  MARKER: {"format_version": FORMAT_VERSION, "format": "native", "model_config": cfg.to_dict()}}
        tensors = _dedupe_shared(sd)
    _write_safetensors(out, tensors, max_shard_size=max_shard_size)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _dedupe_shared(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage (a tied lm_head); loading re-ties them."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for k, t in sd.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen and t.numel() > 0:
            continue
        seen.add(ident)
        out[k] = t
    return out


def _num_params_hf(cfg: ModelConfig) -> int:
    """Distinct parameters of the transformers layout of ``cfg`` (437 tensors / 619,339,008 for switch-base-8)."""
    return sum(math.prod(s) for s in hf_param_shapes(cfg).values())
