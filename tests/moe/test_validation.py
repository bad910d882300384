"""Bad settings and inputs of SwitchFFN fail with a clear ValueError/TypeError (``ConfigError`` is a ValueError),
never deep inside torch or Python; good random settings run and return y of x's shape."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from switchformer.config import MoEConfig
from switchformer.errors import ConfigError
from switchformer.moe import SwitchFFN

D_MODEL, D_FF = 4, 8

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 9), st.sampled_from([0.0, -1.0, 0.5, 1.0, 1.5, math.nan, math.inf,
                                                                  -math.inf, 1e300]),
    st.sampled_from(["yes", "", "float32", "bfloat16", "relu", "sample", "int8"]), st.just([1, 2]),
    st.sampled_from([torch.float32, torch.bfloat16, torch.int64]),
)
FIELDS = ["num_experts", "capacity_factor", "eval_capacity_factor", "top_k", "expert_capacity", "min_capacity",
          "group_size", "router_dtype", "exploration", "jitter_eps", "router_input_dropout",
          "batch_prioritized_routing", "no_token_left_behind", "ntlb_top_k", "expert_dropout",
          "second_expert_threshold", "activation", "init_scale", "d_model", "d_ff", "dispatcher"]


def _run(layer: SwitchFFN, x: torch.Tensor, mask=None, *, finite: bool = True) -> None:
    y, aux = layer(x, padding_mask=mask)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert aux.tokens_per_expert.shape == (layer.num_experts,)
    if finite:  # (an accepted but absurd setting, e.g. init_scale=1e300, may overflow to inf; not an error)
        assert math.isfinite(aux.load_balancing_loss.item()) and math.isfinite(aux.router_z_loss.item())


@settings(max_examples=150, deadline=None)
@given(data=st.data(), fields=st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True),
       training=st.booleans())
def test_bad_settings_raise_value_or_type_error(data, fields, training):
    kwargs = dict(d_model=D_MODEL, d_ff=D_FF, num_experts=3)
    for name in fields:
        kwargs[name] = data.draw(JUNK, label=name)
    try:
        layer = SwitchFFN(**kwargs)
    except (ValueError, TypeError) as e:
        assert str(e)  # a message naming the problem
        return
    layer.train(training)
    _run(layer, torch.randn(2, 5, layer.d_model), finite=False)  # accepted settings must work


X_JUNK = st.one_of(
    st.just([[0.0] * D_MODEL]), st.just(3.0), st.none(),
    st.sampled_from([(0, D_MODEL), (2, 0, D_MODEL), (0, 3, D_MODEL), (5, D_MODEL), (2, 3, D_MODEL), (D_MODEL,),
                     (1, 2, 3, D_MODEL), (2, 3, D_MODEL + 1), (2, 3)]).map(torch.randn),
    st.sampled_from([torch.long, torch.bool, torch.float64, torch.bfloat16]).map(
        lambda dt: torch.ones(2, 3, D_MODEL, dtype=dt)),
)
MASK_JUNK = st.one_of(
    st.none(), st.just([True, False]), st.just(1),
    st.sampled_from([(2, 3), (6,), (2, 3, D_MODEL), (3, 2), (5,), (0,)]).map(lambda s: torch.rand(s) > 0.3),
    st.sampled_from([torch.long, torch.float32]).map(lambda dt: (torch.rand(2, 3) > 0.5).to(dt)),
    st.just(torch.full((2, 3), 0.5)), st.just(torch.full((2, 3), 2, dtype=torch.long)),
)


@settings(max_examples=120, deadline=None)
@given(x=X_JUNK, mask=MASK_JUNK, expert_capacity=st.sampled_from([None, 2]), training=st.booleans(),
       top_k=st.integers(1, 2))
def test_bad_inputs_raise_value_or_type_error(x, mask, expert_capacity, training, top_k):
    layer = SwitchFFN(D_MODEL, D_FF, 3, top_k=top_k, expert_capacity=expert_capacity).train(training)
    try:
        y, aux = layer(x, padding_mask=mask)
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    assert y.shape == x.shape and y.dtype == x.dtype
    if x.numel() == 0:
        assert aux.dropped_tokens.item() == 0 and aux.num_tokens.item() == 0
        assert aux.load_balancing_loss.item() == 0 and aux.router_z_loss.item() == 0


@settings(max_examples=80, deadline=None)
@given(
    num_experts=st.integers(1, 5), top_k=st.integers(1, 2), cf=st.sampled_from([None, 0.5, 1.0, 2.0]),
    eval_cf=st.sampled_from([None, 1.0]), expert_capacity=st.sampled_from([None, 1, 3]),
    min_capacity=st.integers(0, 4), group_size=st.sampled_from([None, 2, 3]),
    router_dtype=st.sampled_from(["float32", "bfloat16", torch.float16]),
    exploration=st.sampled_from(["input_jitter", "argmax", "sample", "input_dropout"]),
    bpr=st.booleans(), ntlb=st.booleans(), expert_dropout=st.sampled_from([0.0, 0.3]),
    threshold=st.sampled_from([0.0, 0.2, 1.0]), activation=st.sampled_from(["relu", "gated-gelu"]),
    shape=st.sampled_from([(2, 3), (6,), (1, 1), (0,)]), masked=st.booleans(), training=st.booleans(),
)
def test_good_random_settings_run(num_experts, top_k, cf, eval_cf, expert_capacity, min_capacity, group_size,
                                  router_dtype, exploration, bpr, ntlb, expert_dropout, threshold, activation, shape,
                                  masked, training):
    top_k = min(top_k, num_experts)
    layer = SwitchFFN(
        D_MODEL, D_FF, num_experts, cf, eval_cf, top_k=top_k, expert_capacity=expert_capacity,
        min_capacity=min_capacity, group_size=group_size, router_dtype=router_dtype, exploration=exploration,
        batch_prioritized_routing=bpr, no_token_left_behind=ntlb and top_k == 1, expert_dropout=expert_dropout,
        second_expert_threshold=threshold, activation=activation,
    ).train(training)
    x = torch.randn(*shape, D_MODEL, requires_grad=True)
    mask = (torch.rand(shape) > 0.3) if masked else None
    _run(layer, x, mask)
    layer(x, padding_mask=mask)[0].sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(capacity_factor=math.inf), "capacity_factor"),
        (dict(capacity_factor=math.nan), "capacity_factor"),
        (dict(min_capacity=math.nan), "min_capacity"),
        (dict(min_capacity=True), "min_capacity"),
        (dict(group_size=True), "group_size"),
        (dict(batch_prioritized_routing="yes"), "batch_prioritized_routing"),
        (dict(second_expert_threshold=-1.0), "second_expert_threshold"),
        (dict(second_expert_threshold=1.5), "second_expert_threshold"),
        (dict(router_input_dropout=-0.1), "router_input_dropout"),
        (dict(router_input_dropout=1.0), "router_input_dropout"),
        (dict(ntlb_top_k=0), "ntlb_top_k"),
        (dict(ntlb_top_k=2.0), "ntlb_top_k"),
        (dict(jitter_eps=1.0), "jitter_eps"),
        (dict(expert_dropout=1.0), "expert_dropout"),
        (dict(exploration="noisy"), "exploration"),
        (dict(router_dtype="int8"), "router_dtype"),
        (dict(top_k=5), "top_k"),
        (dict(top_k=2, no_token_left_behind=True), "no_token_left_behind"),
    ],
)
def test_moe_config_validates_when_made(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        MoEConfig(num_experts=4, **kwargs)


@pytest.mark.parametrize("init_scale", [0, -1.0, math.nan, math.inf, True, "0.1"])
def test_init_scale_must_be_finite_and_positive(init_scale):
    with pytest.raises(ConfigError, match="init_scale"):
        SwitchFFN(D_MODEL, D_FF, 2, init_scale=init_scale)


def test_padding_mask_list_is_a_type_error_naming_it():
    layer = SwitchFFN(D_MODEL, D_FF, 2)
    with pytest.raises(TypeError, match="padding_mask"):
        layer(torch.randn(2, D_MODEL), padding_mask=[True, False])


def test_from_config_revalidates_and_settings_live_in_the_config():
    cfg = MoEConfig(num_experts=4, capacity_factor=None)
    layer = SwitchFFN.from_config(D_MODEL, D_FF, cfg, activation="gated-gelu")
    assert layer.config == cfg and layer.capacity_factor is None and layer.experts.w_gate is not None
    layer.eval_capacity_factor = None  # generation's dropless switch goes through the validated config
    assert layer.config.eval_capacity_factor is None
    with pytest.raises(ConfigError, match="eval_capacity_factor"):
        layer.eval_capacity_factor = -1.0
    cfg.capacity_factor = 0.0  # edited after it was made
    with pytest.raises(ConfigError, match="capacity_factor"):
        SwitchFFN.from_config(D_MODEL, D_FF, cfg)
    with pytest.raises(TypeError, match="MoEConfig"):
        SwitchFFN.from_config(D_MODEL, D_FF, {"num_experts": 4})
