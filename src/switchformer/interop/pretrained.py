"""The entry points that build models from checkpoint directories and write them: ``from_pretrained``,
``save_pretrained``, ``from_transformers``.

They join the three pieces below them: the config translation (:mod:`~switchformer.interop.hf_config`), the
state-dict mapping (:mod:`~switchformer.interop.state_dict`) and the safetensors files
(:mod:`~switchformer.interop.files`), and find the weight files with :mod:`~switchformer.interop.hub`. Checkpoints
are written as safetensors and read from safetensors when the checkpoint has them (on the requested revision, or in
the Hub's safetensors conversion pull request); a checkpoint with only a pickled ``pytorch_model.bin`` is read through
``torch.load(weights_only=True)``, PyTorch's restricted unpickler (tensors and containers only; anything else is
refused, never run). Two layouts:

- transformers' (``SwitchTransformersForConditionalGeneration``, and dense T5): config.json + ``model.safetensors``
  or a sharded ``model.safetensors.index.json``; ``google/switch-base-8`` and friends load directly, and what
  :func:`save_pretrained` writes loads in transformers.
- switchformer's native one, for what transformers has no module for (decoder-only, gated FFN, switch_attention):
  config.json with a ``"switchformer"`` marker holding the ModelConfig, and switchformer's own keys.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from switchformer.config import ModelConfig
from switchformer.dtypes import parse_dtype
from switchformer.errors import CheckpointError
from switchformer.interop.files import (
    CONFIG_NAME,
    FORMAT_VERSION,
    ShardReader,
    read_json_object,
    unique_tensors,
    write_sharded,
    write_text_atomic,
)
from switchformer.interop.hf_config import MARKER, config_from_hf, config_to_hf, hf_unsupported
from switchformer.interop.hub import PickleReader, ResolvedWeights, open_weights, resolve_weights
from switchformer.interop.state_dict import (
    canonical_key,
    check_keys,
    convert_from_hf,
    hf_param_shapes,
    infer_sparse_steps,
    is_stacked_key,
    state_dict_from_hf,
    state_dict_to_hf,
    validate_hf,
)
from switchformer.models.build import build_model

__all__ = ["from_pretrained", "from_transformers", "save_pretrained"]

DEFAULT_MAX_SHARD_SIZE = "5GB"
"""transformers' default shard limit."""


def _read_config(d: Path) -> dict[str, Any]:
    path = d / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{d}: no {CONFIG_NAME}; pass the directory that holds config.json and the weights")
    return read_json_object(path, "re-download or re-save the checkpoint")


def _load_into(cfg: ModelConfig, sd: dict[str, torch.Tensor], *, strict: bool, device: torch.device | str | None,
               dtype: torch.dtype | None) -> nn.Module:
    """Build the model without allocating random weights (meta device) and assign the loaded tensors.

    With ``strict=False`` the model is built for real, so that missing weights keep their random init.
    """
    model = build_model(cfg, init=False, device="meta") if strict else build_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys({k: tuple(v.shape) for k, v in sd.items()}, expected, what="converted checkpoint", strict=strict)
    if strict:
        model.load_state_dict(sd, strict=False, assign=True)
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            # Non-persistent buffers (not in any checkpoint) cannot be assigned: rebuild for real and copy instead.
            model = build_model(cfg)
            model.load_state_dict(sd, strict=False)
    else:
        model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    if dtype is not None:
        model.to(dtype=dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def _convert_native(shards: ShardReader | PickleReader, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for k, load in shards.stream(shards.shapes):
        t = load()
        out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def _check_native_marker(marker: Mapping[str, Any], source: str) -> None:
    if not isinstance(marker.get("model_config"), Mapping):
        raise CheckpointError(f"{source}: '{MARKER}.model_config' is missing or not an object; a native switchformer "
                              "checkpoint needs it: re-save the model with switchformer.save_pretrained")
    version = marker.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{source}: '{MARKER}.format_version' is {version!r}, this switchformer reads "
                              f"{FORMAT_VERSION}; load it with the switchformer version that wrote it")


def from_pretrained(
    path_or_id: str | os.PathLike | ResolvedWeights,
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
    (decoder-only and gated models). The weight file is chosen by :func:`~switchformer.interop.hub.resolve_weights`:
    safetensors on the requested revision, else the Hub's safetensors conversion pull request, else the pickled
    ``pytorch_model.bin`` through ``torch.load(weights_only=True, mmap=True)``; the choice is logged and left on the
    model as ``model.weights_source`` (a :class:`~switchformer.interop.hub.ResolvedWeights`). The model is built on
    the meta device and the checkpoint tensors are assigned shard by shard, so the weights are allocated once.
    Returned in eval mode.

    Args:
        path_or_id: a local directory, a Hub repo id (downloaded with ``huggingface_hub`` when installed and online:
            config, tokenizer and the weight files chosen), or a ``ResolvedWeights`` from ``resolve_weights``.
        dtype: parameter dtype (default: as stored, float32 for the released checkpoints).
        device: where to put the model (default CPU).
        strict: raise on missing or unexpected keys (mis-shaped keys always raise). With ``strict=False`` missing
            weights keep their random init and a warning lists them.
        revision: Hub revision (branch, tag, commit or ``refs/pr/N``).
        cache_dir: Hub cache directory.
        local_files_only: use only the local Hub cache.

    Returns:
        The model (an ``nn.Module`` with ``.config``), in eval mode.

    Raises:
        CheckpointError: a config.json field of the wrong type, a bad shard index, a pickle that needs more than
            tensors and containers (refused, not run), an unsupported config, or missing / unexpected / mis-shaped
            keys (all listed).
        FileNotFoundError: no such directory, no weights, or the Hub is unreachable.
    """
    dt = None if dtype is None else parse_dtype(dtype, name="dtype")
    resolved = path_or_id if isinstance(path_or_id, ResolvedWeights) else resolve_weights(
        path_or_id, revision, cache_dir, local_files_only=local_files_only)
    model = _load_resolved(resolved, dt=dt, device=device, strict=strict)
    model.weights_source = resolved
    return model


def _load_resolved(resolved: ResolvedWeights, *, dt: torch.dtype | None, device: torch.device | str | None,
                   strict: bool) -> nn.Module:
    d = resolved.directory
    raw = _read_config(d)
    source = str(d / CONFIG_NAME)
    shards = open_weights(resolved, device=str(device) if device is not None and str(device) != "meta" else "cpu",
                          rename=canonical_key)
    marker = raw.get(MARKER) if isinstance(raw.get(MARKER), Mapping) else {}
    if marker.get("format") == "native":
        _check_native_marker(marker, source)
        cfg = config_from_hf(raw, source=source)
        sd = _convert_native(shards, dt)
        return _load_into(cfg, sd, strict=strict, device=device, dtype=dt)
    cfg = infer_sparse_steps(shards.shapes, config_from_hf(raw, source=source))
    if not cfg.tie_word_embeddings and "lm_head.weight" not in shards.shapes and raw.get("model_type") == "t5":
        shards.alias("lm_head.weight", "shared.weight")  # transformers 5.x T5 ties the head without scaling
    validate_hf(shards.shapes, cfg, strict=strict, get=shards.get, what=str(d))
    expected = hf_param_shapes(cfg)
    sd = convert_from_hf(shards.stream([k for k in shards.shapes if k in expected]), cfg, dtype=dt, device=device)
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
    cfg = infer_sparse_steps(hf_sd.keys(), config_from_hf(hf_model.config, source="hf_model.config"))
    sd = state_dict_from_hf(hf_sd, cfg, strict=strict)
    # Stacked expert tensors are new; everything else still shares storage with the transformers model.
    sd = {k: v if is_stacked_key(k) else v.detach().clone() for k, v in sd.items()}
    return _load_into(cfg, sd, strict=strict, device=None, dtype=None)


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    format: Literal["auto", "hf", "native"] = "auto",
    expert_capacity: int | None = None,
) -> Path:
    """Save a model as config.json + safetensors that transformers (encoder-decoder) or switchformer loads.

    ``format='auto'`` writes transformers' layout (``SwitchTransformersForConditionalGeneration.from_pretrained``
    loads it) for encoder-decoder relu models, and switchformer's native layout (config.json with a
    ``"switchformer"`` marker + our keys) for what transformers has no module for: decoder-only, gated FFN,
    switch_attention. Routing features transformers does not reproduce (top-2, capacity factors, BPR, NTLB) are
    saved, restored by :func:`from_pretrained`, and reported with a warning. Every file is written atomically.

    Args:
        model: a switchformer model (has ``.config``).
        path: output directory (created).
        max_shard_size: shard limit (bytes or '5GB'); larger checkpoints get ``model-0000i-of-0000n.safetensors``
            and ``model.safetensors.index.json``.
        format: 'auto', 'hf' or 'native'.
        expert_capacity: per-sequence capacity written for transformers (see
            :func:`switchformer.interop.config_to_hf`).

    Returns:
        The directory.

    Raises:
        TypeError: ``model`` is not a switchformer model.
        ValueError: an unknown ``format``, or ``format='hf'`` for a model transformers cannot load.
    """
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"model: expected a switchformer model with a ModelConfig .config, got {type(cfg).__name__}")
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
        write_text_atomic(out / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    else:
        config = {"model_type": "switchformer", "architectures": ["switchformer"],
                  MARKER: {"format_version": FORMAT_VERSION, "format": "native", "model_config": cfg.to_dict()}}
        tensors = unique_tensors(sd)
    write_sharded(out, tensors, max_shard_size=max_shard_size)
    write_text_atomic(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return out
