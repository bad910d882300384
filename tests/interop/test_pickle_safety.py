"""Pickled ``pytorch_model.bin`` checkpoints: read through ``torch.load(weights_only=True, mmap=True)`` only.

A directory holding only pickled weights (as several released Switch checkpoints do on their main branch) loads the
same tensors as the safetensors save of the same transformers model. A pickle that asks for anything but tensors and
containers (a ``__reduce__`` calling a function) is refused with a CheckpointError naming the file, and the function
never runs: each hostile file here would create a marker file, and a control shows that an unrestricted load of the
same bytes does create it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from interop_tiny import tiny_hf_model

import switchformer
from switchformer.errors import CheckpointError
from switchformer.interop import hub


def _touch(path: str) -> None:
    Path(path).write_text("ran")


class Payload:
    """Unpickling this calls ``how(marker)``: a side effect the restricted loader must never let happen."""

    def __init__(self, marker: Path, how: str = "function"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "os.system":
            return (os.system, (f"touch {self.marker}",))
        return (_touch, (self.marker,))


def _same_weights(a, b) -> bool:
    sb = b.state_dict()
    return a.state_dict().keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(transformers model, its safetensors directory, the switchformer model loaded from that directory)."""
    hf = tiny_hf_model(0)
    d = tmp_path_factory.mktemp("safe")
    hf.save_pretrained(d)
    return hf, d, switchformer.from_pretrained(d)


def _pickle_dir(reference, dst: Path, shards: int = 1, legacy: bool = False) -> Path:
    """A transformers-format directory with only pickled weights: the model's full state dict (tied aliases
    included, as transformers 4.x wrote pytorch_model.bin), in ``shards`` files plus an index when > 1."""
    hf, safe_dir, _ = reference
    dst.mkdir()
    shutil.copy(safe_dir / "config.json", dst / "config.json")
    sd = hf.state_dict()
    if shards == 1:
        torch.save(sd, dst / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        return dst
    keys = list(sd)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::shards]}
        torch.save(part, dst / name)
        weight_map.update(dict.fromkeys(part, name))
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.mark.parametrize("shards, legacy", [(1, False), (1, True), (3, False)],
                         ids=["zip", "legacy-format", "sharded-index"])
def test_pickled_directory_loads_the_same_weights(reference, tmp_path, caplog, shards, legacy):
    _, _, expected = reference
    d = _pickle_dir(reference, tmp_path / "pk", shards=shards, legacy=legacy)
    with caplog.at_level(logging.INFO, logger="switchformer.interop.hub"):
        model = switchformer.from_pretrained(d)
    assert _same_weights(model, expected)
    src = model.weights_source
    assert src.kind == "pickle" and src.directory == d and len(src.files) == shards
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "torch.load(weights_only=True" in
              r.getMessage()]
    assert len(warned) == 1 and str(d) in warned[0].getMessage()


def test_safetensors_win_over_pickles_in_one_directory(reference, tmp_path):
    hf, safe_dir, expected = reference
    d = tmp_path / "both"
    shutil.copytree(safe_dir, d)
    torch.save({k: torch.zeros_like(v) for k, v in hf.state_dict().items()}, d / "pytorch_model.bin")
    model = switchformer.from_pretrained(d)
    assert model.weights_source.kind == "safetensors" and _same_weights(model, expected)


def test_torch_load_is_called_restricted_and_mapped(reference, tmp_path, monkeypatch):
    calls = []
    real = torch.load

    def spy(f, *args, **kwargs):
        calls.append(kwargs)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    switchformer.from_pretrained(_pickle_dir(reference, tmp_path / "pk"))
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]


def _unrestricted_load(path: Path) -> None:
    """What an unrestricted loader does with ``path`` (the control: it runs the payload)."""
    try:
        torch.load(path, weights_only=False)
    except RuntimeError:  # a plain pickle: torch's legacy reader unpickles it (running the payload), then complains
        pass


@pytest.mark.parametrize("how", ["function", "os.system"])
@pytest.mark.parametrize("where", ["zip", "legacy-format", "plain-pickle", "one-shard-of-an-index"])
def test_a_pickle_that_calls_a_function_is_refused_and_never_runs(reference, tmp_path, how, where):
    d = _pickle_dir(reference, tmp_path / "pk", shards=2 if where == "one-shard-of-an-index" else 1)
    marker = tmp_path / "MARKER"
    target = d / ("pytorch_model-00002-of-00002.bin" if where == "one-shard-of-an-index" else "pytorch_model.bin")
    if where == "plain-pickle":  # no torch framing; protocol 2, torch.save's
        target.write_bytes(pickle.dumps({"decoy": Payload(marker, how)}, protocol=2))
    else:
        torch.save({"shared.weight": torch.ones(2), "decoy": Payload(marker, how)}, target,
                   _use_new_zipfile_serialization=where != "legacy-format")
    with pytest.raises(CheckpointError) as e:
        switchformer.from_pretrained(d)
    msg = str(e.value)
    assert not marker.exists()
    assert str(target) in msg and "refused" in msg and "nothing in it was run" in msg and "safetensors" in msg
    assert ("_touch" if how == "function" else "system") in msg  # names what it asked for

    _unrestricted_load(target)  # control: the payload is live
    assert marker.exists()


def test_a_pickle_in_a_protocol_the_restricted_loader_does_not_read_runs_nothing(tmp_path):
    """Python's default protocol (5) uses opcodes outside the restricted set: unreadable, and still nothing runs."""
    marker = tmp_path / "MARKER"
    target = tmp_path / "pytorch_model.bin"
    target.write_bytes(pickle.dumps({"decoy": Payload(marker)}, protocol=5))
    with pytest.raises(CheckpointError, match="Nothing in it was run") as e:
        hub.load_pickle_weights(target)
    assert str(target) in str(e.value) and "safetensors" in str(e.value) and not marker.exists()
    _unrestricted_load(target)
    assert marker.exists()


@pytest.mark.parametrize("content, needle", [
    (b"\x80\x04not-a-real-pickle", "not a readable PyTorch weights file"),
    (b"", "not a readable PyTorch weights file"),
    ("list", "holds list"),
    ("non-tensor", "non-tensor values"),
])
def test_unreadable_or_non_state_dict_pickles_are_named(tmp_path, content, needle):
    path = tmp_path / "pytorch_model.bin"
    if content == "list":
        torch.save([torch.ones(1)], path)
    elif content == "non-tensor":
        torch.save({"w": torch.ones(1), "step": 3}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=needle) as e:
        hub.load_pickle_weights(path)
    assert str(path) in str(e.value)


def test_index_naming_shards_outside_the_directory_is_refused(reference, tmp_path):
    d = _pickle_dir(reference, tmp_path / "pk", shards=2)
    index = json.loads((d / "pytorch_model.bin.index.json").read_text())
    index["weight_map"] = {k: "../elsewhere.bin" for k in index["weight_map"]}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        switchformer.from_pretrained(d)


def test_directory_without_pytorch_weights_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "flax_model.msgpack").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="TensorFlow/Flax"):
        hub.resolve_weights(tmp_path)
    (tmp_path / "flax_model.msgpack").unlink()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        hub.resolve_weights(tmp_path)
