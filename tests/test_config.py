"""RunConfig: TOML round trip, dotted overrides with type checks, and errors that list the valid keys."""

from pathlib import Path

import pytest

from switchformer.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
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
    assert cfg.model.aux_loss_coef == 0.01  # paper.md §2.2 alpha
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
