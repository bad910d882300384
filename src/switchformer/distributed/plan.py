"""Layout planner: which data x expert (x tensor) layouts of a model fit a fleet, and how fast each should step.

    from switchformer.distributed.plan import Hardware, Workload, plan_layouts
    plans = plan_layouts("switch-c-2048", Hardware(devices=2048, device_memory=16 * 2**30), Workload())
    plans[0].layout          # Layout(dp=1, ep=2048, tp=1): one expert per device (paper §5.4, §5.6)

Pure arithmetic (no process group, nothing allocated); ``switchformer plan`` prints it. A layout splits the N
devices as dp * ep * tp = N (paper §5's n x m mesh, with the data dimension n = dp * ep carved into expert
parallelism as in §5.4):

- **ep** splits each Switch layer's E experts (E % ep == 0); **dp** replicates them. Every one of the dp * ep data
  shards sees its own tokens_per_batch / (dp * ep) tokens.
- **tp** is model parallelism in the sense of paper §5.2-5.5: the attention heads, the dense FFN's d_ff and each
  expert's d_ff are split t ways, at the price of an all-reduce of the [tokens, d_model] activations per sublayer
  in the forward and the backward pass. ``parallelize``'s tensor parallelism splits attention and dense FFNs but
  keeps experts whole on each tp rank, so tp > 1 rows (experts split too, as in §5.5) are estimates only
  (``Plan.runs_in_library``).
- Dense (non-expert) weights are data-parallel over all dp * ep shards: FSDP2 as ``parallelize`` applies it (one
  unit for the whole model, so the full dense weights and their gradients are materialised during the step and
  sharding saves the optimizer state and the resting copies), or DDP (replicated).

Per-device memory (bytes) = weights + gradients + optimizer state + activations, with float32 weights and
gradients (the library keeps float32 master weights; under bfloat16 autocast the matmuls also keep a bfloat16
copy of each weight they use until the backward), Adafactor's factored second moment (rows + cols per matrix, as
``torch.optim.Adafactor`` stores it, no momentum) or AdamW's two float32 moments, and the activations autograd
keeps for the backward (``activation_elements_per_token``; counted from switchformer's implementation and checked
against torch's saved tensors in tests/test_plan.py).

Step time (seconds) = compute + all-to-all + gradient reduction + tensor-parallel all-reduces + latency, with no
overlap assumed:

- compute = 3 x forward FLOPs of the device's tokens / (tp * device FLOP/s): forward FLOPs from
  ``presets.flops_per_sequence`` (2 x weights touched + attention; each token visits one expert, so this is the
  FLOP-matched dense model's count, paper §2.1), x 3 for forward + backward; in capacity mode with ep > 1 the
  experts also compute on the empty slots of the [E, C] buffer (capacity factor, paper Eq. 3).
- all-to-all: per sparse layer the dispatcher sends a fixed [E, G*C, d_model] buffer in each direction, forward
  and backward (paper §5.4: "all-to-all communication of size [E, C, d_model]"): 4 x E x G x C x d_model x
  activation bytes, of which (ep-1)/ep leaves the device. Dropless sends the routed tokens only.
- gradient reduction: FSDP reduce-scatters the dense gradients and all-gathers the dense weights ((n-1)/n of the
  bytes each, n = dp * ep); DDP all-reduces them (2(n-1)/n); expert gradients are all-reduced over dp
  (2(dp-1)/dp).
- latency: collectives per step x link latency (an alpha-beta model; 0 unless measured).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Literal

from switchformer.config import ModelConfig, is_sparse_block, round_vocab
from switchformer.errors import ConfigError

GB = 1e9
PARAM_BYTES = 4
"""float32 master weights (the library trains float32 weights, with bfloat16 autocast when asked)."""
GRAD_BYTES = 4
OPTIM_STATE_BYTES = 4
LOGITS_BYTES = 4
"""The cross-entropy keeps its float32 log-softmax of the logits (autocast computes the loss in float32)."""

# ------------------------------------------------------------------------------------------------- quantities

_DECIMAL = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}


def parse_quantity(text: str | float | int, *, what: str, unit: str) -> float:
    """``"80GB"`` -> 8e10, ``"16GiB"`` -> 17179869184, ``"100GB/s"`` -> 1e11, ``"312T"``/``"312TFLOP/s"`` -> 3.12e14.

    Decimal prefixes k, M, G, T, P (powers of 1000) and binary Ki, Mi, Gi, Ti (powers of 1024); the unit itself
    (``B``, ``B/s``, ``FLOP/s``, ``FLOPS``) is optional.

    Raises:
        ConfigError: naming ``what`` and an example of ``unit``.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtTpP]i?)?\s*"
                         r"(B/s|B|bytes?|FLOP/s|FLOPS|flop/s|flops|/s)?\s*", str(text))
        if not m:
            raise ConfigError(f"{what} = {text!r} is not a quantity; write e.g. {unit}")
        prefix = (m.group(2) or "").lower()
        value = float(m.group(1)) * (_BINARY[prefix] if prefix.endswith("i") else _DECIMAL[prefix])
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{what} must be > 0, got {text!r}; write e.g. {unit}")
    return value


# ------------------------------------------------------------------------------------------------- the inputs


@dataclass(frozen=True)
class Hardware:
    """The fleet: ``devices`` identical accelerators."""

    devices: int
    device_memory: float = 80 * GB
    """Bytes of memory per device."""
    link_bandwidth: float = 100 * GB
    """Bytes per second one device moves through a collective (send side)."""
    device_flops: float = 100e12
    """Sustained FLOP/s of one device on the model's matmuls."""
    link_latency: float = 0.0
    """Seconds per collective call, on top of its bytes / bandwidth."""

    def __post_init__(self) -> None:
        if not (isinstance(self.devices, int) and self.devices >= 1):
            raise ConfigError(f"devices = {self.devices!r}; give a positive number of devices (--devices 8)")
        for name in ("device_memory", "link_bandwidth", "device_flops"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not (math.isfinite(self.link_latency) and self.link_latency >= 0):
            raise ConfigError(f"link_latency must be >= 0 seconds, got {self.link_latency!r}")


@dataclass(frozen=True)
class Workload:
    """One optimizer step: the global batch and how it is trained."""

    tokens_per_batch: int = 2**20
    """Global tokens per step (encoder + decoder); paper §4.1 pre-trains with 2^20."""
    input_length: int = 512
    """Encoder tokens per sequence (decoder-only: the sequence length)."""
    target_length: int = 114
    """Decoder tokens per sequence (encoder-decoder only); 512/114 is T5X's C4 span corruption."""
    optimizer: Literal["adafactor", "adamw"] = "adafactor"
    precision: Literal["bfloat16", "float32"] = "bfloat16"
    """Activation and all-to-all dtype (paper §2.4: bfloat16, router in float32)."""
    dense: Literal["fsdp", "ddp"] = "fsdp"
    routing: Literal["capacity", "dropless"] = "capacity"

    def __post_init__(self) -> None:
        if not (isinstance(self.tokens_per_batch, int) and self.tokens_per_batch >= 1):
            raise ConfigError(f"tokens_per_batch = {self.tokens_per_batch!r}; give a positive int")
        for name in ("input_length", "target_length"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ConfigError(f"{name} = {getattr(self, name)!r}; give a positive int")
        checks = {"optimizer": ("adafactor", "adamw"), "precision": ("bfloat16", "float32"),
                  "dense": ("fsdp", "ddp"), "routing": ("capacity", "dropless")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} = {getattr(self, name)!r}; use one of {', '.join(allowed)}")

    @property
    def activation_bytes(self) -> int:
        return 2 if self.precision == "bfloat16" else 4


# ----------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParamGroup:
    """``count`` tensors of shape ``shape``; ``kind`` says how a layout splits them: "expert" (E over ep, d_ff over
    tp), "tp" (attention heads / dense d_ff over tp), "replicated" (embeddings, norms, routers, position bias)."""

    name: str
    kind: Literal["expert", "tp", "replicated"]
    count: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return self.count * math.prod(self.shape)

    @property
    def adafactor_elements(self) -> int:
        """torch.optim.Adafactor's state: a row and a column factor over the last two dims, or the full variance
        of a vector."""
        if len(self.shape) < 2:
            return self.numel
        *lead, rows, cols = self.shape
        return self.count * math.prod(lead) * (rows + cols)


def _stack_blocks(cfg: ModelConfig) -> list[tuple[str, int, int, bool]]:
    """(stack, layers, sparse_step, cross_attention) of each stack."""
    if cfg.arch == "decoder_only":
        return [("decoder", cfg.num_layers, cfg.decoder_sparse_step, False)]
    return [("encoder", cfg.num_layers, cfg.encoder_sparse_step, False),
            ("decoder", cfg.num_decoder_layers, cfg.decoder_sparse_step, True)]


def sparse_layers(cfg: ModelConfig) -> dict[str, int]:
    """Switch layers per stack."""
    return {stack: sum(is_sparse_block(i, step) for i in range(layers))
            for stack, layers, step, _ in _stack_blocks(cfg)}


def parameter_groups(cfg: ModelConfig) -> list[ParamGroup]:
    """Every parameter tensor of the model, grouped by shape and by how a layout splits it."""
    if cfg.switch_attention:
        raise ConfigError("plan does not model Switch attention (model.switch_attention = true); plan the model "
                          "with switch_attention = false")
    d, inner, ff, E = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.moe.num_experts
    ffn_mats = 3 if cfg.feed_forward_proj == "gated-gelu" else 2
    groups = [ParamGroup("embedding", "replicated", 1, (cfg.vocab_size, d))]
    if not cfg.tie_word_embeddings:
        groups.append(ParamGroup("lm_head", "replicated", 1, (cfg.vocab_size, d)))
    for stack, layers, step, cross in _stack_blocks(cfg):
        sparse = sum(is_sparse_block(i, step) for i in range(layers))
        attn = layers * (2 if cross else 1)
        groups += [
            ParamGroup(f"{stack}.attention", "tp", 4 * attn, (inner, d)),
            ParamGroup(f"{stack}.position_bias", "replicated", 1, (cfg.relative_attention_num_buckets,
                                                                    cfg.num_heads)),
            ParamGroup(f"{stack}.norms", "replicated", layers * (3 if cross else 2) + 1, (d,)),
        ]
        if layers - sparse:
            groups.append(ParamGroup(f"{stack}.dense_ffn", "tp", ffn_mats * (layers - sparse), (ff, d)))
        if sparse:
            groups += [ParamGroup(f"{stack}.router", "replicated", sparse, (E, d)),
                       ParamGroup(f"{stack}.experts", "expert", ffn_mats * sparse, (E, ff, d))]
    return groups


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by kind ("expert", "tp", "replicated") and in total, without building the model."""
    out = {"expert": 0, "tp": 0, "replicated": 0}
    for g in parameter_groups(cfg):
        out[g.kind] += g.numel
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------------------------- activations


def activation_elements_per_token(cfg: ModelConfig, *, stack: str, sparse: bool, key_length: int, tp: int = 1,
                                  expert_slots: float = 1.0, exchanged: bool = False) -> float:
    """Elements autograd keeps per token of one block for the backward (dropout off, as in pre-training).

    Counted from switchformer's implementation: a pre-norm sublayer keeps its input and normalised input and the
    residual (3 x d_model); self-attention keeps q, k, v and the head outputs (4 x heads x d_kv) and the additive
    position-bias mask (heads x key_length); the FFN keeps its hidden activation (d_ff for ReLU; GEGLU keeps both
    projections, the gelu and the product, 4 x d_ff). A decoder block adds cross-attention (3 x d_model + 2 x
    heads x d_kv per decoder token; its keys and values are per encoder token, see ``activation_bytes``). A Switch
    layer adds the router (about 3 x E: logits, probabilities, gates) and the gathered/combined token copies
    (4 x d_model). Exchanged through an all-to-all, the experts compute on ``expert_slots`` rows per token (the
    capacity buffer: E x G x C / tokens) and the received and returned buffers are kept (2 x slots x d_model).
    Model parallelism (tp) splits the heads and d_ff terms (Korthikanti et al. 2022 count the same way).
    """
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    hidden = (4 if cfg.feed_forward_proj == "gated-gelu" else 1) * cfg.d_ff
    elems = 6 * d + (4 * inner + cfg.num_heads * key_length) / tp
    if stack == "decoder_cross":
        elems += 3 * d + 2 * inner / tp
    if not sparse:
        return elems + hidden / tp
    elems += 4 * d + 3 * cfg.moe.num_experts
    if exchanged:
        return elems + expert_slots * hidden / tp + 2 * expert_slots * d
    return elems + hidden / tp


# ------------------------------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class Layout:
    dp: int
    ep: int
    tp: int

    @property
    def data_shards(self) -> int:
        return self.dp * self.ep

    def __str__(self) -> str:
        return f"dp={self.dp} ep={self.ep} tp={self.tp}"


@dataclass
class Plan:
    """One layout's per-device memory (bytes), traffic (bytes per step) and time (seconds per step)."""

    layout: Layout
    experts_per_device: int
    tokens_per_device: float
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    memory_bytes: float
    fits: bool
    alltoall_bytes: float
    """All-to-all bytes this device sends per step (the whole [E, G*C, d_model] buffers, forward and backward)."""
    grad_reduce_bytes: float
    tp_bytes: float
    compute_s: float
    alltoall_s: float
    grad_reduce_s: float
    tp_s: float
    latency_s: float
    step_s: float
    tokens_per_s: float
    runs_in_library: bool
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["layout"] = dataclasses.asdict(self.layout)
        return out


# --------------------------------------------------------------------------------------------------- planning


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def valid_layouts(cfg: ModelConfig, devices: int, max_tp: int | None = None) -> list[Layout]:
    """Every (dp, ep, tp) with dp * ep * tp = devices, E % ep == 0 (ep = 1 for a dense model), heads and d_ff
    divisible by tp, and tp <= max_tp (when given)."""
    has_experts = any(sparse_layers(cfg).values())
    out = []
    for tp in _divisors(devices):
        if cfg.num_heads % tp or cfg.d_ff % tp or (max_tp is not None and tp > max_tp):
            continue
        for ep in _divisors(devices // tp):
            if (ep > 1 and not has_experts) or cfg.moe.num_experts % ep:
                continue
            out.append(Layout(devices // (tp * ep), ep, tp))
    return out


def _capacity_rows(cfg: ModelConfig, tokens: float, sequence_length: int) -> tuple[float, float]:
    """(buffer rows E x G x C, groups G) of one Switch layer on a device routing ``tokens`` tokens, with the
    library's capacity rule (``moe.dispatch.expert_capacity``)."""
    from switchformer.moe.dispatch import expert_capacity

    moe = cfg.moe
    if tokens <= 0:
        return 0.0, 0.0
    if moe.expert_capacity is not None:  # a fixed capacity per sequence
        groups = tokens / sequence_length
        return groups * moe.num_experts * moe.expert_capacity, groups
    group_tokens = moe.group_size or max(int(round(tokens)), 1)
    groups = max(math.ceil(tokens / group_tokens), 1)
    capacity = expert_capacity(group_tokens, moe.num_experts, moe.capacity_factor, top_k=moe.top_k,
                               min_capacity=moe.min_capacity)
    return groups * moe.num_experts * capacity, groups


def plan_layout(cfg: ModelConfig, layout: Layout, hw: Hardware, work: Workload) -> Plan:
    """Memory, traffic and time of one layout (see the module docstring for every formula)."""
    from switchformer.models.presets import flops_per_sequence

    dp, ep, tp = layout.dp, layout.ep, layout.tp
    n = dp * ep
    a = work.activation_bytes
    E, d = cfg.moe.num_experts, cfg.d_model
    decoder_only = cfg.arch == "decoder_only"
    seq_tokens = work.input_length if decoder_only else work.input_length + work.target_length
    tokens = work.tokens_per_batch / n
    sequences = tokens / seq_tokens
    stack_tokens = ({"decoder": tokens} if decoder_only else
                    {"encoder": sequences * work.input_length, "decoder": sequences * work.target_length})
    stack_lengths = ({"decoder": work.input_length} if decoder_only else
                     {"encoder": work.input_length, "decoder": work.target_length})
    capacity_mode = cfg.moe.capacity_factor is not None and work.routing == "capacity"
    exchanged = ep > 1

    # --- weights, gradients, optimizer state
    groups = parameter_groups(cfg)
    expert_local = sum(g.numel for g in groups if g.kind == "expert") / (ep * tp)
    dense_local = sum(g.numel / (tp if g.kind == "tp" else 1) for g in groups if g.kind != "expert")
    expert_opt = sum(g.adafactor_elements for g in groups if g.kind == "expert") / (ep * tp)
    dense_opt = sum(g.adafactor_elements / (tp if g.kind == "tp" else 1) for g in groups if g.kind != "expert")
    if work.optimizer == "adamw":
        expert_opt, dense_opt = 2 * expert_local, 2 * dense_local
    if ep == 1:  # unsharded experts are ordinary parameters: data-parallel with the dense ones (FSDP or DDP)
        dense_local, dense_opt = dense_local + expert_local, dense_opt + expert_opt
        expert_local = expert_opt = 0.0
    expert_weights = sum(g.numel for g in groups if g.kind == "expert") / (ep * tp)
    matmul_weights = expert_weights + sum(g.numel / (tp if g.kind == "tp" else 1) for g in groups
                                          if g.kind == "tp" or g.name in ("embedding", "lm_head"))
    autocast_copies = matmul_weights * 2 if work.precision == "bfloat16" else 0.0
    if work.dense == "fsdp" and n > 1:
        # one FSDP unit: the gathered weights and unreduced gradients exist during the step, plus the shards
        params = expert_local * PARAM_BYTES + dense_local * PARAM_BYTES * (1 + 1 / n) + autocast_copies
        grads = (expert_local + dense_local * (1 + 1 / n)) * GRAD_BYTES
        optim = (expert_opt + dense_opt / n) * OPTIM_STATE_BYTES
    else:
        params = (expert_local + dense_local) * PARAM_BYTES + autocast_copies
        grads = (expert_local + dense_local) * GRAD_BYTES
        optim = (expert_opt + dense_opt) * OPTIM_STATE_BYTES

    # --- activations and the all-to-all buffers, stack by stack
    act_elems = 0.0
    a2a_rows = 0.0  # buffer rows sent per step and direction, summed over Switch layers
    expert_slot_rows = 0.0  # rows the experts compute on, summed over Switch layers
    a2a_calls = 0
    for stack, layers, step, cross in _stack_blocks(cfg):
        t_stack, length = stack_tokens[stack], stack_lengths[stack]
        if capacity_mode:
            rows, _ = _capacity_rows(cfg, t_stack, length)
        else:
            rows = t_stack * cfg.moe.top_k
        slots = rows / t_stack if t_stack else 0.0
        for i in range(layers):
            sparse = is_sparse_block(i, step)
            act_elems += t_stack * activation_elements_per_token(
                cfg, stack="decoder_cross" if cross else stack, sparse=sparse, key_length=length, tp=tp,
                expert_slots=slots if capacity_mode else cfg.moe.top_k, exchanged=exchanged)
            if cross:  # cross-attention keys and values, per encoder token
                act_elems += stack_tokens["encoder"] * 2 * cfg.num_heads * cfg.d_kv / tp
            if sparse:
                a2a_rows += rows
                expert_slot_rows += rows if exchanged else t_stack * cfg.moe.top_k
                a2a_calls += 4 if capacity_mode else 5  # dispatch + combine, forward and backward (+ counts)
    logits_tokens = tokens if decoder_only else stack_tokens["decoder"]
    activations = act_elems * a + logits_tokens * cfg.vocab_size * LOGITS_BYTES
    memory = params + grads + optim + activations

    # --- traffic per step (bytes this device sends)
    alltoall = 4 * a2a_rows * d * a if exchanged else 0.0
    # FSDP: reduce-scatter the gradients + all-gather the weights, (n-1)/n each; DDP: a ring all-reduce, 2(n-1)/n
    dense_reduce = 2 * (n - 1) / n * dense_local * GRAD_BYTES
    expert_reduce = 2 * (dp - 1) / dp * expert_local * GRAD_BYTES
    sublayers = sum(layers * (3 if cross else 2) * stack_tokens[stack] for stack, layers, _, cross
                    in _stack_blocks(cfg))
    tp_bytes = 2 * 2 * (tp - 1) / tp * sublayers * d * a  # an all-reduce per sublayer, forward and backward

    # --- time
    ffn_flops = 2 * (3 if cfg.feed_forward_proj == "gated-gelu" else 2) * d * cfg.d_ff
    forward = flops_per_sequence(cfg, work.input_length, work.target_length) * sequences
    routed_rows = sum(stack_tokens[s] * cfg.moe.top_k * k for s, k in sparse_layers(cfg).items())
    forward += max(expert_slot_rows - routed_rows, 0.0) * ffn_flops  # compute on empty capacity slots
    compute_s = 3 * forward / tp / hw.device_flops
    alltoall_s = alltoall * (ep - 1) / ep / hw.link_bandwidth if exchanged else 0.0
    grad_reduce_s = (dense_reduce + expert_reduce) / hw.link_bandwidth
    tp_s = tp_bytes / hw.link_bandwidth
    expert_tensors = sum(g.count for g in groups if g.kind == "expert")
    calls = ((a2a_calls if exchanged else 0) + (2 if n > 1 else 0) + (expert_tensors if dp > 1 and ep > 1 else 0)
             + (4 * sum(layers * (3 if cross else 2) for _, layers, _, cross in _stack_blocks(cfg)) if tp > 1 else 0))
    latency_s = calls * hw.link_latency
    step_s = compute_s + alltoall_s + grad_reduce_s + tp_s + latency_s
    return Plan(
        layout=layout, experts_per_device=E // ep if any(sparse_layers(cfg).values()) else 0,
        tokens_per_device=tokens, params_bytes=params, grads_bytes=grads, optimizer_bytes=optim,
        activation_bytes=activations, memory_bytes=memory, fits=memory <= hw.device_memory,
        alltoall_bytes=alltoall, grad_reduce_bytes=dense_reduce + expert_reduce, tp_bytes=tp_bytes,
        compute_s=compute_s, alltoall_s=alltoall_s, grad_reduce_s=grad_reduce_s, tp_s=tp_s, latency_s=latency_s,
        step_s=step_s, tokens_per_s=work.tokens_per_batch / step_s, runs_in_library=tp == 1,
        details={"forward_flops_per_device": forward, "collectives_per_step": calls,
                 "alltoall_rows_per_direction": a2a_rows, "expert_params_per_device": expert_local,
                 "dense_params_per_device": dense_local, "dense": work.dense.upper() if n > 1 else "one device"},
    )


def plan_layouts(model: ModelConfig | str, hw: Hardware, work: Workload | None = None, *,
                 max_tp: int | None = None) -> list[Plan]:
    """Every valid layout's plan, the fitting ones first, fastest first (then by memory). ``max_tp=1`` keeps the
    layouts ``parallelize`` runs (data x expert only)."""
    cfg = _model(model)
    work = work or Workload()
    plans = [plan_layout(cfg, layout, hw, work) for layout in valid_layouts(cfg, hw.devices, max_tp)]
    return sorted(plans, key=lambda p: (not p.fits, p.step_s, p.memory_bytes))


def best_fitting(plans: list[Plan], hw: Hardware) -> list[Plan]:
    """The fitting plans, fastest first; raises ``ConfigError`` naming the shortfall when none fits."""
    fitting = [p for p in plans if p.fits]
    if fitting:
        return fitting
    smallest = min(plans, key=lambda p: p.memory_bytes)
    dense = smallest.details.get("dense", "")
    raise ConfigError(
        f"does not fit: needs {smallest.memory_bytes / GB:.1f} GB per device at best ({smallest.layout}, {dense}), "
        f"has {hw.device_memory / GB:.1f} GB; add devices, use devices with more memory, or shrink the batch "
        "(--tokens-per-batch)")


def _model(model: ModelConfig | str) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    from switchformer.models.presets import get_preset

    return get_preset(model)


def workload_from_run_config(
    run_cfg, *, target_length: int | None = None, **overrides
) -> tuple[ModelConfig, Workload]:
    """The model and workload of a TOML recipe (a ``RunConfig``): the tokenizer's vocabulary rounded up to a
    multiple of 128, the global batch = batch_size x grad_accum x sequence tokens, its lengths and precision.

    An encoder-decoder recipe needs ``target_length``, the decoder tokens per sequence of its objective (for span
    corruption ``switchformer.data.span_corruption.span_corruption_lengths(input_length, ...)[1]``).
    """
    data = run_cfg.data
    model = dataclasses.replace(run_cfg.model, vocab_size=round_vocab(data.vocab_size))
    if model.arch == "decoder_only":
        target_length = 1
    elif target_length is None:
        raise ValueError("an encoder-decoder recipe needs target_length (span_corruption_lengths(input_length)[1])")
    seq = data.input_length + (0 if model.arch == "decoder_only" else target_length)
    values = dict(tokens_per_batch=run_cfg.train.batch_size * run_cfg.train.grad_accum * seq,
                  input_length=data.input_length, target_length=target_length, optimizer=run_cfg.optim.name,
                  precision=run_cfg.train.precision, dense=run_cfg.parallel.dense)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return model, Workload(**values)


# ------------------------------------------------------------------------------------------------- reporting


def _count(n: float) -> str:
    return f"{n / 1e9:,.1f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"


def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def format_plans(name: str, cfg: ModelConfig, plans: list[Plan], hw: Hardware, work: Workload, top: int) -> str:
    """The table ``switchformer plan`` prints: the fitting layouts, fastest first (memory in GB = 1e9 bytes)."""
    counts = count_parameters(cfg)
    shown = [p for p in plans if p.fits][:top]
    lines = [
        f"model      {name}: {_count(counts['total'])} parameters ({_count(counts['expert'])} in experts, "
        f"{cfg.moe.num_experts} per Switch layer, {sum(sparse_layers(cfg).values())} Switch layers)",
        f"fleet      {hw.devices} devices x {_gb(hw.device_memory)} GB, {hw.device_flops / 1e12:.4g} TFLOP/s, link "
        f"{hw.link_bandwidth / GB:.4g} GB/s, latency {hw.link_latency * 1e6:.4g} us",
        f"step       {work.tokens_per_batch:,} tokens ({work.input_length}"
        + ("" if cfg.arch == "decoder_only" else f"+{work.target_length}") + f" per sequence), {work.optimizer}, "
        f"{work.precision} activations, dense weights {work.dense.upper()}, {work.routing} routing",
        f"layouts    {sum(p.fits for p in plans)} of {len(plans)} valid layouts fit; showing {len(shown)}, fastest "
        "first (GB per device; traffic in GB sent per device and step)",
        "",
        f"{'dp':>5} {'ep':>5} {'tp':>3} {'exp/dev':>7} {'tok/dev':>8} {'weights':>8} {'grads':>7} {'optim':>7} "
        f"{'activ':>7} {'total':>7} {'a2a':>7} {'reduce':>7} {'step s':>8} {'(comp':>7} {'comm)':>7} "
        f"{'tokens/s':>10}",
    ]
    for p in shown:
        comm = p.alltoall_s + p.grad_reduce_s + p.tp_s + p.latency_s
        mark = "" if p.runs_in_library else "  *"
        lines.append(
            f"{p.layout.dp:>5} {p.layout.ep:>5} {p.layout.tp:>3} {p.experts_per_device:>7} "
            f"{p.tokens_per_device:>8.0f} {_gb(p.params_bytes):>8} {_gb(p.grads_bytes):>7} "
            f"{_gb(p.optimizer_bytes):>7} {_gb(p.activation_bytes):>7} {_gb(p.memory_bytes):>7} "
            f"{_gb(p.alltoall_bytes):>7} {_gb(p.grad_reduce_bytes + p.tp_bytes):>7} {p.step_s:>8.4g} "
            f"{p.compute_s:>7.3g} {comm:>7.3g} {p.tokens_per_s:>10.4g}{mark}")
    if any(not p.runs_in_library for p in shown):
        lines.append("* tp > 1 (model parallelism with experts split t ways, paper §5.5): an estimate; parallelize "
                     "keeps experts whole on each tp rank (--max-tp 1 lists only layouts it runs exactly)")
    return "\n".join(lines)


def plans_to_json(name: str, cfg: ModelConfig, plans: list[Plan], hw: Hardware, work: Workload, top: int) -> dict:
    """``switchformer plan --json``: inputs, parameter counts and the fitting plans (fastest first)."""
    return {
        "model": name, "parameters": count_parameters(cfg), "hardware": dataclasses.asdict(hw),
        "workload": dataclasses.asdict(work), "valid_layouts": len(plans),
        "fitting_layouts": sum(p.fits for p in plans),
        "plans": [p.to_dict() for p in plans if p.fits][:top],
    }
