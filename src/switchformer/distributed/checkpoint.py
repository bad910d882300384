"""Training checkpoints of parallelized models through torch.distributed.checkpoint (DCP), reshardable across layouts.

    from switchformer.distributed import save_distributed_checkpoint, load_distributed_checkpoint
    save_distributed_checkpoint(run_dir, step, model, optimizer, train_state, config_toml, keep=2)   # every rank
    train_state = load_distributed_checkpoint(path, model, optimizer)   # every rank; any layout, or one process

Layout (the single-process one of :mod:`switchformer.checkpoint`, with the tensors in DCP's files)::

    RUN_DIR/checkpoints/
      latest                      # text: "step_000200"
      step_000200/
        dcp/.metadata             # DCP: every tensor's global shape and where its chunks are
        dcp/__<rank>_0.distcp     # DCP: the chunks rank <rank> held (each chunk stored once)
        config.toml               # the RunConfig of the run
        train_state.json          # "kind": "distributed", layout (dp, ep, dense), world size, step, every rank's
                                  # RNG states, optimizer groups, and a manifest (size + sha256 of every file), last

**Resharding.** Model and optimizer state are gathered with ``torch.distributed.checkpoint.state_dict`` under the
single-process parameter names. Expert weights are DTensors of their global shape ``[E, ...]`` (``parallelize``
shards them ``Shard(0)`` over "ep"), FSDP2 shards the dense weights, and an optimizer's state follows its
parameter's placement; DCP records each tensor's global shape and the offset of every chunk, so the checkpoint is
keyed by global expert index and loads into any layout (another ep, dp, FSDP2 or DDP, or one process with no
process group at all), each rank reading only the chunks it holds. Replicated tensors (DDP's dense weights, step
counters) are stored once.

**Atomicity.** Rank 0 creates ``.tmp_step_XXXXXX_<pid>``; every rank writes its DCP file there and fsyncs it; each
rank hashes its own file; rank 0 then writes config.toml and train_state.json (the manifest) and renames the folder
into place (the commit point), then moves ``latest``. A crash at any point leaves the previous checkpoint intact;
``switchformer.checkpoint.clean_incomplete`` removes the leftover temporary folder. All ranks must see one shared
filesystem (the folder is renamed once, by rank 0). A failure on any rank raises ``CheckpointError`` on every rank
rather than leaving the others waiting in a collective.

**Per-rank state.** Each rank's RNG states are saved; they are restored when the checkpoint is loaded with the same
world size, and left alone otherwise (a new layout has no rank-for-rank correspondence). Data-loader positions in
``train_state`` are whatever rank 0 passed.

**Versions.** DCP files carry no compatibility guarantee across torch versions. Weights meant to outlive the run go
to safetensors with :func:`export_pretrained` (transformers' layout where transformers has the architecture,
switchformer's native one otherwise), which reads a distributed checkpoint in one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from switchformer import checkpoint as ck
from switchformer.distributed.parallelize import parallel_state, unwrap
from switchformer.errors import CheckpointError
from switchformer.interop.files import FORMAT_VERSION, fsync_dir, write_text_atomic

__all__ = ["export_pretrained", "load_distributed_checkpoint", "save_distributed_checkpoint"]

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------------ collectives
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _failure(e: BaseException) -> str:
    return str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"


def _on_rank0(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on rank 0 and give every rank its result; if it raised, raise ``CheckpointError`` everywhere."""
    rank, world = _rank_world()
    if world == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = (True, fn())
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box[0] = (False, _failure(e))
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise CheckpointError(f"{what} failed on rank 0: {value}")
    return value


def _on_every_rank(fn: Callable[[], T], what: str) -> list[T]:
    """Run ``fn`` on every rank; return all ranks' results (rank order) on every rank, or raise ``CheckpointError``
    on every rank naming the ranks that failed."""
    rank, world = _rank_world()
    try:
        mine: tuple[bool, Any] = (True, fn())
    except Exception as e:  # noqa: BLE001 - re-raised on every rank below
        if world == 1:
            raise
        mine = (False, _failure(e))
    if world == 1:
        return [mine[1]]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    failed = {r: v for r, (ok, v) in enumerate(everyone) if not ok}
    if failed:
        raise CheckpointError(f"{what} failed on ranks {sorted(failed)}: "
                              + "; ".join(f"rank {r}: {v}" for r, v in sorted(failed.items())))
    return [v for _, v in everyone]


def _file_entry(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


# ------------------------------------------------------------------------------------------------------------ save
def _layout(model: nn.Module, world: int) -> dict:
    state = parallel_state(model)
    if state is None:
        return {"dp": world, "ep": 1, "dense": "none" if world == 1 else "unknown"}
    layout = {"dp": state.dp, "ep": state.ep, "dense": state.dense}
    if getattr(state, "tp", 1) > 1:
        layout["tp"] = state.tp
    return layout


def _check_experts_global(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to save an expert-parallel tensor as a plain tensor: DCP would keep one rank's shard under the global
    name and silently lose the other ranks' experts."""
    state = parallel_state(model)
    if state is None or not state.expert_names:
        return
    local = []
    for name in state.expert_names:
        for key, t in tensors.items():
            owned = key == f"model.{name}" or key.startswith(f"optim.state.{name}.")
            if owned and t.ndim > 0 and not isinstance(t, DTensor):
                local.append(key)
    if local:
        raise CheckpointError(f"expert-parallel state {local[:4]} is held as plain per-rank tensors, which a "
                              "checkpoint would store once for all ranks; the optimizer must create its state "
                              "like its parameters (DTensors), as torch.optim's optimizers do")


def _prepare_tmp(root: Path, step: int) -> str:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_{ck.step_dir_name(step)}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / ck.DCP_DIR).mkdir(parents=True)
    return str(tmp)


def _hash_own_files(dcp_dir: Path, rank: int) -> dict[str, dict]:
    """Size and sha256 of the data files this rank wrote (DCP names them ``__<rank>_<i>.distcp``)."""
    return {f"{ck.DCP_DIR}/{f.name}": _file_entry(f) for f in sorted(dcp_dir.glob(f"__{rank}_*.distcp"))}


def _commit(run_dir: Path, tmp: Path, step: int, keep: int, state: dict, config_toml: str,
            hashed: dict[str, dict]) -> str:
    """Rank 0, after every rank wrote and hashed its files: the JSON files, then the atomic rename."""
    root = tmp.parent
    dcp_dir = tmp / ck.DCP_DIR
    manifest = dict(hashed)
    for f in sorted(dcp_dir.iterdir()):  # .metadata, and any file no rank claimed
        name = f"{ck.DCP_DIR}/{f.name}"
        if name not in manifest:
            manifest[name] = _file_entry(f)
    fsync_dir(dcp_dir)
    write_text_atomic(tmp / ck.CONFIG_FILE, config_toml)
    manifest[ck.CONFIG_FILE] = _file_entry(tmp / ck.CONFIG_FILE)
    state["manifest"] = manifest
    write_text_atomic(tmp / ck.STATE_FILE, json.dumps(ck._jsonable(state)))
    final = root / ck.step_dir_name(step)
    if final.exists():  # re-saving the same step (after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)  # the commit point
    fsync_dir(root)
    write_text_atomic(root / ck.LATEST_FILE, final.name + "\n")
    for old in ck.list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return str(final)


def save_distributed_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module,
                                optimizer: torch.optim.Optimizer | None, train_state: dict, config_toml: str, *,
                                keep: int) -> Path:
    """Atomically write checkpoint ``step`` of a parallelized model under ``run_dir/checkpoints``; keep the newest
    ``keep``. Collective: every rank calls it with its own model shard and optimizer (one process without a process
    group works too).

    Args:
        run_dir: the run directory, on a filesystem every rank sees.
        step: optimizer steps done.
        model: the model ``parallelize`` returned (a DDP wrapper is unwrapped), or a plain model.
        optimizer: its state (tensors sharded like the parameters) is saved too; may be None.
        train_state: JSON-able extras (schedule, data-loader state, metrics), rank 0's are written; every rank's
            RNG states are added here.
        config_toml: the run's config, as TOML text (rank 0's is written).
        keep: how many checkpoints to keep (>= 1).

    Returns:
        The checkpoint directory (on every rank).

    Raises:
        CheckpointError: on every rank, when writing failed on any rank; the previous checkpoint stays intact.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    rank, world = _rank_world()
    run_dir = Path(run_dir)
    inner = unwrap(model)
    tensors, opt_meta, _, _ = ck.dcp_state(inner, optimizer)
    _check_experts_global(inner, tensors)  # the same verdict on every rank, before anything is written
    tmp = Path(_on_rank0(lambda: _prepare_tmp(run_dir / ck.CHECKPOINTS_DIR, step), "creating the checkpoint folder"))
    writer = dcp.FileSystemWriter(str(tmp / ck.DCP_DIR), single_file_per_rank=True, sync_files=True)
    try:
        with warnings.catch_warnings():  # one process without a process group is a supported layout
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.save(tensors, storage_writer=writer)
    except (CheckpointException, OSError) as e:  # DCP raises CheckpointException on every rank if any failed
        raise CheckpointError(f"writing checkpoint {tmp} failed ({ck.dcp_failures(e)}); the previous "
                              "checkpoint is intact") from None
    per_rank = _on_every_rank(lambda: (_hash_own_files(tmp / ck.DCP_DIR, rank), ck.rng_state()),
                              "hashing the checkpoint files")
    hashed = {name: entry for files, _ in per_rank for name, entry in files.items()}
    state = dict(train_state)
    state.update({
        "format_version": FORMAT_VERSION, "kind": ck.DISTRIBUTED_KIND, "step": step,
        "layout": _layout(inner, world), "world_size": world,
        "rng": per_rank[0][1], "rng_ranks": [rng for _, rng in per_rank],
    })
    if opt_meta is not None:
        state["optimizer"] = opt_meta
    final = _on_rank0(lambda: _commit(run_dir, tmp, step, keep, state, config_toml, hashed),
                      f"committing checkpoint {tmp}")
    return Path(final)


# ------------------------------------------------------------------------------------------------------------ load
def _candidates(path: Path) -> list[str]:
    """``path`` itself (a checkpoint folder), or a run directory's checkpoints: ``latest`` first, then newest
    first, as ``load_latest`` tries them."""
    if (path / ck.STATE_FILE).is_file() or not (path / ck.CHECKPOINTS_DIR).is_dir():
        return [str(path)]
    first = ck.latest_checkpoint(path)
    if first is None:
        raise CheckpointError(f"no checkpoint in {path / ck.CHECKPOINTS_DIR}; train first")
    return [str(p) for p in [first] + [p for p in reversed(ck.list_checkpoints(path)) if p != first]]


def _verified(path: Path, *, collective: bool = True) -> tuple[Path, dict]:
    """The checkpoint folder to load and its verified train state. Collective by default: rank 0 reads
    train_state.json and the files of its manifest are hashed by all ranks in turn (rank r takes entries r,
    r + world, ...). For a run directory, checkpoints that fail are skipped with a warning (on rank 0), as
    ``load_latest`` does."""
    rank, world = _rank_world() if collective else (0, 1)
    on_rank0 = _on_rank0 if collective else (lambda fn, what: fn())
    on_every_rank = _on_every_rank if collective else (lambda fn, what: [fn()])
    errors = []
    for where in on_rank0(lambda: _candidates(path), f"listing the checkpoints of {path}"):
        try:
            state = on_rank0(lambda w=where: ck.verify_checkpoint(w, check_files=False), f"verifying {where}")
            names = sorted(state["manifest"])[rank::world]
            on_every_rank(lambda w=where, s=state, n=names: ck.verify_files(w, s, n), f"verifying {where}")
        except CheckpointError as e:
            errors.append(str(e))
            if rank == 0:
                warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=3)
            continue
        return Path(where), state
    if len(errors) == 1:
        raise CheckpointError(errors[0])
    raise CheckpointError("no usable checkpoint:\n  " + "\n  ".join(errors))


def _local_slice(t: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """The tensor this rank holds of ``t`` and where it sits in the global tensor."""
    if not isinstance(t, DTensor):
        return t, tuple(slice(0, n) for n in t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def _copy_from_file(handle: Any, key: str, target: torch.Tensor, where: Path) -> None:
    sl = handle.get_slice(key)
    stored = tuple(sl.get_shape())
    if stored != tuple(target.shape):
        raise CheckpointError(f"checkpoint file {where}: {key!r} has shape {stored}, the model has "
                              f"{tuple(target.shape)}; build the model from the checkpoint's config.toml")
    local, index = _local_slice(target)
    with torch.no_grad():
        local.copy_(sl[index] if index else handle.get_tensor(key))


def _load_single_process(path: Path, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """A single-process (safetensors) checkpoint into a parallelized model: every rank reads only its slices."""
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is not None and "optimizer" not in state:
        optimizer = None
    _, _, msd, osd = ck.dcp_state(model, optimizer)
    f = path / ck.MODEL_FILE
    loaded: set[int] = set()
    with safe_open(str(f), framework="pt", device="cpu") as h:
        keys = set(h.keys())  # noqa: SIM118 (safe_open is not a Mapping)
        for name, target in msd.items():
            if name in keys:
                _copy_from_file(h, name, target, f)
                loaded.add(_local_slice(target)[0].untyped_storage().data_ptr())
    # A tied weight (lm_head = shared) is stored once, under its first name: it shares storage with a loaded one.
    missing = [n for n, t in msd.items() if n not in keys
               and (t.numel() == 0 or _local_slice(t)[0].untyped_storage().data_ptr() not in loaded)]
    unexpected = sorted(keys - set(msd))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint file {f} does not match the model: missing {missing[:8]}, unexpected "
                              f"{unexpected[:8]}; build the model from the checkpoint's config.toml")
    if optimizer is None:
        set_model_state_dict(model, msd)
        return
    meta, f = state["optimizer"], path / ck.OPTIM_FILE
    saved_groups, groups = meta["param_groups"], osd["param_groups"]
    if len(saved_groups) != len(groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, groups, strict=True)):
        raise CheckpointError(f"checkpoint {path}: the optimizer's parameter groups differ from the saved ones; "
                              "build the optimizer with the checkpoint's config")
    names = {int(i): n for a, b in zip(saved_groups, groups, strict=True)
             for i, n in zip(a["params"], b["params"], strict=True)}
    with safe_open(str(f), framework="pt", device="cpu") as h:
        for key in h.keys():  # noqa: SIM118
            _, idx, what = key.split(".", 2)
            target = osd["state"].get(names.get(int(idx), ""), {}).get(what)
            if not isinstance(target, torch.Tensor):
                raise CheckpointError(f"checkpoint file {f}: optimizer state {what!r} of parameter "
                                      f"{names.get(int(idx))} has no counterpart in this optimizer (another "
                                      "optimizer?); build it with the checkpoint's config")
            _copy_from_file(h, key, target, f)
    for idx, values in meta.get("scalars", {}).items():
        osd["state"].setdefault(names[int(idx)], {}).update(values)
    osd["param_groups"] = [dict(a, params=b["params"]) for a, b in zip(saved_groups, groups, strict=True)]
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def load_distributed_checkpoint(path: str | os.PathLike, model: nn.Module,
                                optimizer: torch.optim.Optimizer | None = None, *,
                                restore_rng: bool = True) -> dict:
    """Load a checkpoint into ``model`` (and ``optimizer``) at whatever layout they have; return its train state.

    Collective: every rank calls it. ``model`` may be parallelized at any layout (any ep dividing the expert count,
    dp, FSDP2 or DDP) or a plain model in a process without a process group. ``path`` is a checkpoint folder or a
    run directory (then its newest checkpoint that verifies). Both kinds load:

    - distributed (written by :func:`save_distributed_checkpoint` at any layout): each rank reads its chunks;
    - single-process (``switchformer.checkpoint.save_checkpoint``, safetensors): each rank reads its slices of the
      full tensors, so a run can grow from one process to many.

    The optimizer must be built like the saved one (same type, same parameter groups). The manifest (sizes and
    sha256 of every file) is verified first, the files split over the ranks; from a run directory, checkpoints that
    fail are skipped with a warning.

    Args:
        restore_rng: restore this rank's RNG states when the checkpoint was written with the same world size (the
            single-process ones: world size 1); with another world size they are left alone.

    Returns:
        The train state (``step``, ``rng`` = this rank's saved RNG states where the world size matches, else rank
        0's, the caller's extras, ...).

    Raises:
        CheckpointError: on every rank; a file is missing or corrupted, or the checkpoint does not fit the model.
    """
    rank, world = _rank_world()
    where, state = _verified(Path(path))
    inner = unwrap(model)
    if state.get("kind") == ck.DISTRIBUTED_KIND:
        # Key and shape checks run before DCP's collectives, identically on every rank; DCP's load then raises on
        # every rank when any rank fails to read.
        ck.load_dcp_state(where, state, inner, optimizer)
    else:
        _on_every_rank(lambda: _load_single_process(where, state, inner, optimizer), f"loading {where}")
    saved_world = int(state.get("world_size", 1))
    if saved_world == world and "rng_ranks" in state:
        state["rng"] = state["rng_ranks"][rank]
    if restore_rng and saved_world == world:
        ck.set_rng_state(state["rng"])
    return state


# ---------------------------------------------------------------------------------------------------------- export
def export_pretrained(checkpoint_or_run_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      **save_kwargs: Any) -> Path:
    """Write the weights of a training checkpoint (distributed or single-process) as a model directory that
    ``switchformer.from_pretrained`` and, for the architectures it has, transformers load.

    Runs in one process and needs no process group (inside a job, call it on one rank only). The model is built
    from the checkpoint's config.toml and loaded whole, then written with :func:`switchformer.save_pretrained`
    (safetensors, transformers' layout where possible, else switchformer's native one; ``save_kwargs`` go there).
    DCP checkpoints have no compatibility guarantee across torch versions: export the weights you want to keep.

    Args:
        checkpoint_or_run_dir: a checkpoint folder, or a run directory (its newest checkpoint that verifies).
        out_dir: the model directory to write.

    Returns:
        ``out_dir``.
    """
    from switchformer.config import load_toml
    from switchformer.interop.pretrained import save_pretrained
    from switchformer.models.build import build_model

    where, state = _verified(Path(checkpoint_or_run_dir), collective=False)
    config = where / ck.CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{config} is missing; the checkpoint cannot say which model it holds")
    model = build_model(load_toml(config).model, init=False)
    if state.get("kind") == ck.DISTRIBUTED_KIND:
        ck.load_dcp_state(where, state, model)
    else:
        ck.load_model_weights(where, model)
    return save_pretrained(model.eval(), out_dir, **save_kwargs)
