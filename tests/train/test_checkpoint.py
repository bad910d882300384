"""Checkpoints: exact round trip (weights, optimizer, RNG), atomicity under a simulated crash, clear errors."""

import json
import os
import random

import numpy as np
import pytest
import torch

from switchformer import checkpoint as ck
from switchformer.config import OptimConfig
from switchformer.train.optim import build_optimizer


class Tied(torch.nn.Module):
    """Tiny LM with tied input/output embeddings (like T5), to exercise shared tensors."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Embedding(11, 6)
        self.ff = torch.nn.Linear(6, 6, bias=False)
        self.lm_head = torch.nn.Linear(6, 11, bias=False)
        self.lm_head.weight = self.shared.weight

    def forward(self, ids):
        return self.lm_head(torch.relu(self.ff(self.shared(ids))))


def _train_steps(model, opt, n):
    for _ in range(n):
        ids = torch.randint(0, 11, (3, 5))
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_round_trip_is_exact(tmp_path, name):
    model = Tied()
    opt = build_optimizer(model, OptimConfig(name=name, lr=1e-2))
    _train_steps(model, opt, 3)
    random.random(), np.random.rand()
    ck.save_checkpoint(tmp_path, 3, model, opt, {"data": {"pos": 7}}, "x = 1\n")
    expected = _train_steps(model, opt, 2), random.random(), float(np.random.rand())

    model2 = Tied()
    opt2 = build_optimizer(model2, OptimConfig(name=name, lr=1e-2))
    loaded = ck.load_latest(tmp_path, model2, opt2)
    assert loaded.step == 3 and loaded.state["data"] == {"pos": 7}
    assert model2.lm_head.weight.data_ptr() == model2.shared.weight.data_ptr()  # still tied
    got = _train_steps(model2, opt2, 2), random.random(), float(np.random.rand())
    assert got == expected


def test_keep_last_k_and_latest_pointer(tmp_path):
    model = Tied()
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, model, None, {}, "", keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000004"


def test_crash_between_writes_leaves_previous_loadable(tmp_path, monkeypatch):
    model = Tied()
    opt = build_optimizer(model, OptimConfig())
    ck.save_checkpoint(tmp_path, 1, model, opt, {}, "")
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model, opt, 1)

    def boom(*a, **k):  # the process dies after the weights are written, before the rest
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, model, opt, {}, "")
    monkeypatch.undo()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_000001"]  # the temp folder is not a ckpt
    fresh = Tied()
    loaded = ck.load_latest(tmp_path, fresh, build_optimizer(fresh, OptimConfig()))
    assert loaded.step == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ref[k])


def test_truncated_file_is_named_and_previous_used(tmp_path):
    model = Tied()
    opt = build_optimizer(model, OptimConfig())
    ck.save_checkpoint(tmp_path, 1, model, opt, {}, "")
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model, opt, 1)
    last = ck.save_checkpoint(tmp_path, 2, model, opt, {}, "")
    f = last / ck.MODEL_FILE
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match=str(f).replace(".", r"\.")):
        ck.load_checkpoint(last, Tied())
    fresh = Tied()
    with pytest.warns(UserWarning, match="falling back"):
        loaded = ck.load_latest(tmp_path, fresh)
    assert loaded.step == 1 and all(torch.equal(v, ref[k]) for k, v in fresh.state_dict().items())
    # a truncated safetensors read directly (no manifest) is also a clear CheckpointError naming the file
    with pytest.raises(ck.CheckpointError, match="model.safetensors"):
        ck.load_model_weights(f, Tied())


def test_corrupted_bytes_and_json(tmp_path):
    model = Tied()
    p = ck.save_checkpoint(tmp_path, 5, model, build_optimizer(model, OptimConfig()), {}, "")
    f = p / ck.OPTIM_FILE
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    f.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="optimizer.safetensors.*sha256"):
        ck.verify_checkpoint(p)
    (p / ck.STATE_FILE).write_text("{not json")
    with pytest.raises(ck.CheckpointError, match="train_state.json"):
        ck.verify_checkpoint(p)
    with pytest.raises(ck.CheckpointError, match="no usable checkpoint"), pytest.warns(UserWarning):
        ck.load_latest(tmp_path, Tied())


def test_no_pickle_in_checkpoint(tmp_path):
    model = Tied()
    p = ck.save_checkpoint(tmp_path, 1, model, build_optimizer(model, OptimConfig()), {}, "")
    assert sorted(os.listdir(p)) == sorted([ck.MODEL_FILE, ck.OPTIM_FILE, ck.STATE_FILE, ck.CONFIG_FILE])
    state = json.loads((p / ck.STATE_FILE).read_text())
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
