"""Model presets: the paper's Table 9 rows, the released checkpoints' configs, and small configs for CPU work.

    from switchformer.models.presets import get_preset, count_parameters, flops_per_token, describe
    cfg = get_preset("switch-base-8")
    count_parameters(cfg)          # 619_339_008, built on the meta device (no memory)
    print(describe("switch-base-8"))   # what `switchformer info switch-base-8` prints

The rows of paper Table 9 are kept as published (``t5-base`` ... ``switch-c``, GEGLU where the table says so); the
released checkpoints (``switch-base-8`` ... ``switch-c-2048``) follow their Hub config.json files and flaxformer's
``switch_{base,large,xxl,c}.gin``: ReLU with d_ff 3072 (base) / 4096 (large), GEGLU 10240 and a separate output layer
for XXL, 30 heads and a separate output layer for C. docs/models.md compares the counts with the published ones.
"""

from __future__ import annotations

import dataclasses

from switchformer.config import ModelConfig, MoEConfig, is_sparse_block
from switchformer.models.build import build_model

# Sequence lengths for Table 9's "FLOPs/seq": the paper does not state them; these are T5X's C4 span-corruption
# defaults (inputs 512 / targets 114, t5x base_c4_pretrain.gin).
DEFAULT_INPUT_LENGTH = 512
DEFAULT_TARGET_LENGTH = 114
# Router settings of the released checkpoints (google/switch-base-* config.json): a fixed per-sequence expert capacity
# and the coefficient of both the load-balancing and the z-loss.
RELEASED_EXPERT_CAPACITY = 64
RELEASED_ROUTER_LOSS_COEF = 0.001


def _cfg(moe_experts: int = 8, **kw) -> ModelConfig:
    return ModelConfig(moe=MoEConfig(num_experts=moe_experts), **kw)


def _base(**kw) -> dict:
    return dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12, **kw)


_DENSE = dict(encoder_sparse_step=0, decoder_sparse_step=0)
_GEGLU = dict(feed_forward_proj="gated-gelu")

PRESETS: dict[str, ModelConfig] = {
    # --- small configs for CPU tests and quick experiments
    "tiny": _cfg(8, d_model=128, d_ff=512, d_kv=32, num_heads=4, num_layers=4, num_decoder_layers=4),
    "small": _cfg(8, d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6, num_decoder_layers=6),
    "tiny-lm": _cfg(8, arch="decoder_only", d_model=128, d_ff=512, d_kv=32, num_heads=4, num_layers=4),
    # --- Table 9 as published (GEGLU, d_kv 64, layers per stack)
    "t5-base": _cfg(**_base(**_DENSE, **_GEGLU) | dict(d_ff=2048)),
    "t5-large": _cfg(d_model=1024, d_ff=2816, d_kv=64, num_heads=16, num_layers=24, num_decoder_layers=24,
                     **_DENSE, **_GEGLU),
    "t5-xxl": _cfg(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, num_decoder_layers=24,
                   tie_word_embeddings=False, **_DENSE, **_GEGLU),
    "switch-base": _cfg(128, **_base(**_GEGLU) | dict(d_ff=2048)),
    "switch-large": _cfg(128, d_model=1024, d_ff=2816, d_kv=64, num_heads=16, num_layers=24, num_decoder_layers=24,
                         **_GEGLU),
    "switch-xxl": _cfg(64, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, num_decoder_layers=24,
                       tie_word_embeddings=False, **_GEGLU),
    "switch-c": _cfg(2048, d_model=2080, d_ff=6144, d_kv=64, num_heads=32, num_layers=15, num_decoder_layers=15,
                     encoder_sparse_step=1, decoder_sparse_step=1, tie_word_embeddings=False),
    # --- released checkpoints (transformers / flaxformer configs)
    **{
        f"switch-base-{n}": _cfg(n, **_base()) for n in (8, 16, 32, 64, 128, 256)
    },
    "switch-large-128": _cfg(128, d_model=1024, d_ff=4096, d_kv=64, num_heads=16, num_layers=24,
                             num_decoder_layers=24),
    "switch-xxl-128": _cfg(128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, num_decoder_layers=24,
                           tie_word_embeddings=False, **_GEGLU),
    "switch-c-2048": _cfg(2048, d_model=2080, d_ff=6144, d_kv=64, num_heads=30, num_layers=15, num_decoder_layers=15,
                          encoder_sparse_step=1, decoder_sparse_step=1, tie_word_embeddings=False),
}
for _name in list(PRESETS):
    if _name.startswith("switch-base-"):
        PRESETS[_name].moe.expert_capacity = RELEASED_EXPERT_CAPACITY
        PRESETS[_name].aux_loss_coef = RELEASED_ROUTER_LOSS_COEF
        PRESETS[_name].z_loss_coef = RELEASED_ROUTER_LOSS_COEF

# Published numbers: paper Table 9 (params, FLOPs/seq), Table 7 (switch-base-N), the exact count of
# google/switch-base-8's weights, Tables 6/8 (T5-Base 223M, Switch-Base 7410M).
PUBLISHED: dict[str, dict[str, float]] = {
    "t5-base": {"params": 0.2e9, "params_precise": 223e6, "flops_per_seq": 124e9},
    "t5-large": {"params": 0.7e9, "flops_per_seq": 425e9},
    "t5-xxl": {"params": 11e9, "flops_per_seq": 6.3e12},
    "switch-base": {"params": 7e9, "params_precise": 7410e6, "flops_per_seq": 124e9},
    "switch-large": {"params": 26e9, "flops_per_seq": 425e9},
    "switch-xxl": {"params": 395e9, "flops_per_seq": 6.3e12},
    "switch-c": {"params": 1571e9, "flops_per_seq": 890e9},
    "switch-base-8": {"params": 619_339_008},
    "switch-base-16": {"params": 1.1e9},
    "switch-base-32": {"params": 2.0e9},
    "switch-base-64": {"params": 3.8e9},
    "switch-base-128": {"params": 7.4e9, "params_precise": 7410e6},
    "switch-base-256": {"params": 14.7e9},
    "switch-large-128": {"params": 26e9},
    "switch-xxl-128": {"params": 395e9},
    "switch-c-2048": {"params": 1571e9},
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of preset ``name`` (safe to modify)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], moe=dataclasses.replace(PRESETS[name].moe))


def count_parameters(cfg: ModelConfig | str) -> int:
    """Exact parameter count, built on the meta device (no memory is allocated); tied weights count once."""
    cfg = get_preset(cfg) if isinstance(cfg, str) else cfg
    model = build_model(cfg, init=False, device="meta")
    return sum(p.numel() for p in model.parameters())


def _stack_flops(
    cfg: ModelConfig, num_layers: int, sparse_step: int, *, cross: bool, self_len: int, cross_len: int, router: bool
) -> int:
    """Forward FLOPs per token of one stack: 2 x matmul weights touched + attention scores and mixing."""
    inner = cfg.num_heads * cfg.d_kv
    ffn = (3 if cfg.feed_forward_proj == "gated-gelu" else 2) * cfg.d_model * cfg.d_ff  # one expert or the dense FFN
    attn_proj = 4 * cfg.d_model * inner
    flops = 0
    for i in range(num_layers):
        # Self-attention projections + scores (q.k over self_len keys) and mixing (p.v): 2 x 2 x self_len x inner.
        flops += 2 * attn_proj + 4 * self_len * inner
        if cross:
            flops += 2 * attn_proj + 4 * cross_len * inner
        flops += 2 * ffn
        if is_sparse_block(i, sparse_step):
            if router:
                flops += 2 * cfg.d_model * cfg.moe.num_experts  # router logits
            flops += 2 * ffn * (cfg.moe.top_k - 1)  # top-k > 1 runs k experts
    return flops


def flops_per_sequence(
    cfg: ModelConfig | str,
    input_length: int = DEFAULT_INPUT_LENGTH,
    target_length: int = DEFAULT_TARGET_LENGTH,
    *,
    include_logits_and_router: bool = True,
) -> int:
    """Forward FLOPs of one sequence, the quantity of Table 9's "FLOPs/seq".

    Formula (per token of a stack, summed over its layers): 2 x (matmul parameters the token touches: attention
    projections, one expert or the dense FFN, the router) + attention scores and mixing 4 x L x (heads x d_kv) with
    L the full key length (no causal halving); plus the output logits 2 x d_model x vocab per target token. Encoder
    tokens see L = input_length; decoder tokens see L = target_length (self) and input_length (cross). Embedding
    lookups, norms, softmax and activations are not counted. Decoder-only: ``input_length`` tokens, no targets.

    ``include_logits_and_router=False`` drops the output logits and the router matmuls; that variant reproduces
    Table 9's FLOPs/seq within ~1% (T5-Base 124B, T5-XXL 6.3T, Switch-C 890B with 32 heads), so the paper seems to
    count only the transformer body.
    """
    cfg = get_preset(cfg) if isinstance(cfg, str) else cfg
    extra = include_logits_and_router
    logits = 2 * cfg.d_model * cfg.vocab_size if extra else 0
    if cfg.arch == "decoder_only":
        per_tok = _stack_flops(cfg, cfg.num_layers, cfg.decoder_sparse_step, cross=False, self_len=input_length,
                               cross_len=0, router=extra)
        return input_length * (per_tok + logits)
    enc = _stack_flops(cfg, cfg.num_layers, cfg.encoder_sparse_step, cross=False, self_len=input_length, cross_len=0,
                       router=extra)
    dec = _stack_flops(cfg, cfg.num_decoder_layers, cfg.decoder_sparse_step, cross=True, self_len=target_length,
                       cross_len=input_length, router=extra)
    return input_length * enc + target_length * (dec + logits)


def flops_per_token(
    cfg: ModelConfig | str, input_length: int = DEFAULT_INPUT_LENGTH, target_length: int = DEFAULT_TARGET_LENGTH
) -> int:
    """Forward FLOPs per token: ``flops_per_sequence / (input_length + target_length)`` (encoder-decoder: averaged
    over the encoder and decoder tokens of a 512/114 span-corruption example; decoder-only: ``/ input_length``).
    Training costs about 3x this (forward + backward)."""
    cfg = get_preset(cfg) if isinstance(cfg, str) else cfg
    tokens = input_length if cfg.arch == "decoder_only" else input_length + target_length
    return flops_per_sequence(cfg, input_length, target_length) // tokens


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def describe(name: str) -> str:
    """Human-readable summary of preset ``name`` (printed by ``switchformer info NAME``)."""
    cfg = get_preset(name)
    params = count_parameters(cfg)
    fps = flops_per_sequence(cfg)
    enc_dec = cfg.arch == "encoder_decoder"
    sparse_enc = sum(is_sparse_block(i, cfg.encoder_sparse_step) for i in range(cfg.num_layers)) if enc_dec else 0
    dec_layers = cfg.num_decoder_layers if enc_dec else cfg.num_layers
    sparse_dec = sum(is_sparse_block(i, cfg.decoder_sparse_step) for i in range(dec_layers))
    if enc_dec:
        layers = f"{cfg.num_layers} encoder + {cfg.num_decoder_layers} decoder"
        steps = f"{cfg.encoder_sparse_step}/{cfg.decoder_sparse_step}"
        sparse = f"{sparse_enc} encoder + {sparse_dec} decoder (steps {steps})"
        lengths = f"{DEFAULT_INPUT_LENGTH} input / {DEFAULT_TARGET_LENGTH} target tokens"
    else:
        layers = f"{cfg.num_layers} decoder"
        sparse = f"{sparse_dec} (step {cfg.decoder_sparse_step})"
        lengths = f"{DEFAULT_INPUT_LENGTH} tokens"
    lines = [
        f"preset          {name} ({cfg.arch})",
        f"parameters      {params:,} ({_human(params)})",
        f"FLOPs/token     {flops_per_token(cfg):,} (forward; {lengths})",
        f"FLOPs/sequence  {fps:,} ({_human(fps)})",
        f"layers          {layers}",
        f"d_model/d_ff    {cfg.d_model} / {cfg.d_ff} ({cfg.feed_forward_proj}); "
        f"heads {cfg.num_heads} x d_kv {cfg.d_kv}",
        f"experts         {cfg.moe.num_experts if sparse_enc + sparse_dec else 0} per sparse layer; sparse layers "
        f"{sparse}",
        f"vocab           {cfg.vocab_size}; tied embeddings {cfg.tie_word_embeddings}",
    ]
    pub = PUBLISHED.get(name)
    if pub:
        ref = pub.get("params_precise", pub["params"])
        shown = f"{pub['params']:,}" if isinstance(pub["params"], int) else _human(pub["params"])
        lines.append(f"published       {shown} parameters (ours {100 * (params / ref - 1):+.2f}% vs {_human(ref)})")
        if "flops_per_seq" in pub:
            body = flops_per_sequence(cfg, include_logits_and_router=False)
            lines.append(f"published       {_human(pub['flops_per_seq'])} FLOPs/seq (Table 9); ours without logits "
                         f"and router {_human(body)} ({100 * (body / pub['flops_per_seq'] - 1):+.1f}%)")
    return "\n".join(lines)

