"""from_pretrained on damaged or hostile checkpoint directories: one CheckpointError naming the file and the field,
never an int() error, a KeyError or a read outside the directory. The directories are written here (no transformers
needed): a tiny model saved in transformers' layout, then edited."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import switchformer
from switchformer.config import ModelConfig, MoEConfig
from switchformer.errors import CheckpointError
from switchformer.interop import INDEX_NAME, WEIGHTS_NAME, config_from_hf, config_to_hf
from switchformer.interop import files as F
from switchformer.models import build_model

TINY = ModelConfig(vocab_size=64, d_model=16, d_ff=24, d_kv=4, num_heads=2, num_layers=2, num_decoder_layers=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   moe=MoEConfig(num_experts=2, expert_capacity=4))


@pytest.fixture
def saved(tmp_path):
    """(model, directory) of a tiny model saved in transformers' layout, sharded when asked."""

    def make(shard: int | str | None = None, name: str = "ckpt"):
        torch.manual_seed(0)
        model = build_model(TINY).eval()
        d = tmp_path / name
        switchformer.save_pretrained(model, d, **({} if shard is None else {"max_shard_size": shard}))
        return model, d

    return make


def _edit_config(d, **fields):
    raw = json.loads((d / "config.json").read_text())
    raw.pop("switchformer")  # as transformers (or a third party) writes it: the fields are translated one by one
    raw.update(fields)
    (d / "config.json").write_text(json.dumps(raw))


def _same_weights(a, b):
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_plain_transformers_config_loads(saved):
    model, d = saved()
    _edit_config(d)
    assert _same_weights(switchformer.from_pretrained(d), model)


@pytest.mark.parametrize("field, value", [
    ("d_model", "512"), ("d_model", None), ("num_layers", None), ("num_experts", [8]), ("d_ff", 2.5),
    ("vocab_size", True), ("dropout_rate", "0.1"), ("tie_word_embeddings", "false"), ("router_dtype", 32),
    ("expert_capacity", None), ("encoder_sparse_step", "2"),
])
def test_wrong_type_or_null_in_config_names_the_field(saved, field, value):
    _, d = saved()
    _edit_config(d, **{field: value})
    with pytest.raises(CheckpointError, match=rf"config\.json: field '{field}' must be") as e:
        switchformer.from_pretrained(d)
    assert repr(value) in str(e.value)


def test_nulls_transformers_writes_are_accepted(saved):
    """Fields transformers itself may leave null keep their documented meaning."""
    model, d = saved()
    _edit_config(d, num_decoder_layers=None, decoder_start_token_id=None, router_jitter_noise=None)
    loaded = switchformer.from_pretrained(d)
    assert loaded.config.num_decoder_layers == TINY.num_layers and loaded.config.decoder_start_token_id == 0
    assert loaded.config.moe.jitter_eps == 0.0 and _same_weights(loaded, model)


def test_out_of_range_config_value_is_a_checkpoint_error(saved):
    _, d = saved()
    _edit_config(d, num_heads=0)
    with pytest.raises(CheckpointError, match=r"config\.json.*num_heads"):
        switchformer.from_pretrained(d)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\udcff"])
def test_unreadable_config_json_is_named(saved, text):
    _, d = saved()
    (d / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        switchformer.from_pretrained(d)


def test_native_marker_without_model_config_is_named(saved):
    model, d = saved()
    switchformer.save_pretrained(build_model(ModelConfig(**{**TINY.to_dict(), "arch": "decoder_only",
                                                            "moe": TINY.moe})), d / "lm")
    raw = json.loads((d / "lm" / "config.json").read_text())
    del raw["switchformer"]["model_config"]
    (d / "lm" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="model_config"):
        switchformer.from_pretrained(d / "lm")


def test_sharded_checkpoint_loads(saved):
    model, d = saved(shard=2000)
    assert (d / INDEX_NAME).is_file() and len(list(d.glob("model-*.safetensors"))) > 2
    assert _same_weights(switchformer.from_pretrained(d), model)


@pytest.mark.parametrize("index", [{}, {"metadata": {}}, {"weight_map": None}, {"weight_map": []}, [1]])
def test_index_without_weight_map_is_a_clear_error(saved, index):
    _, d = saved(shard=2000)
    (d / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{INDEX_NAME}.*'weight_map'"):
        switchformer.from_pretrained(d)


def test_index_that_is_not_json_is_named(saved):
    _, d = saved(shard=2000)
    (d / INDEX_NAME).write_text("{")
    with pytest.raises(CheckpointError, match=rf"{INDEX_NAME} is not valid JSON"):
        switchformer.from_pretrained(d)


@pytest.mark.parametrize("where", ["dotdot", "absolute", "nested-dotdot"])
def test_shard_paths_outside_the_directory_are_refused(saved, tmp_path, where):
    """An index naming ``../x`` or ``/abs/x`` is refused before any file is opened, even if the file exists."""
    model, d = saved(shard=2000)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    index = json.loads((d / INDEX_NAME).read_text())
    key, shard = next(iter(index["weight_map"].items()))
    shutil.copy(d / shard, outside / shard)
    name = {"dotdot": f"../elsewhere/{shard}", "absolute": str(outside / shard),
            "nested-dotdot": f"sub/../../elsewhere/{shard}"}[where]
    index["weight_map"][key] = name
    (d / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory") as e:
        switchformer.from_pretrained(d)
    assert repr(name) in str(e.value) and key in str(e.value)


def test_symlinked_shards_inside_the_directory_load(saved, tmp_path):
    """The Hugging Face cache stores snapshot files as symlinks into a blob store; those are named plainly in the
    index and load."""
    model, d = saved(shard=2000)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for f in d.glob("model-*.safetensors"):
        blob = blobs / f.name
        shutil.move(f, blob)
        f.symlink_to(blob)
    assert _same_weights(switchformer.from_pretrained(d), model)


def test_missing_shard_is_named(saved):
    _, d = saved(shard=2000)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        switchformer.from_pretrained(d)


def test_truncated_weights_are_named(saved):
    _, d = saved()
    f = d / WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME} is not a readable safetensors file"):
        switchformer.from_pretrained(d)


def test_save_is_atomic_and_leaves_no_temporary_files(saved):
    _, d = saved(shard=2000)
    assert not [p for p in d.iterdir() if p.name.startswith(".")]
    with pytest.raises(RuntimeError, match="boom"), F.atomic_path(d / "config.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert json.loads((d / "config.json").read_text())["model_type"] == "switch_transformers"  # untouched
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_resave_switches_between_single_file_and_shards_without_stale_files(saved):
    model, d = saved(shard=2000)
    shards = sorted(d.glob("model-*.safetensors"))
    switchformer.save_pretrained(model, d)  # one file now: the index and the shards go
    assert (d / WEIGHTS_NAME).is_file() and not (d / INDEX_NAME).exists() and not any(p.exists() for p in shards)
    switchformer.save_pretrained(model, d, max_shard_size=3000)  # shards again: the single file goes
    assert (d / INDEX_NAME).is_file() and not (d / WEIGHTS_NAME).exists()
    listed = set(json.loads((d / INDEX_NAME).read_text())["weight_map"].values())
    assert {p.name for p in d.glob("model-*.safetensors")} == listed
    assert _same_weights(switchformer.from_pretrained(d), model)


SWITCH_FIELDS = [
    "vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers",
    "num_sparse_encoder_layers", "num_sparse_decoder_layers", "encoder_sparse_step", "decoder_sparse_step",
    "num_experts", "expert_capacity", "router_bias", "router_jitter_noise", "router_dtype",
    "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon",
    "router_z_loss_coef", "router_aux_loss_coef", "feed_forward_proj", "dense_act_fn", "is_gated_act",
    "tie_word_embeddings", "pad_token_id", "eos_token_id", "decoder_start_token_id", "model_type", "switchformer",
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(edits=st.dictionaries(st.sampled_from(SWITCH_FIELDS), JSON_VALUES, min_size=1, max_size=3))
def test_any_json_value_in_config_gives_a_config_or_a_checkpoint_error(edits):
    """Whatever JSON a config.json holds, the translation returns a valid ModelConfig or raises CheckpointError."""
    base = {k: v for k, v in config_to_hf(TINY).items() if k != "switchformer"}
    try:
        cfg = config_from_hf({**base, **edits}, source="config.json")
    except CheckpointError as e:
        assert "config.json" in str(e)
        return
    assert isinstance(cfg, ModelConfig)
