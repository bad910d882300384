"""RunConfig: TOML round trip, dotted overrides with type checks, and errors that list the valid keys."""

import re
from pathlib import Path

import pytest

from switchformer.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_toml,
    to_dict,
    to_toml,
    valid_keys,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_compose():
    cfg = RunConfig()
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.data, DataConfig)
    assert isinstance(cfg.optim, OptimConfig) and isinstance(cfg.train, TrainConfig)
    assert cfg.model.aux_loss_coef == 0.01  # paper §2.2: alpha = 0.01
    assert "model.moe.num_experts" in valid_keys(RunConfig)


def test_toml_round_trip(tmp_path):
    cfg = apply_overrides(
        RunConfig(),
        ["model.moe.capacity_factor=none", "data.tokenizer=some/spiece.model", "train.max_minutes=2.5", "name=x y"],
    )
    p = tmp_path / "c.toml"
    p.write_text(to_toml(cfg))
    back = load_toml(p)
    assert back == cfg
    assert back.model.moe.capacity_factor is None
    assert to_dict(back)["model"]["moe"]["num_experts"] == cfg.model.moe.num_experts


def test_overrides_valid_nested_and_coercion():
    cfg = apply_overrides(
        RunConfig(),
        ["model.moe.num_experts=16", "train.steps=100", "optim.lr=1", "train.skip_nonfinite=true",
         "optim.name=adamw", "data.corpus=123", "model.moe.expert_capacity=7"],
    )
    assert cfg.model.moe.num_experts == 16 and cfg.train.steps == 100
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int accepted for a float field
    assert cfg.train.skip_nonfinite is True and cfg.optim.name == "adamw"
    assert cfg.data.corpus == "123"  # a string field keeps the text
    assert cfg.model.moe.expert_capacity == 7
    assert RunConfig().model.moe.num_experts == 8  # the input is not mutated


@pytest.mark.parametrize(
    ("override", "exc", "needle"),
    [
        ("model.moe.nope=1", ValueError, "model.moe.num_experts"),
        ("nope=1", ValueError, "train.steps"),
        ("train.steps=1.5", TypeError, "train.steps"),
        ("train.steps=ten", TypeError, "int"),
        ("train.precision=fp16", TypeError, "float32"),
        ("train.progress=3", TypeError, "bool"),
        ("model=3", ValueError, "model.d_model"),
        ("train.steps", ValueError, "key=value"),
        ("model.d_model.x=1", ValueError, "valid keys"),
    ],
)
def test_overrides_errors(override, exc, needle):
    with pytest.raises(exc, match=needle.replace(".", r"\.")):
        apply_overrides(RunConfig(), [override])


def test_toml_unknown_key_and_wrong_type(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ValueError, match="valid keys"):
        load_toml(p)
    p.write_text("[model.moe]\nnum_experts = 'many'\n")
    with pytest.raises(TypeError, match="model.moe.num_experts"):
        load_toml(p)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_recipes_load(path):
    cfg = load_toml(path)
    assert cfg.train.steps > 0


def test_is_sparse_ignores_the_encoder_step_of_a_decoder_only_model():
    from switchformer.config import ModelConfig

    assert ModelConfig(encoder_sparse_step=2, decoder_sparse_step=0).is_sparse
    assert not ModelConfig(encoder_sparse_step=0, decoder_sparse_step=0).is_sparse
    assert not ModelConfig(arch="decoder_only", encoder_sparse_step=2, decoder_sparse_step=0).is_sparse
    assert ModelConfig(arch="decoder_only", encoder_sparse_step=0, decoder_sparse_step=2).is_sparse
    assert ModelConfig(encoder_sparse_step=0, decoder_sparse_step=0, switch_attention=True).is_sparse


def test_toml_falls_back_to_tomli_without_tomllib(monkeypatch, tmp_path):
    """Python 3.10 has no tomllib: load_toml and overrides then parse with the tomli backport."""
    import sys

    import switchformer.config as config

    pytest.importorskip("tomli")
    expected = load_toml(CONFIGS / "tiny_test.toml")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` now raises ImportError
    assert config._tomllib().__name__ == "tomli"
    assert load_toml(CONFIGS / "tiny_test.toml") == expected
    assert apply_overrides(expected, ["optim.lr=1e-3"]).optim.lr == 1e-3
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.log_every=0", "train.log_every = 0 is out of range: it must be an integer >= 1"),
        ("train.eval_every=0", "train.eval_every"),
        ("train.eval_batches=0", "train.eval_batches"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints"),
        ("train.steps=0", "train.steps"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("train.checkpoint_every=-1", "train.checkpoint_every"),
        ("train.max_minutes=-1", "train.max_minutes"),
        ("train.max_minutes=nan", "train.max_minutes"),
        ("train.num_threads=-2", "train.num_threads"),
        ("train.seed=-1", "train.seed"),
        ('train.device=""', "train.device is empty"),
        ("model.num_heads=0", "model.num_heads"),
        ("model.num_layers=0", "model.num_layers"),
        ("model.num_decoder_layers=0", "model.num_decoder_layers"),
        ("model.d_model=0", "model.d_model"),
        ("model.d_ff=-4", "model.d_ff"),
        ("model.d_kv=0", "model.d_kv"),
        ("model.vocab_size=0", "model.vocab_size"),
        ("model.encoder_sparse_step=-1", "model.encoder_sparse_step"),
        ("model.dropout_rate=1", "model.dropout_rate"),
        ("model.dropout_rate=-0.1", "model.dropout_rate"),
        ("model.init_scale=0", "model.init_scale"),
        ("model.aux_loss_coef=-0.01", "model.aux_loss_coef"),
        ("model.z_loss_coef=inf", "model.z_loss_coef"),
        ("model.relative_attention_num_buckets=2", "model.relative_attention_num_buckets"),
        ("model.relative_attention_max_distance=16", "model.relative_attention_max_distance"),
        ("model.pad_token_id=-1", "model.pad_token_id"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1e-3", "optim.lr"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.warmup_steps=-1", "optim.warmup_steps"),
        ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
        ("optim.beta2_decay=0.8", "optim.beta2_decay"),
        ("optim.beta1=1", "optim.beta1"),
        ("optim.beta2=1.0", "optim.beta2"),
        ("optim.eps=-1", "optim.eps"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.grad_clip=-1", "optim.grad_clip"),
        ("data.val_fraction=-0.1", "data.val_fraction"),
        ("data.val_fraction=1", "data.val_fraction"),
        ("data.max_bytes=0", "data.max_bytes"),
        ("data.vocab_size=0", "data.vocab_size"),
        ("data.num_sentinels=-1", "data.num_sentinels"),
        ("data.input_length=1", "data.input_length"),
        ("data.noise_density=0", "data.noise_density"),
        ("data.mean_noise_span_length=0.5", "data.mean_noise_span_length"),
        ("data.seed=-1", "data.seed"),
        ('data.corpus=""', "data.corpus is empty"),
        ('name=""', "name is empty"),
        ("name=a/b", "one folder name"),
    ],
)
def test_out_of_range_values_fail_at_load(override, needle, tmp_path):
    """A value that would crash deep inside training fails when the config is made, naming the key and a fix."""
    with pytest.raises(ConfigError, match=re.escape(needle)) as e:
        apply_overrides(RunConfig(), [override])
    key = override.split("=")[0]
    if "out of range" in str(e.value):
        assert f"e.g. {key}=" in str(e.value)  # a valid value to use instead
    # the same value in a recipe fails at load, naming the file
    section, _, name = key.rpartition(".")
    value = override.split("=", 1)[1]
    value = {"nan": "nan", "inf": "inf", "a/b": '"a/b"'}.get(value, value)
    p = tmp_path / "r.toml"
    p.write_text((f"[{section}]\n" if section else "") + f"{name} = {value}\n")
    with pytest.raises(ConfigError, match=re.escape(str(p))):
        load_toml(p)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: TrainConfig(log_every=0), "train.log_every"),
        (lambda: ModelConfig(num_heads=0), "model.num_heads"),
        (lambda: OptimConfig(lr=float("nan")), "optim.lr"),
        (lambda: DataConfig(val_fraction=2.0), "data.val_fraction"),
        (lambda: RunConfig(train=TrainConfig(keep_checkpoints=0)), "train.keep_checkpoints"),
    ],
)
def test_direct_construction_is_validated(make, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        make()


def test_type_errors_are_config_errors_and_type_errors():
    from switchformer.config import ConfigTypeError

    with pytest.raises(ConfigTypeError, match="model.num_heads") as e:
        ModelConfig(num_heads="4")
    assert isinstance(e.value, TypeError) and isinstance(e.value, ConfigError)
    with pytest.raises(ConfigTypeError, match="train.steps"):
        from_dict(RunConfig, {"train": {"steps": True}})
    with pytest.raises(ConfigError, match="valid keys"):
        from_dict(RunConfig, {"train": {"stepz": 3}})
    # the one builder also builds nested tables and the moe section of a model config from a dict
    cfg = ModelConfig.from_dict({"d_model": 16, "moe": {"num_experts": 2}})
    assert cfg.moe.num_experts == 2 and cfg.d_model == 16
    assert ModelConfig(moe={"num_experts": 4}).moe.num_experts == 4


def test_overrides_validate_the_whole_config_at_the_end():
    """Settings that depend on each other may change together; the result is checked after all of them."""
    overrides = ["model.relative_attention_num_buckets=64", "model.relative_attention_max_distance=256"]
    cfg = apply_overrides(RunConfig(), overrides)
    assert cfg.model.relative_attention_num_buckets == 64
    with pytest.raises(ConfigError, match="relative_attention_max_distance"):
        apply_overrides(RunConfig(), ["model.relative_attention_num_buckets=512"])
