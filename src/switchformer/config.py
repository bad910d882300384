"""Typed configuration: every knob of switchformer has exactly one home, here.

Dataclasses with a one-line docstring-comment per field. Recipes are TOML files in ``configs/``; the command
line applies dotted overrides (``model.moe.num_experts=16``) that are validated against these dataclasses, so an
unknown key or a wrong type is an error that lists the valid keys.

This module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

ExplorationPolicy = Literal["input_jitter", "argmax", "sample", "input_dropout"]
ActivationName = Literal["relu", "gated-gelu"]


@dataclass
class MoEConfig:
    """The Switch feed-forward layer (paper.md §1). Defaults follow the paper and Mesh TensorFlow's ``MoE1D``."""

    num_experts: int = 8
    """Experts per sparse layer (N in Eq. 1)."""
    top_k: int = 1
    """Experts per token: 1 is Switch routing; k >= 2 is the top-k 'MoE' baseline of Table 1 (renormalised gates)."""
    capacity_factor: float | None = 1.25
    """Training capacity factor (Eq. 3); None means dropless: every token is processed."""
    eval_capacity_factor: float | None = 2.0
    """Capacity factor used when the module is in eval mode; None means dropless."""
    expert_capacity: int | None = None
    """Fixed capacity per sequence (transformers' SwitchTransformers semantics); overrides the factors."""
    min_capacity: int = 4
    """Lower bound on the per-group capacity (Mesh TensorFlow's ``min_expert_capacity``)."""
    group_size: int | None = None
    """Tokens per routing group (the paper's 'tokens per core'); None routes all tokens of a call as one group."""
    router_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Router precision. float32 is the paper's selective precision (§2.4, Table 2)."""
    exploration: ExplorationPolicy = "input_jitter"
    """Exploration policy during training (App. C, Table 11)."""
    jitter_eps: float = 0.01
    """Input jitter: the router's copy of the input is multiplied by U(1-eps, 1+eps) while training."""
    router_input_dropout: float = 0.1
    """Dropout rate on the router input for the 'input_dropout' policy."""
    batch_prioritized_routing: bool = False
    """Give capacity to the most confident tokens first (flaxformer's BPR) instead of token order."""
    no_token_left_behind: bool = False
    """Re-route tokens that overflow their expert to their next choices (App. B)."""
    ntlb_top_k: int = 4
    """How many choices No-Token-Left-Behind tries (Mesh TensorFlow's ``ntlb_top_k``)."""
    expert_dropout: float = 0.0
    """Dropout on the experts' hidden activations (§2.4: 0.4 when fine-tuning)."""
    second_expert_threshold: float = 0.0
    """Top-2 'random' policy: use the 2nd expert with probability min(1, g2/threshold); 0 disables (always use)."""


@dataclass
class ModelConfig:
    """A Switch (or dense T5) model. Field names follow T5/transformers so configs convert one to one."""

    arch: Literal["encoder_decoder", "decoder_only"] = "encoder_decoder"
    """Encoder-decoder (T5 v1.0, the released checkpoints) or a decoder-only causal LM from the same blocks."""
    vocab_size: int = 32128
    """Embedding rows (32000 SentencePiece pieces + 100 sentinels, padded to a multiple of 128)."""
    d_model: int = 768
    """Width of the residual stream."""
    d_ff: int = 3072
    """Hidden width of each FFN (dense or one expert)."""
    d_kv: int = 64
    """Width of one attention head."""
    num_heads: int = 12
    """Attention heads."""
    num_layers: int = 12
    """Encoder layers (decoder-only models: the number of layers)."""
    num_decoder_layers: int = 12
    """Decoder layers of an encoder-decoder model."""
    encoder_sparse_step: int = 2
    """A block i is sparse when step == 1 or i % step == 1 (transformers' convention); 0 means all dense."""
    decoder_sparse_step: int = 2
    """As encoder_sparse_step, for the decoder (and for decoder-only models)."""
    feed_forward_proj: ActivationName = "relu"
    """FFN activation: 'relu' (T5 v1.0, released Switch checkpoints) or 'gated-gelu' (Table 9's GEGLU)."""
    relative_attention_num_buckets: int = 32
    """Relative position buckets (T5)."""
    relative_attention_max_distance: int = 128
    """Largest distinguished relative distance (T5)."""
    dropout_rate: float = 0.1
    """Dropout on the residual branches and attention probabilities."""
    layer_norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = True
    """Tie the LM head to the embeddings, with d_model**-0.5 output scaling (T5 v1.0)."""
    init_scale: float = 0.1
    """Weight init: truncated normal with std sqrt(init_scale / fan_in) (§2.4: 0.1 instead of 1.0)."""
    switch_attention: bool = False
    """Experts in place of the Q/K/V projections (App. A)."""
    aux_loss_coef: float = 0.01
    """Load-balancing loss weight alpha (§2.2), applied to the mean over sparse layers."""
    z_loss_coef: float = 0.0
    """Router z-loss weight (ST-MoE); 0 in the Switch paper."""
    pad_token_id: int = 0
    """Padding id (T5)."""
    eos_token_id: int = 1
    """End-of-sequence id (T5)."""
    decoder_start_token_id: int = 0
    """First decoder input id (T5 uses the pad id)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """The Switch layer settings shared by every sparse block."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # from JSON / TOML
            self.moe = MoEConfig(**self.moe)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return from_dict(cls, data)


def from_dict(cls, data: dict):
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys with the list of valid ones."""
    valid = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(valid)}")
    kwargs = {}
    for name, value in data.items():
        f = valid[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value)
        kwargs[name] = value
    return cls(**kwargs)


@dataclass
class DataConfig:
    """Where text comes from, how it is tokenized, and the pretraining objective (paper.md §3)."""

    corpus: str = "stdlib"
    """'stdlib' (the running Python's standard-library sources), or comma-separated paths/globs of .txt/.py/.md,
    'file.jsonl' (see text_field), 'file.parquet', or 'hf:NAME[:CONFIG]' / a local datasets directory."""
    text_field: str = "text"
    """Field holding the text in JSONL, Parquet and datasets inputs."""
    val_fraction: float = 0.05
    """Fraction of files (documents) held out for validation; the split is by file, deterministic."""
    max_bytes: int | None = None
    """Cap on the corpus size read, in bytes (None: everything)."""
    tokenizer: str | None = None
    """Path to an existing spiece.model; None trains a SentencePiece unigram model on the corpus (cached)."""
    vocab_size: int = 8000
    """Pieces of a trained tokenizer, before the 100 sentinels are added."""
    num_sentinels: int = 100
    """Sentinel tokens <extra_id_0..N-1> (T5), at the top of the vocabulary."""
    objective: Literal["span_corruption", "causal_lm"] = "span_corruption"
    """T5 span corruption (encoder-decoder) or next-token prediction (decoder-only)."""
    input_length: int = 128
    """Encoder (or decoder-only) sequence length after packing."""
    noise_density: float = 0.15
    """Fraction of tokens corrupted by span corruption (§2.3)."""
    mean_noise_span_length: float = 3.0
    """Mean corrupted span length (T5 default)."""
    seed: int = 0
    """Seed of the data order and of the corruption noise."""
