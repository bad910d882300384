"""Config and key-mapping tests that need no switchformer model: checked against transformers itself."""

from __future__ import annotations

import json
import math

import pytest
import torch
from interop_tiny import tiny_hf_config, tiny_hf_model
from safetensors.torch import load_file, save_file

from switchformer import interop as H
from switchformer.config import ModelConfig, MoEConfig
from switchformer.interop import files as F

transformers = pytest.importorskip("transformers")

SWITCH_BASE_8 = {  # google/switch-base-8 config.json fields (as published on the Hugging Face Hub)
    "architectures": ["SwitchTransformersForConditionalGeneration"], "d_ff": 3072, "d_kv": 64, "d_model": 768,
    "decoder_sparse_step": 2, "decoder_start_token_id": 0, "dense_act_fn": "relu", "dropout_rate": 0.1,
    "encoder_sparse_step": 2, "eos_token_id": 1, "expert_capacity": 64, "feed_forward_proj": "relu",
    "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": False, "layer_norm_epsilon": 1e-06,
    "model_type": "switch_transformers", "num_decoder_layers": 12, "num_experts": 8, "num_heads": 12,
    "num_layers": 12, "num_sparse_decoder_layers": 6, "num_sparse_encoder_layers": 6, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "router_aux_loss_coef": 0.001,
    "router_bias": False, "router_dtype": "float32", "router_ignore_padding_tokens": False,
    "router_jitter_noise": 0.01, "router_type": "tokens_masked", "router_z_loss_coef": 0.001,
    "tie_word_embeddings": True, "use_cache": True, "vocab_size": 32128,
}


def test_switch_base_8_config_and_parameter_count():
    cfg = H.config_from_hf(SWITCH_BASE_8)
    assert (cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_decoder_layers) == (768, 3072, 12, 12)
    assert cfg.moe.num_experts == 8 and cfg.moe.expert_capacity == 64 and cfg.moe.router_dtype == "float32"
    assert cfg.encoder_sparse_step == cfg.decoder_sparse_step == 2 and cfg.feed_forward_proj == "relu"
    assert cfg.moe.top_k == 1 and cfg.moe.jitter_eps == 0.01 and cfg.tie_word_embeddings
    shapes = H.hf_param_shapes(cfg)
    # Golden values of google/switch-base-8's transformers layout: 437 distinct tensors (440 names in the pickled
    # files, minus three tied aliases) and 619,339,008 parameters.
    assert len(shapes) == 437
    assert sum(math.prod(s) for s in shapes.values()) == 619_339_008


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(num_sparse_encoder_layers=2, num_sparse_decoder_layers=2),  # step 1: every block sparse
        dict(num_layers=3, num_decoder_layers=5, num_sparse_encoder_layers=0, num_sparse_decoder_layers=2),
        dict(tie_word_embeddings=False),
    ],
)
def test_param_shapes_match_transformers(overrides):
    """Our key/shape list is exactly what transformers instantiates (including its num_sparse=0 quirk)."""
    hf_cfg = tiny_hf_config(**overrides)
    with torch.device("meta"):
        model = transformers.SwitchTransformersForConditionalGeneration(hf_cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if hf_cfg.tie_word_embeddings:
        for k in H.TIED_ALIASES:
            got.pop(k, None)
    cfg = H.config_from_hf(hf_cfg.to_dict())
    assert H.hf_param_shapes(cfg) == got


def test_config_round_trip_through_transformers(tmp_path):
    cfg = ModelConfig(vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=4, num_decoder_layers=3,
                      encoder_sparse_step=3, decoder_sparse_step=1, tie_word_embeddings=False,
                      moe=MoEConfig(num_experts=4, expert_capacity=5, jitter_eps=0.02))
    d = H.config_to_hf(cfg)
    json.dumps(d)  # serialisable
    assert H.config_from_hf(d) == cfg  # exact through the marker
    # transformers reads it (unknown 'switchformer' key tolerated) and builds the same sparse layout.
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf_cfg = transformers.SwitchTransformersConfig.from_pretrained(tmp_path)
    assert hf_cfg.encoder_sparse_step == 3 and hf_cfg.decoder_sparse_step == 1
    assert hf_cfg.expert_capacity == 5 and hf_cfg.router_jitter_noise == 0.02
    # Without the marker the translation is field by field.
    plain = {k: v for k, v in d.items() if k != H.MARKER}
    back = H.config_from_hf(plain)
    assert back.encoder_sparse_step == 3 and back.decoder_sparse_step == 1 and back.moe.expert_capacity == 5
    assert not back.tie_word_embeddings and back.num_decoder_layers == 3 and back.moe.num_experts == 4


def test_config_from_hf_recomputes_steps_like_transformers():
    raw = {k: v for k, v in SWITCH_BASE_8.items() if not k.endswith("sparse_step")}
    raw.update(num_sparse_encoder_layers=3, num_sparse_decoder_layers=0)
    hf_cfg = transformers.SwitchTransformersConfig(**raw)
    cfg = H.config_from_hf(raw)
    assert (cfg.encoder_sparse_step, cfg.decoder_sparse_step) == (hf_cfg.encoder_sparse_step,
                                                                  hf_cfg.decoder_sparse_step) == (4, 12)


def test_config_rejects_unsupported():
    with pytest.raises(ValueError, match="router_bias"):
        H.config_from_hf({**SWITCH_BASE_8, "router_bias": True})
    with pytest.raises(ValueError, match="dense_act_fn"):
        H.config_from_hf({**SWITCH_BASE_8, "feed_forward_proj": "gelu", "dense_act_fn": "gelu"})
    assert H.config_from_hf({**SWITCH_BASE_8, "feed_forward_proj": "gated-gelu"}).feed_forward_proj == "gated-gelu"
    with pytest.raises(ValueError, match="decoder-only"):
        H.config_to_hf(ModelConfig(arch="decoder_only"))


def test_sparse_step_from_blocks():
    assert H.sparse_step_from_blocks([], 12) == 0
    assert H.sparse_step_from_blocks(range(12), 12) == 1
    assert H.sparse_step_from_blocks([1, 3, 5, 7, 9, 11], 12) == 2
    assert H.sparse_step_from_blocks([1, 5, 9], 12) == 4  # transformers' convention, not flaxformer's 3,7,11
    with pytest.raises(H.CheckpointError, match=r"\[3, 7, 11\]"):
        H.sparse_step_from_blocks([3, 7, 11], 12)


@pytest.mark.parametrize("tied", [True, False])
def test_state_dict_round_trip(tied):
    model = tiny_hf_model(num_sparse_encoder_layers=2, tie_word_embeddings=tied)
    if not tied:  # switchformer shares one input embedding; make transformers' untied copies agree
        with torch.no_grad():
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    hf_sd = model.state_dict()
    cfg = H.config_from_hf(model.config.to_dict())
    ours = H.state_dict_from_hf(hf_sd, cfg)
    w_in = ours["encoder.block.1.layer.1.mlp.experts.w_in"]
    assert w_in.shape == (4, 48, 32)
    torch.testing.assert_close(w_in[2], hf_sd["encoder.block.1.layer.1.mlp.experts.expert_2.wi.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(ours["decoder.block.1.layer.2.mlp.experts.w_out"][3],
                               hf_sd["decoder.block.1.layer.2.mlp.experts.expert_3.wo.weight"], rtol=0, atol=0)
    assert ours["decoder.block.1.layer.2.mlp.router.weight"].shape == (4, 32)
    assert not any("expert_" in k or "classifier" in k or "embed_tokens" in k for k in ours)
    assert ("lm_head.weight" in ours) == (not tied)
    back = H.state_dict_to_hf(ours, cfg)
    expect = {k: v for k, v in hf_sd.items() if not (tied and k in H.TIED_ALIASES)}
    assert back.keys() == expect.keys()
    for k in expect:
        assert torch.equal(back[k], expect[k]), k
    with_alias = H.state_dict_to_hf(ours, cfg, include_tied_aliases=True)
    assert all(k in with_alias for k in H.TIED_ALIASES)
    assert all(torch.equal(with_alias[k], hf_sd[k]) for k in H.TIED_ALIASES)


def test_gated_expert_mapping():
    cfg = ModelConfig(vocab_size=64, d_model=16, d_ff=24, d_kv=4, num_heads=2, num_layers=2, num_decoder_layers=2,
                      feed_forward_proj="gated-gelu", moe=MoEConfig(num_experts=3, expert_capacity=4))
    shapes = H.hf_param_shapes(cfg)
    hf_sd = {k: torch.randn(s) for k, s in shapes.items()}
    ours = H.state_dict_from_hf(hf_sd, cfg)
    p = "encoder.block.1.layer.1.mlp"
    assert torch.equal(ours[f"{p}.experts.w_in"][1], hf_sd[f"{p}.experts.expert_1.wi_1.weight"])
    assert torch.equal(ours[f"{p}.experts.w_gate"][1], hf_sd[f"{p}.experts.expert_1.wi_0.weight"])
    k = "encoder.block.0.layer.1.mlp.wi_0.weight"
    assert torch.equal(ours[k], hf_sd[k])
    back = H.state_dict_to_hf(ours, cfg)
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)


def _corrupt(d, fn):
    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_missing_unexpected_misshaped_keys_are_listed(hf_dir):
    _, d = hf_dir()
    k_missing = "encoder.block.1.layer.1.mlp.experts.expert_3.wo.weight"
    k_shape = "decoder.block.0.layer.0.SelfAttention.q.weight"

    def corrupt(sd):
        del sd[k_missing]
        sd["encoder.block.1.layer.1.mlp.experts.expert_4.wo.weight"] = torch.zeros(32, 48)
        sd[k_shape] = torch.zeros(31, 32)

    _corrupt(d, corrupt)
    with pytest.raises(H.CheckpointError) as e:
        H.from_pretrained(d)
    msg = str(e.value)
    assert "1 missing" in msg and k_missing in msg
    assert "1 unexpected" in msg and "expert_4" in msg
    assert "1 mis-shaped" in msg and k_shape in msg and "(31, 32)" in msg


def test_missing_expert_is_an_error_even_when_not_strict(hf_dir):
    _, d = hf_dir()
    _corrupt(d, lambda sd: sd.pop("decoder.block.1.layer.2.mlp.experts.expert_0.wi.weight"))
    with pytest.raises(H.CheckpointError, match="expert"):
        H.from_pretrained(d, strict=False)


def test_unreadable_pickle_is_named(tmp_path):
    """A pickled-only directory is read through torch.load(weights_only=True); garbage there is a CheckpointError
    naming the file (tests/interop/test_pickle_safety.py covers refused pickles)."""
    (tmp_path / "config.json").write_text(json.dumps(SWITCH_BASE_8))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not-a-real-pickle")
    with pytest.raises(H.CheckpointError, match=r"pytorch_model\.bin is not a readable PyTorch weights file"):
        H.from_pretrained(tmp_path)


def test_hub_id_offline_gives_clear_error(tmp_path):
    pytest.importorskip("huggingface_hub")
    with pytest.raises(FileNotFoundError, match="pass that local directory"):
        H.from_pretrained("google/switch-base-8", cache_dir=tmp_path, local_files_only=True)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        H.from_pretrained(str(tmp_path / "nope" / "x" / "y"))


def test_sharded_writer_and_size_parsing(tmp_path):
    tensors = {f"t{i}": torch.full((10, 10), float(i)) for i in range(5)}  # 400 bytes each
    files = F.write_sharded(tmp_path, tensors, max_shard_size=900)
    assert len(files) == 3 and (tmp_path / H.INDEX_NAME).is_file()
    index = json.loads((tmp_path / H.INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 2000 and set(index["weight_map"]) == set(tensors)
    shards = F.ShardReader(F.weight_files(tmp_path), device="cpu")
    assert all(torch.equal(shards.get(k), v) for k, v in tensors.items())
    assert F.parse_size("5GB") == 5 * 10**9 and F.parse_size("2MiB") == 2 * 2**20
    with pytest.raises(ValueError, match="max_shard_size"):
        F.parse_size("lots")
