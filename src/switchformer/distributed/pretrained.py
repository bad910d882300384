"""Loading a released checkpoint across processes: every rank reads only its own experts (paper §5.6).

    from torch.distributed.device_mesh import init_device_mesh
    import switchformer
    mesh = init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))     # "cuda" on GPUs
    model = switchformer.from_pretrained("google/switch-base-256", mesh=mesh)  # = from_pretrained_sharded(...)

A Switch Transformer's parameters are almost all experts (switch-base-256: 59 GB, switch-c-2048: 1.6 T parameters),
which expert parallelism spreads over the "ep" ranks: rank j holds experts [j*E/ep, (j+1)*E/ep) of every layer. So
the checkpoint is never loaded whole anywhere:

- the model is built on the meta device (no memory);
- each rank reads, through memory maps, the dense weights (attention, embeddings, routers, norms, dense FFNs) and
  only its own experts: transformers' checkpoints store one tensor per expert (``...experts.expert_{j}.wi.weight``),
  of which only this rank's ``j`` are read; switchformer's native checkpoints store stacked ``[E, ...]`` tensors,
  of which only this rank's rows are read (``safe_open(...).get_slice(key)[lo:hi]``);
- each expert weight becomes ``DTensor.from_local(local_rows, mesh, placements)``, the global ``[E, ...]`` tensor
  ``parallelize`` would have made, and ``parallelize`` then shards the dense weights (FSDP2 by default).

Peak memory per rank is the dense weights plus E/ep experts plus one tensor being read, plus at most
:data:`MAP_WINDOW_BYTES` of mapped file pages (clean page cache, which the kernel can drop). The key mapping and
the checks are :mod:`switchformer.interop`'s (the same as for one process); the files are found as
:func:`switchformer.interop.from_pretrained` finds them (local directory or Hub id).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Mapping
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from switchformer.config import ModelConfig
from switchformer.distributed.parallelize import EXPERT_WEIGHTS, mesh_sizes, parallelize, switch_layers, unwrap
from switchformer.dtypes import parse_dtype
from switchformer.errors import CheckpointError, ConfigError
from switchformer.interop.files import CONFIG_NAME, ShardReader
from switchformer.interop.hf_config import MARKER, config_from_hf
from switchformer.interop.hub import PickleReader, ResolvedWeights, open_weights, resolve_weights
from switchformer.interop.pretrained import _check_native_marker, _read_config
from switchformer.interop.state_dict import (
    canonical_key,
    check_keys,
    convert_from_hf,
    hf_param_shapes,
    infer_sparse_steps,
    is_stacked_key,
    map_hf_key,
    validate_hf,
)
from switchformer.models.build import build_model

__all__ = ["MAP_WINDOW_BYTES", "expert_range", "from_pretrained_sharded"]

MAP_WINDOW_BYTES = 64 * 2**20
"""A safetensors file is re-opened after this many bytes were read through one memory map, which releases the
pages read so far from the process (they stay in the page cache). Bounds the mapped-file part of resident memory
while a rank reads a checkpoint much larger than itself."""


def expert_range(num_experts: int, mesh: DeviceMesh) -> range:
    """The global expert indices this rank holds: [j*E/ep, (j+1)*E/ep) for its index j on the "ep" dimension (all
    experts when the mesh has no "ep" dimension)."""
    _, ep = mesh_sizes(mesh)
    if ep == 1:
        return range(num_experts)
    if num_experts % ep:
        raise ConfigError(f"{num_experts} experts do not split evenly over ep={ep} ranks; choose an ep that divides "
                          f"{num_experts}")
    per_rank = num_experts // ep
    j = mesh.get_local_rank("ep")
    return range(j * per_rank, (j + 1) * per_rank)


def _expert_placements(mesh: DeviceMesh) -> list:
    """``parallelize``'s expert layout: split over "ep", whole on every other mesh dimension."""
    return [Shard(0) if dim == "ep" else Replicate() for dim in mesh.mesh_dim_names]


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device())


class _RowReader:
    """Copies whole tensors, or row ranges of them, out of the checkpoint files into fresh memory.

    safetensors files are read through ``safe_open(...).get_slice(key)[lo:hi]``: a memory map of which only the
    pages of the rows asked for are touched; a file is re-opened after :data:`MAP_WINDOW_BYTES` (releasing the
    pages read so far). Pickled files (zip format) are mapped by ``torch.load(mmap=True)`` and sliced the same way.
    """

    def __init__(self, weights: ShardReader | PickleReader, device: torch.device, window_bytes: int) -> None:
        self.weights, self.device, self.window_bytes = weights, device, window_bytes
        self._file = None
        self._handle = None
        self._mapped = 0

    def view(self, key: str, rows: range | None = None) -> torch.Tensor:
        """Rows ``rows`` of ``key`` (all when None) as a view of the mapped file: copy it before the next read."""
        if isinstance(self.weights, PickleReader):
            whole = self.weights.get(key)  # mapped on CPU: slicing touches only the rows' pages
            return whole if rows is None else whole[rows.start:rows.stop]
        import safetensors

        f = self.weights.where[key]
        if self._handle is None or self._file != f or self._mapped >= self.window_bytes:
            self._handle = None  # unmaps the previous file (no view of it outlives its copy)
            self._handle = safetensors.safe_open(str(f), framework="pt", device="cpu")
            self._file, self._mapped = f, 0
        part = self._handle.get_slice(self.weights.stored[key])
        view = part[:] if rows is None else part[rows.start:rows.stop]
        self._mapped += view.numel() * view.element_size()
        return view

    def read(self, key: str, dtype: torch.dtype | None, rows: range | None = None) -> torch.Tensor:
        """Rows ``rows`` of ``key`` (all when None) as a new tensor on the reader's device, floating tensors cast
        to ``dtype`` when given."""
        view = self.view(key, rows)
        return torch.empty(view.shape, dtype=_cast(view, dtype), device=self.device).copy_(view)

    def close(self) -> None:
        self._handle = self._file = None


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def _file_order(weights: ShardReader | PickleReader, keys) -> list[str]:
    """``keys`` file by file, each file's tensors in their stored order (sequential reads, one map at a time)."""
    wanted = set(keys)
    rank = {f: i for i, f in enumerate(weights.files)}
    order = [k for k in weights.shapes if k in wanted]
    return sorted(order, key=lambda k: rank[weights.where[k]])


def _read_hf(reader: _RowReader, weights, cfg: ModelConfig, mesh: DeviceMesh, dtype: torch.dtype | None,
             what: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Dense tensors (converted by interop's mapping) and this rank's experts of a transformers checkpoint."""
    validate_hf(weights.shapes, cfg, strict=True, get=weights.get, what=what)
    expected = hf_param_shapes(cfg)
    gated = cfg.feed_forward_proj == "gated-gelu"
    mine = expert_range(cfg.moe.num_experts, mesh)
    dense_keys, expert_keys = [], {}
    for k in weights.shapes:
        if k not in expected:
            continue
        new_key, j = map_hf_key(k, gated)
        if j is None:
            dense_keys.append(k)
        elif j in mine:  # another rank's expert is never read
            expert_keys[k] = (new_key, j - mine.start)
    dense = convert_from_hf(((k, lambda k=k: reader.read(k, dtype)) for k in _file_order(weights, dense_keys)),
                            cfg, dtype=dtype, device=reader.device)
    experts: dict[str, torch.Tensor] = {}
    filled: dict[str, set[int]] = {}
    for k in _file_order(weights, expert_keys):
        new_key, row = expert_keys[k]
        view = reader.view(k)
        if new_key not in experts:  # this rank's rows of the stacked weight, filled expert by expert
            experts[new_key] = torch.empty((len(mine), *view.shape), dtype=_cast(view, dtype), device=reader.device)
            filled[new_key] = set()
        experts[new_key][row].copy_(view)
        filled[new_key].add(row)
    incomplete = {k: sorted(set(range(len(mine))) - v) for k, v in filled.items() if len(v) != len(mine)}
    if incomplete:  # validate_hf saw every key; a shard changed under us
        raise CheckpointError(f"{what}: experts missing while reading (local rows): {incomplete}; re-download the "
                              "checkpoint")
    return dense, experts


def _read_native(reader: _RowReader, weights, cfg: ModelConfig, mesh: DeviceMesh, dtype: torch.dtype | None,
                 expected: Mapping[str, tuple[int, ...]], what: str
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Dense tensors and this rank's rows of the stacked experts of a switchformer-native checkpoint."""
    check_keys(weights.shapes, expected, what=what, strict=True)
    mine = expert_range(cfg.moe.num_experts, mesh)
    dense, experts = {}, {}
    for k in _file_order(weights, expected):
        if is_stacked_key(k):
            experts[k] = reader.read(k, dtype, rows=mine)
        else:
            dense[k] = reader.read(k, dtype)
    return dense, experts


def _load_local(path_or_id, mesh: DeviceMesh, dt: torch.dtype | None, *, revision, cache_dir,
                local_files_only: bool) -> tuple[ResolvedWeights, nn.Module]:
    """This rank's part: resolve, check, read the dense weights and its experts, and fill the meta model (no
    collective: a failure here is this rank's alone)."""
    resolved = path_or_id if isinstance(path_or_id, ResolvedWeights) else resolve_weights(
        path_or_id, revision, cache_dir, local_files_only=local_files_only)
    d = resolved.directory
    raw = _read_config(d)
    source = str(d / CONFIG_NAME)
    if resolved.kind == "pickle" and not all(zipfile.is_zipfile(f) for f in resolved.files):
        warnings.warn(f"{resolved.describe()}: legacy (non-zip) pickles cannot be memory-mapped, so every rank reads "
                      "them whole; convert the checkpoint to safetensors to load only each rank's experts",
                      stacklevel=3)
    weights = open_weights(resolved, rename=canonical_key)  # headers (safetensors) or maps (pickles): no data yet
    marker = raw.get(MARKER) if isinstance(raw.get(MARKER), Mapping) else {}
    native = marker.get("format") == "native"
    if native:
        _check_native_marker(marker, source)
        cfg = config_from_hf(raw, source=source)
    else:
        cfg = infer_sparse_steps(weights.shapes, config_from_hf(raw, source=source))
        if not cfg.tie_word_embeddings and "lm_head.weight" not in weights.shapes and raw.get("model_type") == "t5":
            weights.alias("lm_head.weight", "shared.weight")  # as from_pretrained: transformers 5.x T5 ties it
    model = build_model(cfg, init=False, device="meta")
    if switch_layers(model):
        expert_range(cfg.moe.num_experts, mesh)  # an uneven split fails before anything is read
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    reader = _RowReader(weights, _mesh_device(mesh), MAP_WINDOW_BYTES)
    try:
        if native:
            dense_sd, experts = _read_native(reader, weights, cfg, mesh, dt, expected, what=str(d))
        else:
            dense_sd, experts = _read_hf(reader, weights, cfg, mesh, dt, what=str(d))
    finally:
        reader.close()
        del weights

    # The global shapes of what was read must be the model's before anything is assigned.
    found = {k: tuple(v.shape) for k, v in dense_sd.items()}
    found |= {k: (cfg.moe.num_experts, *v.shape[1:]) for k, v in experts.items()}
    check_keys(found, expected, what=f"{d} (converted)", strict=True)

    _, ep = mesh_sizes(mesh)
    placements = _expert_placements(mesh)
    model.load_state_dict(dense_sd, strict=False, assign=True)
    del dense_sd
    modules = dict(model.named_modules())
    for key, local in experts.items():
        owner, weight = key.rsplit(".", 1)
        if weight not in EXPERT_WEIGHTS:
            raise CheckpointError(f"{key}: not an expert weight of the model")
        value = DTensor.from_local(local, mesh, placements, run_check=False) if ep > 1 else local
        setattr(modules[owner], weight, nn.Parameter(value))
    del experts
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{d}: no value for {left[:20]} after loading; re-save the checkpoint with this "
                              "switchformer version")
    return resolved, model


def _raise_if_any_rank_failed(error: Exception | None, mesh: DeviceMesh) -> None:
    """One all-reduce of who failed: the failing rank raises its error, the others a CheckpointError naming it
    (instead of waiting in the next collective until the process group's timeout)."""
    failed = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=_mesh_device(mesh))
    failed[dist.get_rank()] = int(error is not None)
    dist.all_reduce(failed)
    if error is not None:
        raise error
    ranks = failed.nonzero().flatten().tolist()
    if ranks:
        raise CheckpointError(f"rank(s) {ranks} failed to load the checkpoint (their error says why); every rank "
                              "must see the same checkpoint files")


def from_pretrained_sharded(
    path_or_id: str | os.PathLike | ResolvedWeights,
    mesh: DeviceMesh,
    *,
    dense: Literal["fsdp", "ddp", "none"] = "fsdp",
    dtype: torch.dtype | str | None = None,
    check_configs: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> nn.Module:
    """Load a checkpoint across the ranks of ``mesh``, each reading only its own experts, and parallelize it.

    Call it on every rank (under torchrun, after ``init_device_mesh``). The checkpoints, their checks and the Hub
    resolution are those of :func:`switchformer.interop.from_pretrained` (transformers SwitchTransformers and T5,
    and switchformer's native format); the result is what ``parallelize(from_pretrained(path), mesh, dense=dense)``
    returns, without any rank ever holding another rank's experts.

    Args:
        path_or_id: a local checkpoint directory, a Hub repo id (every rank resolves it as one process would;
            huggingface_hub's file locks let ranks that share a cache download each file once), or a
            ``ResolvedWeights``.
        mesh: the DeviceMesh (("dp", "ep"), 1-D "ep" or "dp", or ("dp", "ep", "tp")); the tensors go to its device
            (``torch.cuda.current_device()`` on GPUs).
        dense: data parallelism of the non-expert weights, as in :func:`~switchformer.distributed.parallelize`.
        dtype: parameter dtype (default: as stored).
        check_configs: compare the layer configs and the layout across ranks first (see ``parallelize``).
        revision, cache_dir, local_files_only: Hub options, as for ``from_pretrained``.

    Returns:
        The parallelized model (a ``DistributedDataParallel`` wrapper with ``dense="ddp"``), in eval mode; its
        ``weights_source`` tells which files were read.

    Raises:
        CheckpointError: the checks of ``from_pretrained`` (a bad config.json or shard index, missing / unexpected /
            mis-shaped keys).
        ConfigError: a mesh ``parallelize`` does not take, or experts that do not split evenly over "ep".
        FileNotFoundError: no such directory, no weights, or the Hub is unreachable.
    """
    dt = None if dtype is None else parse_dtype(dtype, name="dtype")
    if not dist.is_initialized():
        raise RuntimeError("from_pretrained with a mesh needs a process group: run under torchrun (or `switchformer "
                           "train --nproc N`) and create the mesh with init_device_mesh first")
    mesh_sizes(mesh)  # the mesh's names and size, before any file is touched
    error: Exception | None = None
    try:
        resolved, model = _load_local(path_or_id, mesh, dt, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only)
    except Exception as e:  # raised below, once every rank knows: a lone failure must not leave the others waiting
        error = e
    _raise_if_any_rank_failed(error, mesh)
    model.eval()
    out = parallelize(model, mesh, dense=dense, check_configs=check_configs)
    unwrap(out).weights_source = resolved
    return out
