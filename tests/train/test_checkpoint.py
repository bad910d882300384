"""Checkpoints: exact round trip (weights, optimizer, RNG), atomicity under a simulated crash, clear errors, a bad
``latest`` pointer never followed out of the run, leftovers of a killed write cleaned."""

import json
import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from switchformer import checkpoint as ck
from switchformer import errors
from switchformer.config import OptimConfig
from switchformer.interop import files
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

    save = ck.save_safetensors

    def boom(path, *a, **k):  # the process dies after the weights are written, before the rest
        if path.name == ck.OPTIM_FILE:
            raise KeyboardInterrupt("simulated crash")
        return save(path, *a, **k)

    monkeypatch.setattr(ck, "save_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, model, opt, {}, "")
    monkeypatch.undo()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_000001"]  # the temp folder is not a ckpt
    left = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp_step_000002")]
    assert len(left) == 1 and (left[0] / ck.MODEL_FILE).is_file()  # what a kill mid-write leaves behind
    assert ck.clean_incomplete(tmp_path) == left and not left[0].exists()  # removed on the next start
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


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _two_runs(tmp_path):
    """Run A with checkpoints at steps 1 and 2; run B (other weights) with one at step 5. Returns (A, B, A's step-2
    weights)."""
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    torch.manual_seed(0)
    model = Tied()
    ck.save_checkpoint(run_a, 1, model, None, {}, "")
    with torch.no_grad():
        model.ff.weight.add_(1.0)
    ck.save_checkpoint(run_a, 2, model, None, {}, "")
    ref_a = _weights(model)
    ck.save_checkpoint(run_b, 5, Tied(), None, {}, "")
    return run_a, run_b, ref_a


def _pointer_garbage(run_a, run_b):
    (run_a / "checkpoints" / "latest").write_bytes(bytes(range(256)) * 4)


def _pointer_absolute(run_a, run_b):
    (run_a / "checkpoints" / "latest").write_text(str((run_b / "checkpoints" / "step_000005").resolve()) + "\n")


def _pointer_dotdot(run_a, run_b):
    (run_a / "checkpoints" / "latest").write_text("../../b/checkpoints/step_000005\n")


def _pointer_to_symlinked_folder(run_a, run_b):
    (run_a / "checkpoints" / "step_000009").symlink_to((run_b / "checkpoints" / "step_000005").resolve())
    (run_a / "checkpoints" / "latest").write_text("step_000009\n")


def _pointer_is_symlink(run_a, run_b):
    (run_a / "checkpoints" / "latest").unlink()
    (run_a / "checkpoints" / "latest").symlink_to((run_b / "checkpoints" / "latest").resolve())


def _pointer_to_missing_step(run_a, run_b):
    (run_a / "checkpoints" / "latest").write_text("step_000007\n")


@pytest.mark.parametrize("corrupt", [_pointer_garbage, _pointer_absolute, _pointer_dotdot,
                                     _pointer_to_symlinked_folder, _pointer_is_symlink, _pointer_to_missing_step])
def test_bad_latest_pointer_falls_back_to_this_runs_newest_checkpoint(tmp_path, corrupt):
    """``latest`` is a hint: garbage or a pointer out of the run is ignored, never followed into another run."""
    run_a, run_b, ref_a = _two_runs(tmp_path)
    corrupt(run_a, run_b)
    fresh = Tied()
    with pytest.warns(UserWarning, match="latest"):
        loaded = ck.load_latest(run_a, fresh)
    assert loaded.step == 2 and loaded.path == run_a / "checkpoints" / "step_000002"
    assert all(torch.equal(v, ref_a[k]) for k, v in fresh.state_dict().items())
    assert [p.name for p in ck.list_checkpoints(run_a)] == ["step_000001", "step_000002"]  # no symlinked folder


def test_bad_latest_pointer_and_corrupt_newest_checkpoint(tmp_path):
    """The fallback verifies each checkpoint's manifest: a corrupted newest one gives way to the previous one."""
    run_a, run_b, _ = _two_runs(tmp_path)
    _pointer_garbage(run_a, run_b)
    f = run_a / "checkpoints" / "step_000002" / ck.MODEL_FILE
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.warns(UserWarning) as rec:
        loaded = ck.load_latest(run_a, Tied())
    assert loaded.step == 1
    assert any("sha256" in str(w.message) for w in rec) and any("latest" in str(w.message) for w in rec)


def test_clean_incomplete_removes_dead_writers_leftovers_only(tmp_path):
    ck.save_checkpoint(tmp_path, 1, Tied(), None, {}, "")
    root = tmp_path / "checkpoints"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that no longer runs
    dead, alive = child.pid, os.getppid()
    (root / f".tmp_step_000002_{dead}").mkdir()
    (root / f".tmp_step_000002_{dead}" / ck.MODEL_FILE).write_bytes(b"partial")
    (root / f".tmp_step_000003_{os.getpid()}").mkdir()  # this process, starting again: its own leftovers
    (root / f".latest.tmp.{dead}").write_text("step_000002\n")
    (root / f".tmp_step_000004_{alive}").mkdir()  # a live writer: kept
    removed = ck.clean_incomplete(tmp_path)
    assert sorted(p.name for p in removed) == sorted(
        [f".tmp_step_000002_{dead}", f".tmp_step_000003_{os.getpid()}", f".latest.tmp.{dead}"])
    assert sorted(p.name for p in root.iterdir()) == sorted([f".tmp_step_000004_{alive}", "latest", "step_000001"])
    assert ck.clean_incomplete(tmp_path / "no-such-run") == []
    assert ck.load_latest(tmp_path, Tied()).step == 1


def test_checkpoint_and_interop_share_one_writer_version_and_error():
    assert ck.FORMAT_VERSION == files.FORMAT_VERSION
    assert ck.save_safetensors is files.save_safetensors and ck.write_text_atomic is files.write_text_atomic
    assert ck.CheckpointError is errors.CheckpointError


def test_checkpoint_of_another_model_raises_at_once_without_fallback(tmp_path):
    """A verified checkpoint that does not fit the model is a config mistake, not corruption: one error, naming the
    file, and no warnings about falling back to older checkpoints (which would not fit either)."""
    for step in (1, 2):
        ck.save_checkpoint(tmp_path, step, Tied(), None, {}, "")
    other = Tied()
    other.ff = torch.nn.Linear(6, 7, bias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ck.CheckpointError, match=r"step_000002.model\.safetensors does not match the model"):
            ck.load_latest(tmp_path, other)


def test_garbage_latest_pointer_does_not_block_resume_or_eval(tmp_path):
    """End to end on configs/tiny_test.toml: random bytes in ``latest`` and a kill's leftover temporary folder; a
    resumed run and ``load_run`` (what eval and generate use) both continue from the newest valid checkpoint."""
    from pathlib import Path

    from switchformer.config import apply_overrides, load_toml
    from switchformer.train.loop import train
    from switchformer.train.runs import load_run

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny_test.toml"
    cfg = apply_overrides(load_toml(tiny), [f"out_dir={tmp_path}", "name=run", "train.num_threads=1",
                                            "train.steps=2", "train.checkpoint_every=1", "train.eval_every=2"])
    run = train(cfg, print_fn=lambda s: None).run_dir
    root = run / "checkpoints"
    (root / "latest").write_bytes(os.urandom(64) + b"\xff")
    (root / "step_000002" / ck.MODEL_FILE).write_bytes(b"torn")  # the newest one is corrupt too
    (root / f".tmp_step_000003_{os.getpid()}").mkdir()
    with pytest.warns(UserWarning, match="latest"):
        assert load_run(run).step == 1
    printed: list[str] = []
    result = train(apply_overrides(cfg, ["train.steps=3"]), resume=True, run_dir=run, print_fn=printed.append)
    assert any("latest" in line for line in printed) and any("step_000001" in line for line in printed), printed
    assert not list(root.glob(".tmp_step_*"))
    assert ck.load_latest(result.run_dir, load_run(run).model).step == 3
