"""Training checkpoints: safetensors weights and optimizer tensors, a JSON train state; atomic, verified, last K kept.

Layout (format version ``FORMAT_VERSION``, shared with :mod:`switchformer.interop.files`)::

    RUN_DIR/checkpoints/
      latest                      # text: "step_000200" (written atomically)
      step_000200/
        model.safetensors         # model.state_dict(), tensors that share storage (a tied head) stored once
        optimizer.safetensors     # every tensor of optimizer.state_dict()["state"], keyed "state.<idx>.<name>"
        config.toml               # the RunConfig of the run
        train_state.json          # step, schedule, scalars, RNG states, data-loader state, and a manifest
                                  # (size + sha256 of every other file), written last

A checkpoint is written into a temporary sibling folder (``.tmp_step_000200_<pid>``) with the atomic writer of
:mod:`switchformer.interop.files` (every file fsync'ed), the folder is renamed into place (an atomic rename on
POSIX), then ``latest`` is replaced atomically; a crash at any point leaves the previous checkpoint intact and
``latest`` pointing at a complete one. A crash leaves the temporary folder behind: :func:`clean_incomplete` removes
it when training starts again.

A multi-process run writes the same layout with :func:`switchformer.distributed.save_distributed_checkpoint`: the
weights and optimizer tensors go to ``dcp/`` (torch.distributed.checkpoint files: ``.metadata`` and one
``__<rank>_0.distcp`` per rank, each tensor stored once under its single-process name with its global shape) and
train_state.json says ``"kind": "distributed"``. Everything here reads such a checkpoint into a model on one process
(no process group needed), so ``switchformer eval`` and ``switchformer generate`` work on a distributed run.

Loading verifies the manifest first, so a truncated or corrupted file raises ``CheckpointError`` naming the file;
:func:`load_latest` then falls back to the previous one. ``latest`` is only a hint: unreadable, or naming anything
but a checkpoint folder of this run (an absolute path, ``..``, a symlink), it is ignored with a warning and the newest
valid checkpoint is used. Nothing here pickles: RNG states are base64 bytes in JSON, tensors go to safetensors.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model

from switchformer.errors import CheckpointError
from switchformer.interop.files import (
    FORMAT_VERSION,
    fsync_dir,
    read_json_object,
    save_safetensors,
    unique_tensors,
    write_text_atomic,
)

__all__ = [
    "FORMAT_VERSION",
    "LoadedCheckpoint",
    "clean_incomplete",
    "dcp_failures",
    "dcp_reader",
    "dcp_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_dcp_state",
    "load_latest",
    "load_model_weights",
    "save_checkpoint",
    "verify_checkpoint",
    "verify_files",
    "write_text_atomic",
]

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
CONFIG_FILE = "config.toml"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
DCP_DIR = "dcp"
"""Subfolder of a distributed checkpoint holding the torch.distributed.checkpoint files."""
DISTRIBUTED_KIND = "distributed"
"""``train_state.json["kind"]`` of a checkpoint written by ``save_distributed_checkpoint``."""
_STEP_RE = re.compile(r"step_(\d+)")
_TMP_RE = re.compile(r"\.tmp_step_\d+_(\d+)")
_TMP_FILE_RE = re.compile(r"\..+\.tmp\.(\d+)")  # what interop.files.atomic_path leaves behind on a crash


@dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` restored: the directory, the step, and the JSON train state."""

    path: Path
    step: int
    state: dict


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {"format_version": str(FORMAT_VERSION)}
    save_safetensors(tmp / MODEL_FILE, unique_tensors(model.state_dict()), metadata=meta)
    state = dict(train_state)
    state["format_version"] = FORMAT_VERSION
    state["step"] = step
    state["rng"] = rng_state()
    if optimizer is not None:
        tensors, opt_meta = split_optimizer_state(optimizer.state_dict())
        save_safetensors(tmp / OPTIM_FILE, tensors, metadata=meta)
        state["optimizer"] = opt_meta
    write_text_atomic(tmp / CONFIG_FILE, config_toml)
    files = [MODEL_FILE, CONFIG_FILE] + ([OPTIM_FILE] if optimizer is not None else [])
    state["manifest"] = {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in files}
    write_text_atomic(tmp / STATE_FILE, json.dumps(_jsonable(state)))
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)  # the commit point
    fsync_dir(root)
    write_text_atomic(root / LATEST_FILE, final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is starting: nothing of its own is being written
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to another user
        return True
    return True


def clean_incomplete(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what a checkpoint write killed midway left in ``run_dir/checkpoints``; return the removed paths.

    These are the ``.tmp_step_*`` folders (and temporary files of an interrupted ``latest`` update). A folder whose
    writer process is still alive is kept. Called by the training loop when it starts.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        m = _TMP_RE.fullmatch(p.name) or _TMP_FILE_RE.fullmatch(p.name)
        if m is None or _pid_alive(int(m[1])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of ``run_dir`` (``step_<digits>``, real directories, not symlinks), oldest first.

    Temporary folders of unfinished writes are not listed; whether a listed one is complete is checked by
    :func:`verify_checkpoint`.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if _STEP_RE.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def verify_checkpoint(path: str | os.PathLike, *, check_files: bool = True) -> dict:
    """Check that every file of checkpoint ``path`` exists with the recorded size and sha256; return the state.

    With ``check_files=False`` only train_state.json and its manifest's entries are checked, and
    :func:`verify_files` checks the files (a distributed load splits them over the ranks).

    Raises:
        CheckpointError: naming the first missing, truncated or corrupted file.
    """
    path = Path(path)
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {state_path} is missing (an interrupted write); "
                              "delete the folder or resume from an earlier checkpoint")
    state = read_json_object(state_path, "the checkpoint is corrupted; resume from an earlier one")
    if state.get("format_version") != FORMAT_VERSION:
        version = state.get("format_version")
        raise CheckpointError(f"{state_path}: format_version {version!r}, expected {FORMAT_VERSION}; this "
                              "checkpoint was written by another switchformer version, load it with that version")
    kind = state.get("kind")
    if kind not in (None, DISTRIBUTED_KIND):
        raise CheckpointError(f"{state_path}: unknown checkpoint kind {kind!r}; this checkpoint was written by "
                              "another switchformer version, load it with that version")
    manifest = state.get("manifest")
    if not isinstance(manifest, dict) or not all(isinstance(v, dict) for v in manifest.values()):
        raise CheckpointError(f"checkpoint file {state_path} is corrupted: no valid 'manifest'")
    if kind == DISTRIBUTED_KIND and f"{DCP_DIR}/.metadata" not in manifest:
        raise CheckpointError(f"checkpoint file {state_path} is corrupted: its manifest lacks {DCP_DIR}/.metadata")
    for name in manifest:
        parts = Path(name).parts
        in_dcp = kind == DISTRIBUTED_KIND and len(parts) == 2 and parts[0] == DCP_DIR and parts[1] not in (".", "..")
        if Path(name).name != name and not in_dcp:
            raise CheckpointError(f"{state_path}: manifest entry {name!r} is not a file of the checkpoint folder")
    if check_files:
        verify_files(path, state, list(manifest))
    for key in ("step", "rng"):
        if key not in state:
            raise CheckpointError(f"checkpoint file {state_path} is corrupted: no {key!r}")
    return state


def verify_files(path: str | os.PathLike, state: dict, names: list[str]) -> None:
    """Check the manifest entries ``names`` of checkpoint ``path`` (state from :func:`verify_checkpoint`): each
    file exists with the recorded size and sha256.

    Raises:
        CheckpointError: naming the first missing, truncated or corrupted file.
    """
    for name in names:
        info = state["manifest"][name]
        f = Path(path) / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        size = f.stat().st_size
        if size != info.get("bytes"):
            expected = info.get("bytes")
            raise CheckpointError(f"checkpoint file {f} is truncated or corrupted: {size} bytes, expected {expected}")
        if _sha256(f) != info.get("sha256"):
            raise CheckpointError(f"checkpoint file {f} is corrupted: sha256 does not match train_state.json")


def load_model_weights(path: str | os.PathLike, model: torch.nn.Module, strict: bool = True) -> None:
    """Load ``model.safetensors`` of checkpoint directory ``path`` (or a .safetensors file) into ``model``."""
    path = Path(path)
    f = path / MODEL_FILE if path.is_dir() else path
    try:
        load_model(model, str(f), strict=strict)
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
    return _load_verified(path, verify_checkpoint(path), model, optimizer, restore_rng)


def _load_verified(path: Path, state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                   restore_rng: bool) -> LoadedCheckpoint:
    if state.get("kind") == DISTRIBUTED_KIND:
        load_dcp_state(path, state, model, optimizer)
    else:
        _load_safetensors_state(path, state, model, optimizer)
    if restore_rng:
        set_rng_state(state["rng"])
    return LoadedCheckpoint(path=path, step=int(state["step"]), state=state)


def _load_safetensors_state(path: Path, state: dict, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer | None) -> None:
    load_model_weights(path, model)
    if optimizer is not None and "optimizer" in state:
        f = path / OPTIM_FILE
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint file {f} could not be read ({e}); truncated or corrupted") from None
        optimizer.load_state_dict(merge_optimizer_state(tensors, state["optimizer"]))


def _pointed_checkpoint(root: Path) -> Path | None:
    """The checkpoint folder ``root/latest`` names, or None (with a warning) when it is unusable.

    Only a plain ``step_<digits>`` name of a real folder inside ``root`` is followed: never an absolute path, a
    ``..``, a symlinked pointer or a symlinked folder, which could lead to another run's checkpoint.
    """
    pointer = root / LATEST_FILE
    if not pointer.exists() and not pointer.is_symlink():
        return None
    problem = None
    if pointer.is_symlink() or not pointer.is_file():
        problem = "is not a regular file"
    else:
        try:
            name = pointer.read_bytes().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name, problem = "", "is unreadable"
        if problem is None:
            target = root / name
            if not _STEP_RE.fullmatch(name):
                problem = f"holds {name[:80]!r}, not a checkpoint folder name like 'step_000200'"
            elif not target.is_dir() or target.is_symlink():
                problem = f"names {name!r}, which is not a checkpoint folder of this run"
            else:
                return target
    warnings.warn(f"{pointer} {problem}; ignoring it and using the newest valid checkpoint of {root.parent}",
                  stacklevel=3)
    return None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``latest``, or the newest checkpoint folder when the pointer is missing or unusable
    (see :func:`load_latest`); None when the run has none."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointed = _pointed_checkpoint(root)
    if pointed is not None:
        return pointed
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_latest(
    run_dir: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> LoadedCheckpoint:
    """Load the newest usable checkpoint of ``run_dir``; a corrupted one is skipped with a warning.

    ``checkpoints/latest`` is tried first; when it is unreadable or points anywhere but a checkpoint folder of this
    run, it is ignored (with a warning). Then every checkpoint folder, newest first, until one verifies. A verified
    checkpoint that does not fit ``model`` (another model config) raises at once: an older one of the same run would
    not fit either.

    Raises:
        CheckpointError: no checkpoint at all, none of them verifies (the message lists each failure), or the
            newest verified one does not match the model.
    """
    first = latest_checkpoint(run_dir)
    if first is None:
        raise CheckpointError(f"no checkpoint in {Path(run_dir) / CHECKPOINTS_DIR}; train first, or pass the run "
                              "directory that holds checkpoints/")
    candidates = [first] + [p for p in reversed(list_checkpoints(run_dir)) if p != first]
    errors = []
    for p in candidates:
        try:
            state = verify_checkpoint(p)
        except CheckpointError as e:
            errors.append(str(e))
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
            continue
        return _load_verified(p, state, model, optimizer, restore_rng)
    raise CheckpointError("no usable checkpoint:\n  " + "\n  ".join(errors))


# ---------------------------------------------------------------------------------------------------------------
# Distributed checkpoints (torch.distributed.checkpoint), read in any process

_DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
        "StorageMeta", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` (a pickle by design) admitting only the classes DCP itself writes there, so a
    crafted checkpoint cannot run code when it is loaded (the tensor files are read with ``weights_only=True``)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


@cache
def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            f = Path(self.path) / ".metadata"
            try:
                with open(f, "rb") as handle:
                    metadata = _DCPMetadataUnpickler(handle).load()
            except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError) as e:
                raise CheckpointError(f"checkpoint file {f} could not be read ({e}); it is truncated, corrupted or "
                                      "not a switchformer checkpoint") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader


def dcp_reader(dcp_dir: str | os.PathLike) -> Any:
    """A ``torch.distributed.checkpoint.FileSystemReader`` of ``dcp_dir`` whose metadata is unpickled with an
    allow-list of DCP's own classes (nothing else is ever unpickled: only tensors are stored)."""
    return _safe_reader_class()(str(dcp_dir))


def dcp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
              ) -> tuple[dict[str, torch.Tensor], dict | None, dict, dict | None]:
    """The tensors a distributed checkpoint stores, keyed as DCP stores them, and the JSON rest.

    Model and optimizer state come from ``torch.distributed.checkpoint.state_dict.get_state_dict``: keyed by the
    parameters' single-process names (FSDP/DDP wrappers removed), a sharded parameter (a DTensor) stays a DTensor of
    its global shape. Only tensors go into DCP (``model.<name>``, ``optim.state.<name>.<state>``); the optimizer's
    parameter groups and non-tensor state go to train_state.json. An optimizer without state gets its state
    created first (one step with zero gradients and learning rate 0, which ``get_state_dict`` does), so that loading
    has tensors to load into.

    Returns:
        ``(tensors, optimizer_meta or None, model_state_dict, optimizer_state_dict or None)``; the last two are what
        ``set_state_dict`` takes once ``tensors`` have been loaded in place.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        msd, osd = get_model_state_dict(model), None
    else:
        msd, osd = get_state_dict(model, optimizer)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in msd.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"model state {name!r} is a {type(value).__name__}, not a tensor; distributed "
                                  "checkpoints store tensors only")
        tensors[f"model.{name}"] = value
    meta = None
    if osd is not None:
        scalars: dict[str, dict] = {}
        for name, pstate in osd["state"].items():
            for key, value in pstate.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.state.{name}.{key}"] = value
                else:
                    scalars.setdefault(name, {})[key] = _jsonable(value)
        meta = {"param_groups": _jsonable(osd["param_groups"]), "scalars": scalars}
    return tensors, meta, msd, osd


def _check_dcp_keys(metadata: Any, tensors: dict[str, torch.Tensor], where: Path, optimizer: bool) -> None:
    """Every tensor to load is stored as a tensor of the same global shape; no model tensor is left over."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = metadata.state_dict_metadata
    missing = [k for k in tensors if k not in stored]
    unexpected = [k for k in stored if k.startswith("model.") and k not in tensors]
    wrong = [f"{k}: stored {tuple(stored[k].size)}, the model has {tuple(t.shape)}"
             for k, t in tensors.items() if k in stored and isinstance(stored[k], TensorStorageMetadata)
             and tuple(stored[k].size) != tuple(t.shape)]
    not_tensors = [k for k in tensors if k in stored and not isinstance(stored[k], TensorStorageMetadata)]
    problems = []
    if missing:
        what = "optimizer state the checkpoint lacks (another optimizer?)" if all(
            k.startswith("optim.") for k in missing) else "missing from the checkpoint"
        problems.append(f"{what}: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"not in the model: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"shapes differ: {wrong[:8]}{' ...' if len(wrong) > 8 else ''}")
    if not_tensors:
        problems.append(f"stored as objects, not tensors (refusing to unpickle them): {not_tensors[:8]}")
    if problems:
        raise CheckpointError(f"checkpoint {where} does not match the model{' and optimizer' if optimizer else ''}: "
                              + "; ".join(problems) + "; build the model (and optimizer) from the checkpoint's "
                              "config.toml")


def dcp_failures(error: BaseException) -> str:
    """One line per failing rank of a ``torch.distributed.checkpoint`` ``CheckpointException``."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return f"{type(error).__name__}: {error}"
    return "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in sorted(failures.items()))


def load_dcp_state(path: str | os.PathLike, state: dict, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load the ``dcp/`` tensors of distributed checkpoint ``path`` (train state ``state``) into ``model`` and
    ``optimizer``, resharding to however they are laid out.

    A plain model on one process (no process group needed) reads every tensor whole; a parallelized model (DTensor
    parameters; every rank calls this) reads only its own shards. The optimizer must be built like the saved one
    (same type and parameter groups). RNG states are not touched.

    Raises:
        CheckpointError: a missing, extra or mis-shaped tensor (all listed), or unreadable metadata.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor

    path = Path(path)
    if optimizer is not None and "optimizer" not in state:
        optimizer = None  # saved without optimizer state: the optimizer keeps its own (as for single-process ones)
    tensors, _, msd, osd = dcp_state(model, optimizer)
    reader = dcp_reader(path / DCP_DIR)
    _check_dcp_keys(reader.read_metadata(), tensors, path, optimizer is not None)
    # A plain model reads on its own, even inside a job (an export on rank 0); sharded tensors read collectively.
    collective = dist.is_available() and dist.is_initialized() and any(
        isinstance(t, DTensor) for t in tensors.values())
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # loading in one process is intended here, not a fallback
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(tensors, storage_reader=reader, no_dist=not collective)
    except CheckpointException as e:  # what failed on which rank (a truncated data file), raised on every rank
        raise CheckpointError(f"checkpoint {path / DCP_DIR} could not be read ({dcp_failures(e)}); it is "
                              "truncated or corrupted") from None
    if optimizer is None:
        set_model_state_dict(model, msd)
        return
    meta = state["optimizer"]
    for name, values in meta.get("scalars", {}).items():
        osd["state"].setdefault(name, {}).update(values)
    saved_groups, groups = meta["param_groups"], osd["param_groups"]
    if len(saved_groups) != len(groups) or any(sorted(a["params"]) != sorted(b["params"])
                                               for a, b in zip(saved_groups, groups, strict=True)):
        raise CheckpointError(f"checkpoint {path}: the optimizer's parameter groups differ from the saved ones; "
                              "build the optimizer with the checkpoint's config")
    osd["param_groups"] = saved_groups
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
