"""Checkpoints: safetensors weights + optimizer tensors, and a JSON train state; atomic, verified, last K kept.

Layout (format version 1)::

    RUN_DIR/checkpoints/
      latest                      # text: "step_000200" (written atomically)
      step_000200/
        model.safetensors         # model.state_dict() (tied weights stored once; safetensors.torch.save_model)
        optimizer.safetensors     # every tensor of optimizer.state_dict()["state"], keyed "state.<idx>.<name>"
        config.toml               # the RunConfig of the run
        train_state.json          # step, schedule, scalars, RNG states, data-loader state, and a manifest
                                  # (size + sha256 of every other file), written last

A checkpoint is written into a temporary sibling folder, every file is fsync'ed, and the folder is renamed into
place (an atomic rename on POSIX), then ``latest`` is replaced atomically; a crash at any point leaves the previous
checkpoint intact and ``latest`` pointing at a complete one. Loading verifies the manifest first, so a truncated or
corrupted file raises ``CheckpointError`` naming the file; ``load_latest`` then falls back to the previous one.
Nothing here pickles: RNG states are base64 bytes in JSON, tensors go to safetensors.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from switchformer.errors import CheckpointError

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
CONFIG_FILE = "config.toml"


@dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` restored: the directory, the step, and the JSON train state."""

    path: Path
    step: int
    state: dict


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a fsync'ed temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------------------------
# RNG and optimizer state <-> (JSON, tensors)


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as JSON-able values (bytes as base64)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    out = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    """Inverse of ``rng_state``."""
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy()), i)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


def split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into safetensors tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = _jsonable(value)
    meta = {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}
    return tensors, meta


def merge_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of ``split_optimizer_state``: an ``optimizer.load_state_dict``-ready dict."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------------------------------------------
# Save / load


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    train_state: dict,
    config_toml: str,
    keep: int = 2,
) -> Path:
    """Atomically write checkpoint ``step`` under ``run_dir/checkpoints`` and keep the newest ``keep``.

    Args:
        run_dir: the run directory.
        step: optimizer steps done.
        model: its ``state_dict()`` goes to model.safetensors.
        optimizer: its state goes to optimizer.safetensors (tensors) and train_state.json (the rest); may be None.
        train_state: JSON-able extras (schedule, data-loader state, metrics); RNG states are added here.
        config_toml: the run's config, as TOML text.
        keep: how many checkpoints to keep (>= 1).

    Returns:
        The checkpoint directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    state = dict(train_state)
    state["format_version"] = FORMAT_VERSION
    state["step"] = step
    state["rng"] = rng_state()
    if optimizer is not None:
        tensors, meta = split_optimizer_state(optimizer.state_dict())
        save_file(tensors, str(tmp / OPTIM_FILE), metadata={"format_version": str(FORMAT_VERSION)})
        state["optimizer"] = meta
    (tmp / CONFIG_FILE).write_text(config_toml)
    files = [MODEL_FILE, CONFIG_FILE] + ([OPTIM_FILE] if optimizer is not None else [])
    for name in files:
        _fsync_file(tmp / name)
    state["manifest"] = {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in files}
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(_jsonable(state), f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)  # the commit point
    _fsync_dir(root)
    write_text_atomic(root / "latest", final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete-looking checkpoint directories, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check that every file of checkpoint ``path`` exists with the recorded size and sha256; return the state.

    Raises:
        CheckpointError: naming the first missing, truncated or corrupted file.
    """
    path = Path(path)
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {state_path} is missing")
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {state_path} is corrupted (not valid JSON: {e})") from None
    if state.get("format_version") != FORMAT_VERSION:
        version = state.get("format_version")
        raise CheckpointError(f"{state_path}: format_version {version!r}, expected {FORMAT_VERSION}")
    for name, info in state.get("manifest", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            expected = info["bytes"]
            raise CheckpointError(f"checkpoint file {f} is truncated or corrupted: {size} bytes, expected {expected}")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is corrupted: sha256 does not match train_state.json")
    return state


def load_model_weights(path: str | os.PathLike, model: torch.nn.Module, strict: bool = True) -> None:
    """Load ``model.safetensors`` of checkpoint directory ``path`` (or a .safetensors file) into ``model``."""
    path = Path(path)
    f = path / MODEL_FILE if path.is_dir() else path
    try:
        missing, unexpected = load_model(model, str(f), strict=strict)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint file {f} could not be read ({e}); it is truncated or corrupted") from None
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint file {f} does not match the model: {e}") from None


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> LoadedCheckpoint:
    """Verify and load checkpoint directory ``path`` into ``model`` (and ``optimizer``); restore RNG states.

    Raises:
        CheckpointError: a file is missing, truncated, corrupted or does not match the model.
    """
    path = Path(path)
    state = verify_checkpoint(path)
    load_model_weights(path, model)
    if optimizer is not None and "optimizer" in state:
        f = path / OPTIM_FILE
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint file {f} could not be read ({e}); truncated or corrupted") from None
        optimizer.load_state_dict(merge_optimizer_state(tensors, state["optimizer"]))
    if restore_rng:
        set_rng_state(state["rng"])
    return LoadedCheckpoint(path=path, step=int(state["step"]), state=state)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``latest`` (or the newest directory when the pointer is missing)."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        p = root / pointer.read_text().strip()
        if p.is_dir():
            return p
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_latest(
    run_dir: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> LoadedCheckpoint:
    """Load the newest usable checkpoint of ``run_dir``; a corrupted one is skipped with a warning.

    Raises:
        CheckpointError: no checkpoint at all, or none of them loads (the message lists each failure).
    """
    first = latest_checkpoint(run_dir)
    if first is None:
        raise CheckpointError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
    candidates = [first] + [p for p in reversed(list_checkpoints(run_dir)) if p != first]
    errors = []
    for p in candidates:
        try:
            loaded = load_checkpoint(p, model, optimizer, restore_rng=restore_rng)
        except CheckpointError as e:
            errors.append(str(e))
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
            continue
        return loaded
    raise CheckpointError("no usable checkpoint:\n  " + "\n  ".join(errors))
