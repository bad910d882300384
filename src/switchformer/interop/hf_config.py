"""Config translation: a transformers ``SwitchTransformersConfig`` (config.json dict) <-> :class:`ModelConfig`.

Routing semantics: a config translated from transformers gets ``moe.expert_capacity = expert_capacity``, i.e.
transformers' fixed per-sequence capacity with tokens served in order, a float32 router and top-1 routing (paper §2.1,
Eq. 1-2), which is what transformers 5.24 computes in eval mode (docs/checkpoints.md lists the differences).

Sparse blocks follow transformers' rule (:func:`switchformer.config.is_sparse_block`). transformers recomputes the
sparse step from ``num_sparse_*_layers`` in ``__init__`` but a saved ``*_sparse_step`` value overrides it, and
released configs are not always right about it (switch-c-2048's says ``decoder_sparse_step: 0`` although its decoder
has experts), so :func:`switchformer.interop.from_pretrained` takes the layout from the weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from switchformer.config import ModelConfig, is_sparse_block
from switchformer.dtypes import parse_dtype
from switchformer.errors import CheckpointError
from switchformer.interop.files import FORMAT_VERSION
from switchformer.models.presets import RELEASED_EXPERT_CAPACITY

__all__ = [
    "HF_ARCHITECTURE",
    "HF_MODEL_TYPE",
    "MARKER",
    "config_from_hf",
    "config_to_hf",
    "hf_unsupported",
    "sparse_blocks",
    "sparse_step_from_blocks",
]

HF_MODEL_TYPE = "switch_transformers"
HF_ARCHITECTURE = "SwitchTransformersForConditionalGeneration"
MARKER = "switchformer"
"""Key of config.json that holds switchformer's own ModelConfig (transformers keeps unknown keys and ignores them)."""


def sparse_blocks(num_layers: int, step: int) -> list[int]:
    """Indices of the sparse blocks of a stack of ``num_layers`` blocks under sparse step ``step``."""
    return [i for i in range(num_layers) if is_sparse_block(i, step)]


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


_NOT_NULL = object()


class _Fields:
    """Typed reads of config.json fields: a wrong type (or a null where none is allowed) is a CheckpointError naming
    the field. A missing field takes ``default`` (transformers' default); a null takes ``null`` when given."""

    def __init__(self, hf: Mapping[str, Any], source: str) -> None:
        self.hf = hf
        self.source = source

    def _get(self, name: str, default: Any, null: Any, want: str, ok) -> Any:
        if name not in self.hf:
            return default
        value = self.hf[name]
        if value is None and null is not _NOT_NULL:
            return null
        if not ok(value):
            raise CheckpointError(f"{self.source}: field {name!r} must be {want}, got {value!r} "
                                  f"({type(value).__name__}); fix it, or remove it to use transformers' default")
        return value

    def get_int(self, name: str, default: Any, *, null: Any = _NOT_NULL) -> Any:
        def ok(v: Any) -> bool:
            integral_float = isinstance(v, float) and math.isfinite(v) and v.is_integer()
            return integral_float or (isinstance(v, int) and not isinstance(v, bool))

        v = self._get(name, default, null, "an integer", ok)
        return int(v) if isinstance(v, float) else v

    def get_float(self, name: str, default: Any, *, null: Any = _NOT_NULL) -> Any:
        def ok(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        v = self._get(name, default, null, "a finite number", ok)
        return float(v) if v is not None else v

    def get_bool(self, name: str, default: Any) -> Any:
        return self._get(name, default, _NOT_NULL, "true or false", lambda v: isinstance(v, bool))

    def get_str(self, name: str, default: Any, *, null: Any = _NOT_NULL) -> Any:
        return self._get(name, default, null, "a string", lambda v: isinstance(v, str))


def _activation_from_hf(f: _Fields) -> str:
    """The ModelConfig activation from feed_forward_proj / dense_act_fn / is_gated_act."""
    proj = f.get_str("feed_forward_proj", "", null="")
    gated = f.get_bool("is_gated_act", False) or proj.startswith("gated-")
    act = proj.split("-")[-1] if proj else f.get_str("dense_act_fn", "relu", null="relu")
    if gated:
        if act not in ("gelu", "gelu_new"):
            raise CheckpointError(f"{f.source}: feed_forward_proj={proj!r}: only 'relu' and 'gated-gelu' FFNs are "
                                  "supported")
        return "gated-gelu"
    act = f.get_str("dense_act_fn", act, null=act) or act
    if act != "relu":
        raise CheckpointError(
            f"{f.source}: dense_act_fn={act!r}: switchformer supports 'relu' (T5 v1.0, the released Switch "
            "checkpoints) and 'gated-gelu' FFNs only"
        )
    return "relu"


def config_from_hf(hf_config: Mapping[str, Any] | Any, *, source: str = "config.json") -> ModelConfig:
    """Translate a transformers ``SwitchTransformersConfig`` (object or config.json dict) into a :class:`ModelConfig`.

    The routing is set to transformers' semantics: ``moe.expert_capacity = expert_capacity`` (a fixed capacity per
    sequence, tokens served in order), float32 router, top-1, input jitter ``router_jitter_noise`` (training only).
    A config.json written by :func:`switchformer.save_pretrained` carries switchformer's own config under the
    ``"switchformer"`` key; that one is returned as is, so a save/load round trip is exact. Dense transformers T5
    configs (``model_type: "t5"``) give the all-dense baseline (sparse steps 0).

    The sparse steps are taken from explicit ``encoder_sparse_step``/``decoder_sparse_step`` values when present
    (saved JSON values override transformers' recomputation), otherwise recomputed as transformers does
    (``num_layers // num_sparse_layers``). :func:`switchformer.interop.from_pretrained` then replaces them by what
    the weights show.

    Args:
        hf_config: a mapping (config.json) or an object with the same attributes.
        source: what the messages call the config (the file path when read from disk).

    Returns:
        The equivalent ModelConfig.

    Raises:
        CheckpointError: a field of the wrong type or null (the message names it), or an unsupported feature
            (router bias, activations other than relu / gated-gelu, other model types).
    """
    if isinstance(hf_config, Mapping):
        hf = dict(hf_config)
    else:
        hf = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else vars(hf_config))
    marker = hf.get(MARKER)
    if isinstance(marker, Mapping) and "model_config" in marker:
        return _model_config(marker["model_config"], f"{source}: {MARKER}.model_config")
    f = _Fields(hf, source)
    model_type = f.get_str("model_type", HF_MODEL_TYPE)
    if model_type not in (HF_MODEL_TYPE, "t5"):
        raise CheckpointError(f"{source}: model_type {model_type!r} is not 'switch_transformers' (or a dense 't5')")
    if f.get_bool("router_bias", False):
        raise CheckpointError(f"{source}: router_bias=True is not supported (the Switch router has no bias, "
                              "paper §2.1, Eq. 1)")
    activation = _activation_from_hf(f)
    num_layers = f.get_int("num_layers", 12)
    num_decoder_layers = f.get_int("num_decoder_layers", num_layers, null=num_layers)
    if model_type == "t5":  # a dense T5 (v1.0 relu or v1.1 gated-gelu): the FLOP-matched baseline, no experts
        enc_step = dec_step = 0
    else:
        enc_step = f.get_int("encoder_sparse_step", None)
        if enc_step is None:  # transformers' recomputation (no explicit step in the JSON)
            enc_step = _hf_default_step(num_layers, f.get_int("num_sparse_encoder_layers", 3))
        dec_step = f.get_int("decoder_sparse_step", None)
        if dec_step is None:
            dec_step = _hf_default_step(num_decoder_layers, f.get_int("num_sparse_decoder_layers", 3))
    jitter = f.get_float("router_jitter_noise", 0.01, null=0.0)
    eos = hf.get("eos_token_id", 1)
    if isinstance(eos, list) and eos:  # generation configs allow several; the model config needs one
        hf["eos_token_id"] = eos[0]
    pad = f.get_int("pad_token_id", 0, null=0)
    tied = f.get_bool("tie_word_embeddings", True)
    if model_type == "t5":
        # transformers 5.x T5 forces tie_word_embeddings=True and keeps the v1.1 "no output scaling" flag apart as
        # scale_decoder_outputs. Our tie implies the d_model**-0.5 scaling (T5 v1.0), so unscaled means untied.
        tied = f.get_bool("scale_decoder_outputs", tied)
    fields = dict(
        arch="encoder_decoder",
        vocab_size=f.get_int("vocab_size", 32128),
        d_model=f.get_int("d_model", 768),
        d_ff=f.get_int("d_ff", 2048),
        d_kv=f.get_int("d_kv", 64),
        num_heads=f.get_int("num_heads", 12),
        num_layers=num_layers,
        num_decoder_layers=num_decoder_layers,
        encoder_sparse_step=enc_step,
        decoder_sparse_step=dec_step,
        feed_forward_proj=activation,
        relative_attention_num_buckets=f.get_int("relative_attention_num_buckets", 32),
        relative_attention_max_distance=f.get_int("relative_attention_max_distance", 128),
        dropout_rate=f.get_float("dropout_rate", 0.1),
        layer_norm_epsilon=f.get_float("layer_norm_epsilon", 1e-6),
        tie_word_embeddings=tied,
        aux_loss_coef=f.get_float("router_aux_loss_coef", 0.001),
        z_loss_coef=f.get_float("router_z_loss_coef", 0.001),
        pad_token_id=pad,
        eos_token_id=f.get_int("eos_token_id", 1, null=1),
        decoder_start_token_id=f.get_int("decoder_start_token_id", pad, null=pad),
        moe=dict(
            num_experts=f.get_int("num_experts", 8),
            top_k=1,
            expert_capacity=f.get_int("expert_capacity", RELEASED_EXPERT_CAPACITY),
            router_dtype=_dtype_name(f, "router_dtype", "float32"),
            exploration="input_jitter" if jitter > 0 else "argmax",
            jitter_eps=jitter,
        ),
    )
    return _model_config(fields, source)


def _dtype_name(f: _Fields, name: str, default: str) -> str:
    """A dtype field as ModelConfig spells it (``"float32"``; transformers may write ``"torch.float32"``)."""
    value = f.get_str(name, default)
    try:
        return str(parse_dtype(value, name=name)).removeprefix("torch.")
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{f.source}: {e}") from None


def _model_config(fields: Any, source: str) -> ModelConfig:
    """ModelConfig.from_dict with its errors (wrong type, out of range) reported as the checkpoint's."""
    try:
        return ModelConfig.from_dict(dict(fields) if isinstance(fields, Mapping) else fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def hf_unsupported(cfg: ModelConfig) -> list[str]:
    """Features of ``cfg`` that transformers' SwitchTransformers cannot load or reproduce (empty: fully compatible).

    Entries starting with ``'load:'`` prevent loading (transformers has no such module); the others load but route
    differently in transformers.
    """
    out = []
    if cfg.arch != "encoder_decoder":
        out.append("load: decoder-only models have no transformers Switch class")
    if cfg.switch_attention:
        out.append("load: switch_attention (experts in Q/K/V, paper App. A)")
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
            routed with capacity factors (which transformers cannot express), the released checkpoints' 64.

    Returns:
        A JSON-serialisable dict.

    Raises:
        ValueError: ``cfg`` is decoder-only.
    """
    if cfg.arch != "encoder_decoder":
        raise ValueError("cfg: transformers' SwitchTransformers is encoder-decoder; decoder-only models are saved "
                         "in switchformer's native format (save_pretrained does this automatically)")
    cap = expert_capacity if expert_capacity is not None else cfg.moe.expert_capacity
    cap = RELEASED_EXPERT_CAPACITY if cap is None else int(cap)
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
