"""Typed configuration: every knob of switchformer has exactly one home, here.

Dataclasses with a one-line docstring-comment per field. Recipes are TOML files in ``configs/``; the command
line applies dotted overrides (``model.moe.num_experts=16``) that are validated against these dataclasses, so an
unknown key or a wrong type is an error that lists the valid keys.

Every config is checked when it is made (``__post_init__``: types, then ranges), and again after overrides, so a
bad value (``train.log_every=0``, ``model.num_heads=0``) fails at load with a ``ConfigError`` naming the key and a
valid value, not deep inside training. ``from_dict`` is the one dict -> dataclass builder.

This module imports only the standard library (and ``tomli`` on Python 3.10, which has no ``tomllib``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Literal

from switchformer.errors import ConfigError


class ConfigTypeError(ConfigError, TypeError):
    """A config value has the wrong type (a ``ConfigError`` that is also the ``TypeError`` Python callers expect)."""

IGNORE_INDEX = -100
"""Label value of positions that carry no target (PyTorch's ``cross_entropy`` default, T5X and transformers)."""

VOCAB_MULTIPLE = 128
"""Embedding rows are the tokenizer's vocabulary rounded up to a multiple of this (T5's 32100 -> 32128)."""


def round_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (the embedding size for a tokenizer of ``n`` pieces)."""
    return -(-n // multiple) * multiple


def is_sparse_block(index: int, sparse_step: int) -> bool:
    """Whether block ``index`` of a stack is a Switch block: step > 0 and (step == 1 or index % step == 1).

    transformers' SwitchTransformers convention: with step 2 the sparse blocks are 1, 3, 5, ... (every other FFN is a
    Switch layer: paper Table 1 caption, Table 9 'Expert Freq. 1/2'); step 1 makes every block sparse (Switch-C);
    step 0 is the dense T5 baseline.
    """
    if sparse_step < 0:
        raise ValueError(f"sparse step must be >= 0 (0 = dense), got {sparse_step}")
    return sparse_step > 0 and (sparse_step == 1 or index % sparse_step == 1)


ExplorationPolicy = Literal["input_jitter", "argmax", "sample", "input_dropout"]
ActivationName = Literal["relu", "gated-gelu"]


@dataclass
class MoEConfig:
    """The Switch feed-forward layer (paper §2.1, §2.2). Defaults follow the paper and Mesh TensorFlow's ``MoE1D``."""

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
    router_dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    """Router precision. float32 is the paper's selective precision (§2.4, Table 2); float64 serves float64
    verification runs."""
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

    def __post_init__(self) -> None:
        """Check every field's type and range when the config is made: ``ConfigError`` names the field and the fix."""
        import math

        from switchformer.errors import ConfigError

        def fail(name: str, need: str, fix: str = "") -> None:
            value = getattr(self, name)
            raise ConfigError(f"moe.{name} must be {need}, got {value!r}" + (f"; {fix}" if fix else ""))

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("num_experts", "top_k", "ntlb_top_k"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "a positive int")
        if self.top_k > self.num_experts:
            fail("top_k", f"at most num_experts={self.num_experts}", "lower top_k or add experts")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not (is_real(value) and value > 0):
                fail(name, "a finite number > 0, or None for dropless routing", "1.0-2.0 is typical (paper Table 1)")
        for name in ("expert_capacity", "group_size"):
            value = getattr(self, name)
            if value is not None and not (is_int(value) and value >= 1):
                fail(name, "a positive int or None")
        if not is_int(self.min_capacity) or self.min_capacity < 0:
            fail("min_capacity", "an int >= 0", "4 is Mesh TensorFlow's default")
        if self.router_dtype not in ("float32", "bfloat16", "float16", "float64"):
            fail("router_dtype", "one of 'float32', 'bfloat16', 'float16', 'float64'",
                 "float32 is selective precision (§2.4)")
        if self.exploration not in ("input_jitter", "argmax", "sample", "input_dropout"):
            fail("exploration", "one of 'input_jitter', 'argmax', 'sample', 'input_dropout' (paper App. C)")
        for name in ("jitter_eps", "router_input_dropout", "expert_dropout"):
            value = getattr(self, name)
            if not (is_real(value) and 0 <= value < 1):
                fail(name, "a number in [0, 1)")
        if not (is_real(self.second_expert_threshold) and 0 <= self.second_expert_threshold <= 1):
            fail("second_expert_threshold", "a number in [0, 1]", "0 always uses the second expert")
        for name in ("batch_prioritized_routing", "no_token_left_behind"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")
        if self.no_token_left_behind and self.top_k != 1:
            fail("no_token_left_behind", "False when top_k > 1", "No-Token-Left-Behind re-routes top-1 tokens")


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
        _check_types(self, "model")  # also builds ``moe`` from a dict (JSON / TOML)
        for name in ("vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "num_layers"):
            _check_range(self, "model", name, ge=1)
        _check_range(self, "model", "num_decoder_layers", ge=1 if self.arch == "encoder_decoder" else 0)
        _check_range(self, "model", "encoder_sparse_step", ge=0, hint="0 means every block is dense")
        _check_range(self, "model", "decoder_sparse_step", ge=0, hint="0 means every block is dense")
        # T5's bucketing needs an exact range of >= 1 (bidirectional) and a log range above the exact one
        _check_range(self, "model", "relative_attention_num_buckets", ge=4)
        _check_range(self, "model", "relative_attention_max_distance", gt=self.relative_attention_num_buckets // 2,
                     hint="more than half of model.relative_attention_num_buckets")
        _check_range(self, "model", "dropout_rate", ge=0.0, lt=1.0)
        _check_range(self, "model", "layer_norm_epsilon", ge=0.0)
        _check_range(self, "model", "init_scale", gt=0.0)
        _check_range(self, "model", "aux_loss_coef", ge=0.0)
        _check_range(self, "model", "z_loss_coef", ge=0.0)
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            _check_range(self, "model", name, ge=0, lt=self.vocab_size, hint="a token id below model.vocab_size")

    @property
    def is_sparse(self) -> bool:
        """Whether the model has any Switch layer (a decoder-only model has no encoder: its step is ignored)."""
        encoder_step = self.encoder_sparse_step if self.arch == "encoder_decoder" else 0
        return bool(encoder_step or self.decoder_sparse_step or self.switch_attention)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """A validated ModelConfig from a (nested) dict, e.g. a saved model's JSON (see ``from_dict``)."""
        return from_dict(cls, data, "model")


@dataclass
class DataConfig:
    """Where text comes from, how it is tokenized, and the pretraining objective (paper §3)."""

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
    languages: dict[str, str] = field(default_factory=dict)
    """Multilingual corpus, one source per language: {language code: source}, each source any data.corpus form
    or 'fortunes:LANG' (Debian's fortunes-* packages). Replaces data.corpus when set; TOML:
    [data.languages] de = "fortunes:de"; override: data.languages={de="fortunes:de", en="fortunes:en"}."""
    language_field: str | None = None
    """JSONL field naming each record's language (data.corpus must be .jsonl files): a mixed-language corpus."""
    language_temperature: float = 1 / 0.3
    """Language sampling temperature T of a multilingual corpus: p_l ~ n_l^(1/T) (n_l: characters); mT5 uses
    alpha = 1/T = 0.3. 1 keeps the natural mixture; larger T moves towards uniform."""
    max_bytes_per_language: int | None = None
    """Cap on the bytes read per language of a multilingual corpus (None: everything)."""

    def __post_init__(self) -> None:
        _check_types(self, "data")
        _check_languages(self)
        _check_nonempty(self, "data", "corpus")
        _check_nonempty(self, "data", "text_field")
        _check_range(self, "data", "val_fraction", ge=0.0, lt=1.0, hint="training needs a validation split > 0")
        _check_range(self, "data", "max_bytes", ge=1, hint="or none for the whole corpus")
        if self.tokenizer is not None:
            _check_nonempty(self, "data", "tokenizer")
        _check_range(self, "data", "vocab_size", ge=1)
        _check_range(self, "data", "num_sentinels", ge=0)
        _check_range(self, "data", "input_length", ge=2)
        _check_range(self, "data", "noise_density", gt=0.0, lt=1.0)
        _check_range(self, "data", "mean_noise_span_length", ge=1.0)
        _check_range(self, "data", "seed", ge=0)


_LANGUAGE_CODE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _check_languages(cfg: DataConfig) -> None:
    """Validate the multilingual fields of ``data`` (see ``switchformer.data.multilingual``)."""
    langs = cfg.languages
    if not isinstance(langs, dict):
        raise ConfigTypeError(f"data.languages: expected a table {{language = source}}, got {langs!r}; e.g. "
                              'data.languages={de="fortunes:de", en="fortunes:en"}')
    for code, source in langs.items():
        if not isinstance(code, str) or not code or not set(code) <= _LANGUAGE_CODE_CHARS:
            raise ConfigError(f"data.languages: language code {code!r} must be letters, digits, '_' or '-' "
                              "(e.g. de, en, zh-Hans)")
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(f"data.languages.{code}: expected a source string (a path, glob or 'fortunes:{code}'), "
                              f"got {source!r}")
    if cfg.language_field is not None and not cfg.language_field.strip():
        raise ConfigError("data.language_field is empty; name the JSONL field holding the language, or none")
    if langs and cfg.language_field is not None:
        raise ConfigError("data.languages and data.language_field are two ways to tag languages; set one of them "
                          "(data.language_field=none to use data.languages)")
    if langs and cfg.max_bytes is not None:
        raise ConfigError("data.max_bytes caps one corpus; with data.languages cap each language with "
                          "data.max_bytes_per_language (and set data.max_bytes=none)")
    _check_range(cfg, "data", "language_temperature", gt=0.0, hint="mT5: 1/0.3; 1 = the natural mixture")
    _check_range(cfg, "data", "max_bytes_per_language", ge=1, hint="or none for whole languages")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (paper §3: Adafactor with decay_rate 0.8, rsqrt schedule)."""

    name: Literal["adafactor", "adamw"] = "adafactor"
    """'adafactor' (torch.optim.Adafactor, the T5X/paper setup) or 'adamw'."""
    lr: float = 0.01
    """Peak learning rate. The rsqrt schedule is lr * sqrt(warmup / max(step, warmup)), i.e. the T5X
    base / sqrt(max(step, warmup)) with base = lr * sqrt(warmup); T5X pre-training: lr 0.01, warmup 10k.
    Adafactor's step is relative: the update is scaled by max(1e-3, RMS(param)). AdamW wants ~1e-3."""
    schedule: Literal["rsqrt", "cosine", "constant"] = "rsqrt"
    """'rsqrt' (constant, then inverse square root: T5X), 'cosine' (to min_lr_ratio * lr), 'constant'."""
    warmup_steps: int = 100
    """Warm-up steps: the constant plateau of 'rsqrt', and the ramp length when warmup='linear'."""
    warmup: Literal["constant", "linear"] = "constant"
    """Shape of the warm-up: 'constant' (T5X) or 'linear' (a ramp from 0, the usual AdamW choice)."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of lr."""
    beta2_decay: float = -0.8
    """Adafactor second-moment decay exponent (T5X decay_rate 0.8 -> beta2_t = 1 - t^-0.8)."""
    adafactor_eps: float = 1e-3
    """Adafactor eps2: the floor on RMS(param) when scaling the relative step."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay (both optimizers)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def __post_init__(self) -> None:
        _check_types(self, "optim")
        _check_range(self, "optim", "lr", gt=0.0)
        _check_range(self, "optim", "warmup_steps", ge=0)
        _check_range(self, "optim", "min_lr_ratio", ge=0.0, le=1.0)
        _check_range(self, "optim", "beta2_decay", le=0.0, hint="beta2_t = 1 - t**beta2_decay")
        _check_range(self, "optim", "adafactor_eps", ge=0.0)
        _check_range(self, "optim", "beta1", ge=0.0, lt=1.0)
        _check_range(self, "optim", "beta2", ge=0.0, lt=1.0)
        _check_range(self, "optim", "eps", ge=0.0)
        _check_range(self, "optim", "weight_decay", ge=0.0)
        _check_range(self, "optim", "grad_clip", ge=0.0, hint="0 disables clipping")


@dataclass
class TrainConfig:
    """The training loop: steps, batches, evaluation, checkpoints, precision and logging."""

    steps: int = 600
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (the loss is averaged over them)."""
    eval_every: int = 50
    """Evaluate on the validation split every this many steps (and at the last step)."""
    eval_batches: int = 8
    """Validation batches per evaluation (the same batches every time)."""
    log_every: int = 10
    """Write a training metrics line every this many steps."""
    checkpoint_every: int = 200
    """Save a checkpoint every this many steps (and at the last step); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest K)."""
    seed: int = 0
    """Seed of the model init, dropout and router jitter (the data order uses data.seed)."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """Autocast dtype. bfloat16 only where the hardware has fast bf16 (the router stays float32, §2.4)."""
    device: str = "auto"
    """'auto' (cuda when available, else cpu), 'cpu', or 'cuda[:N]'."""
    num_threads: int = 0
    """torch intra-op threads on CPU; 0 keeps torch's default."""
    skip_nonfinite: bool = False
    """Skip an optimizer step whose loss or gradient is non-finite instead of stopping the run."""
    max_minutes: float = 0.0
    """Stop training after this much training wall time (0: no limit); the final eval and checkpoint still run."""
    progress: bool = True
    """Show a tqdm progress bar."""
    tensorboard: bool = True
    """Also log to TensorBoard when the tensorboard package is installed."""
    plots: bool = True
    """Write PNG plots into the run directory at the end."""

    def __post_init__(self) -> None:
        _check_types(self, "train")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every"):
            _check_range(self, "train", name, ge=1)
        _check_range(self, "train", "checkpoint_every", ge=0, hint="0 saves only at the end")
        _check_range(self, "train", "keep_checkpoints", ge=1)
        _check_range(self, "train", "seed", ge=0)
        _check_range(self, "train", "num_threads", ge=0, hint="0 keeps torch's default")
        _check_range(self, "train", "max_minutes", ge=0.0, hint="0 means no time limit")
        _check_nonempty(self, "train", "device")


@dataclass
class ParallelConfig:
    """How a run spreads over processes (``switchformer train --nproc N`` or torchrun; paper §5).

    The N processes form a (dp, ep) mesh with dp * ep = N: every process sees its own share of each batch, experts
    are split over "ep" (paper §5.4), everything else is data-parallel over all N (paper §5.6's data x expert
    layouts). One process ignores this section."""

    ep: int = 1
    """Expert-parallel size: processes that split each Switch layer's experts; must divide num_experts."""
    tp: int = 1
    """Tensor-parallel size: processes that share their tokens and split every attention's heads and dense FFN's
    hidden units (paper §5.5); must divide num_heads and d_ff. The mesh is (N / (ep * tp), ep, tp)."""
    dense: Literal["fsdp", "ddp"] = "fsdp"
    """Data parallelism of the non-expert weights: FSDP2 ``fully_shard`` or DDP."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend: auto = nccl on CUDA devices, gloo on CPU."""
    timeout_s: float = 300.0
    """A collective that waits longer than this raises (a dead or stuck peer) instead of hanging the run."""

    def __post_init__(self) -> None:
        _check_types(self, "parallel")
        _check_range(self, "parallel", "ep", ge=1, hint="1 means no expert parallelism")
        _check_range(self, "parallel", "tp", ge=1, hint="1 means no tensor parallelism")
        _check_range(self, "parallel", "timeout_s", gt=0.0)


MetricName = Literal["auto", "exact_match", "accuracy", "subtoken_f1", "rouge1", "rouge2", "rougeL", "rougeLsum",
                     "bleu"]


@dataclass
class FinetuneConfig:
    """Fine-tuning on a text-to-text task (``switchformer finetune``, paper §4.1; ignored by ``train``).

    The paper's fine-tuning settings of the model and optimizer (dropout 0.1, expert dropout 0.4, a constant
    learning rate) live in the model and optim sections, where ``switchformer finetune`` sets them before the
    command line's overrides (docs/finetuning.md)."""

    source: str = ""
    """The pretrained model: a run directory, a transformers-format directory or a Hub id."""
    task: str = "stdlib-name"
    """'stdlib-name', 'stdlib-docstring', a .jsonl/.csv/.parquet file, a directory of train/validation/test files,
    a datasets directory, or 'hf:NAME[:CONFIG]'."""
    input_field: str = "input"
    """Field (column) of the input text in data files and datasets."""
    target_field: str = "target"
    """Field (column) of the target text in data files and datasets."""
    metric: MetricName = "auto"
    """Metric that picks the best checkpoint; 'auto': the built-in task's own, exact_match for data files."""
    input_length: int = 256
    """Input tokens kept per example (longer inputs are cut, EOS included)."""
    target_length: int = 64
    """Target tokens kept per example, and the most tokens generated when evaluating."""
    task_corpus: str = "stdlib"
    """Python files the built-in tasks are made from ('stdlib', or paths as in data.corpus)."""
    max_bytes: int | None = None
    """Cap on the bytes of task_corpus the built-in tasks use: whole files in path order (None: all of it)."""
    val_fraction: float = 0.05
    """Validation share of the built-in tasks, and of data that has no validation split (hash split)."""
    test_fraction: float = 0.05
    """Test share of the built-in tasks, and of data that has no test split (hash split)."""
    eval_examples: int = 256
    """Validation examples decoded and scored at each evaluation (0: all)."""
    test_examples: int = 0
    """Test examples scored with the best checkpoint at the end (0: all)."""
    eval_at_start: bool = True
    """Also evaluate the model before fine-tuning (step 0), the baseline the results compare against."""
    freeze_router: bool = False
    """Keep the routers' weights fixed (no gradient updates)."""

    def __post_init__(self) -> None:
        _check_types(self, "finetune")
        for name in ("task", "input_field", "target_field", "task_corpus"):
            _check_nonempty(self, "finetune", name)
        _check_range(self, "finetune", "input_length", ge=2)
        _check_range(self, "finetune", "target_length", ge=2)
        _check_range(self, "finetune", "max_bytes", ge=1, hint="or none for the whole corpus")
        _check_range(self, "finetune", "val_fraction", gt=0.0, lt=1.0)
        _check_range(self, "finetune", "test_fraction", ge=0.0, lt=1.0)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(f"finetune.val_fraction + finetune.test_fraction = "
                              f"{self.val_fraction + self.test_fraction:g} leaves no training data; keep it below 1")
        _check_range(self, "finetune", "eval_examples", ge=0, hint="0 means all")
        _check_range(self, "finetune", "test_examples", ge=0, hint="0 means all")


@dataclass
class DistillConfig:
    """Distilling a Switch teacher into a dense student (``switchformer distill``, paper §4.2; ignored by ``train``).

    Training loss = (1 - soft_fraction) x cross-entropy with the labels + soft_fraction x temperature^2 x
    cross-entropy with the teacher's probabilities at ``temperature`` (paper Table 6: 0.25 soft / 0.75 hard)."""

    teacher: str = ""
    """The teacher: a run directory or a transformers-format directory."""
    soft_fraction: float = 0.25
    """Weight of the teacher's soft targets; 0 trains on the labels alone, 1 on the teacher alone."""
    temperature: float = 1.0
    """Softmax temperature of both models' distributions in the soft loss (the paper does not state one)."""
    init: Literal["non_expert", "none"] = "non_expert"
    """'non_expert': the student's weights that have a same-named, same-shaped teacher weight start as the
    teacher's (embeddings, attention, norms, dense FFNs; paper Table 6); 'none': the student's own random init."""
    expert_ffn_init: Literal["student", "mean"] = "student"
    """FFNs of the student's blocks that are sparse in the teacher: 'student' keeps the student's random init (the
    paper copies only non-expert weights); 'mean' starts them at the mean of the teacher's experts."""

    def __post_init__(self) -> None:
        _check_types(self, "distill")
        _check_range(self, "distill", "soft_fraction", ge=0.0, le=1.0)
        _check_range(self, "distill", "temperature", gt=0.0)


@dataclass
class RunConfig:
    """Everything one run needs: the model, data, optimizer and loop. One TOML file in configs/ holds one."""

    name: str = "switch"
    """Run name; the run directory is ``<out_dir>/<name>``."""
    out_dir: str = "runs"
    """Folder that holds run directories."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model (vocab_size is replaced by the tokenizer's, rounded up to a multiple of 128)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, tokenizer and objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Expert and data parallelism over several processes."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Fine-tuning task and evaluation (``switchformer finetune``)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Distillation into a dense student (``switchformer distill``)."""

    def __post_init__(self) -> None:
        _check_types(self, "")
        _check_nonempty(self, "", "name")
        if "/" in self.name or "\\" in self.name or self.name in (".", ".."):
            raise ConfigError(f"name = {self.name!r}: the run name is one folder name (no '/'); put the parent "
                              "folder in out_dir")
        _check_nonempty(self, "", "out_dir")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Loading, validation, overrides and TOML output for RunConfig (and any of the dataclasses above).
# TOML has no null, so None is written and read as the string "none" (only for fields that accept None).


@functools.cache
def _field_types(cls) -> dict:
    import typing

    return typing.get_type_hints(cls)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _default(obj, name: str):
    f = next(f for f in dataclasses.fields(obj) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else None


def _check_types(obj, prefix: str) -> None:
    """Check (and losslessly coerce: int -> float, a dict -> its dataclass) every field of ``obj`` in place."""
    types_ = _field_types(type(obj))
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, _coerce(getattr(obj, f.name), types_[f.name], _key(prefix, f.name)))


def _check_range(obj, prefix: str, name: str, *, ge=None, gt=None, le=None, lt=None, hint: str = "") -> None:
    """Raise ConfigError naming ``prefix.name``, the allowed range and a valid value unless the field (a number;
    None is left to the type check) lies in the range; floats must also be finite."""
    value = getattr(obj, name)
    if value is None:
        return
    bounds = [(ge, ">=", value >= ge if ge is not None else True), (gt, ">", value > gt if gt is not None else True),
              (le, "<=", value <= le if le is not None else True), (lt, "<", value < lt if lt is not None else True)]
    ok = all(b[2] for b in bounds) and not (isinstance(value, float) and not math.isfinite(value))
    if ok:
        return
    key = _key(prefix, name)
    kind = "an integer" if isinstance(value, int) else "a finite number"
    rule = " and ".join(f"{op} {bound}" for bound, op, _ in bounds if bound is not None)
    default = _default(obj, name)
    example = f"; e.g. {key}={'none' if default is None else repr(default)}"
    raise ConfigError(f"{key} = {value!r} is out of range: it must be {kind} {rule}"
                      f"{f' ({hint})' if hint else ''}{example}")


def _check_nonempty(obj, prefix: str, name: str) -> None:
    if not getattr(obj, name).strip():
        raise ConfigError(f"{_key(prefix, name)} is empty; give it a value (default {_default(obj, name)!r})")


def _type_name(tp) -> str:
    import typing

    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    args = typing.get_args(tp)
    if args:
        return " | ".join(_type_name(a) for a in args)
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value, tp, path: str):
    """Return ``value`` checked (and losslessly coerced) against annotation ``tp``; TypeError names ``path``."""
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigTypeError(f"{path}: {value!r} is not one of {list(typing.get_args(tp))}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, path)
            except TypeError:
                continue
        raise ConfigTypeError(f"{path}: {value!r} does not have type {_type_name(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigTypeError(f"{path}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigTypeError(f"{path}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigTypeError(f"{path}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigTypeError(f"{path}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, path)
        raise ConfigTypeError(f"{path}: expected a table of {tp.__name__} keys, got {value!r}")
    return value


def from_dict(cls, data: dict, path: str = ""):
    """Build config dataclass ``cls`` from a nested dict (parsed TOML or JSON): the one builder.

    Every value is type-checked (nested dicts become their dataclasses) and the result is range-checked by the
    class's ``__post_init__``; missing keys keep their defaults. ``path`` is the dotted prefix used in messages.

    Raises:
        ConfigError: unknown key (the message lists the valid ones) or a value out of range.
        ConfigTypeError: a value of the wrong type (also a TypeError).
    """
    if not isinstance(data, dict):
        raise ConfigTypeError(f"{path or cls.__name__}: expected a table of {cls.__name__} keys, got {data!r}")
    types_ = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = path or cls.__name__
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {valid_keys(cls, path)}")
    kwargs = {k: _coerce(v, types_[k], _key(path, k)) for k, v in data.items()}
    return cls(**kwargs)



def valid_keys(cls, prefix: str = "") -> list[str]:
    """All dotted leaf keys of dataclass ``cls`` (e.g. ``model.moe.num_experts``)."""
    out = []
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(types_[f.name]):
            out.extend(valid_keys(types_[f.name], key))
        else:
            out.append(key)
    return out


def validate(cfg):
    """A copy of a (nested) config dataclass rebuilt through every ``__post_init__``: types and ranges re-checked
    after fields were set directly (as ``apply_overrides`` does)."""
    kwargs = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kwargs[f.name] = validate(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value
    return type(cfg)(**kwargs)


def run_config_from_dict(data: dict) -> RunConfig:
    """Build a validated RunConfig from a nested dict (e.g. parsed TOML)."""
    return from_dict(RunConfig, data)


def _tomllib():
    """The TOML parser: the standard library's ``tomllib`` (Python >= 3.11), else the ``tomli`` backport."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading TOML on Python 3.10 needs the tomli package: pip install tomli") from None
    return tomllib


def load_toml(path) -> RunConfig:
    """Read a TOML recipe (``configs/*.toml``) into a validated RunConfig; missing keys keep their defaults.

    Raises:
        OSError: the file cannot be read.
        ConfigError: malformed TOML, an unknown key or a value out of range (the message starts with ``path``).
        ConfigTypeError: a value of the wrong type.
    """
    toml = _tomllib()
    with open(path, "rb") as f:
        try:
            data = toml.load(f)
        except toml.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return run_config_from_dict(data)
    except ConfigError as e:
        raise type(e)(f"{path}: {e}") from None


def _parse_value(text: str):
    """Parse the right-hand side of an override as a TOML value; a bare word stays a string."""
    toml = _tomllib()
    try:
        return toml.loads(f"v = {text}")["v"]
    except toml.TOMLDecodeError:
        return text


def apply_overrides(cfg, overrides: list[str]):
    """Return a copy of ``cfg`` with dotted overrides applied (``["model.moe.num_experts=16", "train.steps=100"]``).

    Values are parsed as TOML scalars (``1e-3``, ``true``, ``"text"``; a bare word is a string; ``none`` is None
    for fields that accept None), then checked against the field's type (an int is accepted for a float field).

    The result is validated as a whole after every override is applied (so ``model.arch`` and a setting that
    depends on it may change together).

    Raises:
        ConfigError: malformed override, unknown key (the message lists the valid keys) or a value out of range.
        ConfigTypeError: the value does not have the field's type (also a TypeError).
    """
    import copy

    cfg = copy.deepcopy(cfg)
    root_cls = type(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.steps=100")
        key, text = item.split("=", 1)
        key = key.strip().removeprefix("--")
        parts = key.split(".")
        obj = cfg
        for i, part in enumerate(parts):
            if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
                prefix = ".".join(parts[:i])
                keys = valid_keys(type(obj), prefix) if dataclasses.is_dataclass(obj) else valid_keys(root_cls)
                where = f" under {prefix}" if prefix else ""
                raise ConfigError(f"unknown config key {key!r}; valid keys{where}: {keys}")
            if i < len(parts) - 1:
                obj = getattr(obj, part)
        tp = _field_types(type(obj))[parts[-1]]
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"{key!r} is a section; set one of its keys: {valid_keys(tp, key)}")
        value = _parse_value(text.strip())
        if not isinstance(value, str) and _accepts_str(tp):
            value = text.strip()  # data.corpus=123 means the string "123"
        setattr(obj, parts[-1], _coerce(value, tp, key))
    return validate(cfg)


def _accepts_str(tp) -> bool:
    import typing

    return tp is str or (typing.get_origin(tp) is not dict and str in typing.get_args(tp))  # dict[str, str]: a table


def to_dict(cfg) -> dict:
    """Nested plain dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def _toml_value(v) -> str:
    if v is None:
        return '"none"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        import json

        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def to_toml(cfg) -> str:
    """TOML text for a config dataclass; ``load_toml`` reads it back to an equal object."""
    lines: list[str] = []

    def emit(d: dict, section: str) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if section and scalars:
            lines.append(f"[{section}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {_toml_value(v)}")
        if scalars:
            lines.append("")
        for k, v in tables.items():
            emit(v, f"{section}.{k}" if section else k)

    emit(dataclasses.asdict(cfg), "")
    return "\n".join(lines)
