"""The checkpoint mapping: transformers' SwitchTransformers state dict <-> switchformer's, tensors in, tensors out.

No files and no models here: the functions take and return ``{name: tensor}`` dicts (or a stream of ``(name,
loader)`` pairs), so sharded loading and distributed checkpoints can reuse them. The module tree of
:mod:`switchformer.models` mirrors transformers' key names one to one except for the Switch FFN (paper §2.1), whose
experts are stacked into ``[E, ...]`` tensors:

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

``<ffn>`` is ``encoder.block.{i}.layer.1`` or ``decoder.block.{i}.layer.2``. transformers' dense T5 names the FFN
``DenseReluDense``; :func:`canonical_key` reads it as ``mlp``. Which blocks are sparse is read from the keys present
(:func:`infer_sparse_steps`), not trusted from config.json.

Shape suffixes: E experts, F d_ff, M d_model, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from switchformer.config import ModelConfig, is_sparse_block
from switchformer.errors import CheckpointError
from switchformer.interop.hf_config import sparse_blocks, sparse_step_from_blocks

__all__ = [
    "TIED_ALIASES",
    "canonical_key",
    "check_keys",
    "convert_from_hf",
    "hf_param_shapes",
    "infer_sparse_steps",
    "is_stacked_key",
    "map_hf_key",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "validate_hf",
]

TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
"""transformers keys that alias ``shared.weight`` in a tied model (only the first two when untied)."""
MAX_LISTED_KEYS = 50
"""Keys listed per kind (missing, unexpected, mis-shaped) in a mismatch error; the rest are counted."""

_EXPERT_RE = re.compile(r"^(?P<ffn>.+\.mlp)\.experts\.expert_(?P<j>\d+)\.(?P<w>wi|wi_0|wi_1|wo)\.weight$")
_STACKED_RE = re.compile(r"^(?P<ffn>.+\.mlp)\.experts\.(?P<w>w_in|w_gate|w_out)$")
_ROUTER_HF_RE = re.compile(r"^(?P<ffn>.+\.mlp)\.router\.classifier\.weight$")
_ROUTER_RE = re.compile(r"^(?P<ffn>.+\.mlp)\.router\.weight$")
_T5_FFN_RE = re.compile(r"\.layer\.(\d+)\.DenseReluDense\.")
_BLOCK_FFN_RE = re.compile(r"^(?P<stack>encoder|decoder)\.block\.(?P<i>\d+)\.layer\.(?P<l>\d+)\.mlp\.(?P<rest>.+)$")


def canonical_key(key: str) -> str:
    """transformers' T5 names the dense FFN ``DenseReluDense``; SwitchTransformers and switchformer use ``mlp``."""
    return _T5_FFN_RE.sub(r".layer.\1.mlp.", key)


def is_stacked_key(key: str) -> bool:
    """Whether ``key`` is one of switchformer's stacked expert tensors (``...mlp.experts.w_in/w_gate/w_out``)."""
    return _STACKED_RE.match(key) is not None


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
            ffn(f"{b}.{2 if stack == 'decoder' else 1}", is_sparse_block(i, step))
        shapes[f"{stack}.final_layer_norm.weight"] = (M,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, M)
    return shapes


def check_keys(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], *, what: str,
               strict: bool = True) -> list[str]:
    """Compare key -> shape maps; raise CheckpointError listing every problem. Returns the missing keys.

    Mis-shaped keys always raise; missing and unexpected keys raise when ``strict``, else warn.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
                 for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if misshaped or (strict and (missing or unexpected)):
        lines = [f"{what} does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                more = len(items) - MAX_LISTED_KEYS
                lines.append(f"  {len(items)} {title} key(s): " + ", ".join(items[:MAX_LISTED_KEYS])
                             + (f", ... ({more} more)" if more > 0 else ""))
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


def map_hf_key(key: str, gated: bool) -> tuple[str, int | None]:
    """One transformers key -> ``(switchformer key, expert index or None)``: ``...experts.expert_{j}.wi.weight`` is
    row ``j`` of ``...experts.w_in``; other keys keep their name (routers are renamed). Per tensor, so that a loader
    can decide which tensors to read before reading any (expert parallelism reads only its own experts)."""
    m = _EXPERT_RE.match(key)
    if m:
        w = m["w"]
        name = {"wi": "w_in", "wi_1": "w_in", "wi_0": "w_gate", "wo": "w_out"}[w]
        if (w == "wi" and gated) or (w in ("wi_0", "wi_1") and not gated):
            kind = "gated" if gated else "non-gated"
            raise CheckpointError(f"{key}: the checkpoint mixes gated and non-gated expert weights; a {kind} model "
                                  "cannot take this one (the checkpoint is inconsistent: re-export it)")
        return f"{m['ffn']}.experts.{name}", int(m["j"])
    m = _ROUTER_HF_RE.match(key)
    if m:
        return f"{m['ffn']}.router.weight", None
    return key, None


def convert_from_hf(
    items: Iterable[tuple[str, Callable[[], torch.Tensor]]],
    cfg: ModelConfig,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Stream ``(hf_key, loader)`` pairs into a switchformer state dict, stacking experts in place.

    Each stacked expert tensor is allocated once at its final dtype/device and filled slice by slice, so peak
    memory is the converted model plus one source tensor (shards are never all resident). Floating tensors are cast
    to ``dtype`` when given.

    Raises:
        CheckpointError: an expert of a sparse layer is missing (never left at random init), or a gated / non-gated
            expert weight does not fit ``cfg``.
    """
    gated = cfg.feed_forward_proj == "gated-gelu"
    E = cfg.moe.num_experts
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, set[int]] = {}
    for key, load in items:
        if cfg.tie_word_embeddings and key in TIED_ALIASES:
            continue  # aliases of shared.weight (older checkpoints store them); transformers ties them too
        if not cfg.tie_word_embeddings and key in TIED_ALIASES[:2]:
            continue  # checked equal to shared.weight by validate_hf
        new_key, j = map_hf_key(key, gated)
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
        raise CheckpointError(f"experts missing from the checkpoint (never left at random init): {incomplete}; the "
                              "checkpoint is incomplete: re-download it (every shard) or re-export it")
    return out


def validate_hf(found: Mapping[str, tuple[int, ...]], cfg: ModelConfig, *, strict: bool,
                get: Callable[[str], torch.Tensor], what: str = "checkpoint") -> list[str]:
    """Check transformers keys/shapes ``found`` against ``cfg``; ``get`` loads a tensor for the untied-copy check.

    The embed_tokens copies are optional even when untied: transformers 4.x always tied them to shared.weight and
    did not save them (switch-c-2048 is untied and has none); transformers 5.x saves them for untied models, and
    switchformer (one input embedding) accepts them only when equal to ``shared.weight``.

    Returns:
        The missing keys (empty when ``strict``).

    Raises:
        CheckpointError: missing / unexpected (when ``strict``) / mis-shaped keys, or untied embedding copies that
            differ from ``shared.weight``.
    """
    aliases = TIED_ALIASES if cfg.tie_word_embeddings else TIED_ALIASES[:2]
    expected = {k: v for k, v in hf_param_shapes(cfg).items() if k not in aliases}
    tolerated = {k: v for k, v in found.items() if k not in aliases}
    missing = check_keys(tolerated, expected, what=what, strict=strict)
    for k in aliases:
        if k in found and tuple(found[k]) != expected["shared.weight"]:
            raise CheckpointError(f"{what}: {k} (an alias of shared.weight) has shape {found[k]}, shared.weight is "
                                  f"{expected['shared.weight']}")
    if not cfg.tie_word_embeddings:
        shared = get("shared.weight") if "shared.weight" in found else None
        for k in TIED_ALIASES[:2]:
            if shared is not None and k in found and not torch.equal(get(k), shared):
                raise CheckpointError(
                    f"{what}: {k} differs from shared.weight; switchformer models share one input embedding "
                    "between encoder and decoder (untied means only lm_head is separate)")
    return missing


def state_dict_from_hf(hf_sd: Mapping[str, torch.Tensor], cfg: ModelConfig, *, strict: bool = True
                       ) -> dict[str, torch.Tensor]:
    """Convert a transformers SwitchTransformers state dict into switchformer's (experts stacked, router renamed).

    Args:
        hf_sd: ``{hf_key: tensor}``; the tied aliases ``encoder/decoder.embed_tokens.weight`` and (tied)
            ``lm_head.weight`` may be present and are dropped.
        cfg: the target config (its sparse steps must match the keys; see :func:`infer_sparse_steps`).
        strict: raise on missing or unexpected keys (mis-shaped keys always raise).

    Returns:
        ``{switchformer_key: tensor}``; expert tensors ``[E, F, M]`` / ``[E, M, F]`` are new stacked copies, the
        others are the input tensors.

    Raises:
        CheckpointError: lists missing, unexpected and mis-shaped keys.
    """
    hf_sd = {canonical_key(k): v for k, v in hf_sd.items()}
    validate_hf({k: tuple(v.shape) for k, v in hf_sd.items()}, cfg, strict=strict, get=lambda k: hf_sd[k])
    expected = hf_param_shapes(cfg)
    return convert_from_hf(((k, (lambda k=k: hf_sd[k])) for k in hf_sd if k in expected or k in TIED_ALIASES), cfg)


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
        ValueError: ``cfg`` has no transformers layout (decoder-only, switch_attention).
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
    expected = hf_param_shapes(cfg)
    check_keys({k: tuple(v.shape) for k, v in out.items()}, expected, what="switchformer state dict")
    ordered = {k: out[k] for k in expected}
    if include_tied_aliases and cfg.tie_word_embeddings:
        for k in TIED_ALIASES:
            ordered[k] = ordered["shared.weight"]
    return ordered
