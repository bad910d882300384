"""The training loop on several processes (paper §5): process-group set-up, the slice of each batch a rank trains
on, the reductions that make every logged number global, and checkpoints of a parallelized model.

``train`` drives one ``Trainer`` through a *run layout*: ``SingleProcess`` (one process: every hook is the
identity) or ``DistributedRun`` (``switchformer train --nproc N`` or torchrun: N processes on a ("dp", "ep") mesh,
see ``switchformer.distributed.parallelize``). The trainer calls the same hooks either way, so its loop reads the
same for both.

What makes a run on N processes train exactly like one process (up to the routing groups; see below):

- ``train.batch_size`` is the *global* number of sequences per micro-batch. Every rank builds the same loader and
  takes rows [r*B/N, (r+1)*B/N) of each global batch, so the data order, the loader state and the token counts are
  those of a one-process run, and every rank knows the global number of label tokens without communicating.
- The LM loss is the global token mean: each rank's loss is ``its NLL sum * N / global label tokens``, so the
  gradients FSDP/DDP average over ranks are those of the global mean (a rank with fewer label tokens is not
  over-weighted). The auxiliary losses are per-layer means over routing groups, averaged over ranks; each rank's
  tokens are its routing group(s), so a one-process run with ``model.moe.group_size`` = a rank's tokens per layer
  call routes the same groups and computes the same losses.
- Expert gradients are reduced once per step (``reduce_expert_gradients``), the gradient norm is global (the same
  non-finite decision on every rank), and Adafactor runs on local shards with its few global statistics reduced
  (``ShardedAdafactor``).
- Rank 0 alone writes the run directory, metrics, progress bar and console lines; router statistics and
  evaluation sums are all-reduced first, so it logs global values.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from switchformer import checkpoint as ck
from switchformer.config import OptimConfig, RunConfig
from switchformer.errors import CheckpointError, ConfigError, RunError
from switchformer.metrics import RouterStats
from switchformer.train.optim import build_optimizer

T = TypeVar("T")

_PEER_FAILURES = ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "Broken pipe")
"""Words of the errors a gloo collective raises when a peer process is gone or stuck (NCCL raises DistError)."""


def distributed_requested() -> bool:
    """True under torchrun / ``--nproc`` (WORLD_SIZE > 1) or when a process group of several ranks exists."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(cfg: RunConfig, device: torch.device) -> SingleProcess:
    """The run layout for this process: ``DistributedRun`` when launched on several processes (the process group
    is created here unless one exists; on CUDA each process takes ``cuda:LOCAL_RANK``), else ``SingleProcess``.
    The device to train on is ``layout.device``."""
    if not distributed_requested():
        return SingleProcess(device)
    return DistributedRun.start(cfg, device)


class SingleProcess:
    """One process: every hook is the identity (the ``Trainer``'s plain behaviour)."""

    rank = 0
    world = 1
    shards = 1
    """Ranks that train on different rows of each batch (dp * ep; the "tp" ranks of one shard share its rows)."""
    shard = 0
    is_main = True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    # -------------------------------------------------------------------------------------------- set-up / data
    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the main rank, then on the others (so they find its caches filled)."""
        return fn()

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` evaluated on the main rank, its value given to every rank."""
        return fn()

    def parallelize(self, model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        return model

    def build_optimizer(self, model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
        return build_optimizer(model, cfg)

    def local(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of a global batch."""
        return batch

    def stream_seed(self, seed: int) -> int:
        """Seed of this rank's dropout/jitter stream (the model init uses ``seed`` on every rank)."""
        return seed

    # ---------------------------------------------------------------------------------------------- reductions
    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        return [float(v) for v in values]

    def reduce_router(self, stats: RouterStats) -> RouterStats:
        """Router statistics summed over ranks."""
        return stats

    def first(self, text: str | None) -> str | None:
        """The first rank's non-None ``text`` (prefixed with its rank on several processes), else None."""
        return text

    def finish_gradients(self, model: torch.nn.Module) -> None:
        """After the last micro-batch's backward: make every gradient that of the global mean loss."""

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        """Clip to ``max_norm`` (inf: only measure); the global norm before clipping, equal on every rank."""
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    # ----------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict, config_toml: str, keep: int) -> Path:
        return ck.save_checkpoint(run_dir, step, model, optimizer, state, config_toml, keep=keep)

    def load_checkpoint(self, run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        seed: int, say: Callable[[str], None] = print) -> tuple[Path, int, dict]:
        """Restore the newest usable checkpoint of ``run_dir`` (weights, optimizer, RNG); ``(path, step, state)``.
        A checkpoint written on several processes loads too (its RNG streams are then reseeded from ``seed``, and
        ``say`` prints a note)."""
        latest = ck.latest_checkpoint(run_dir)
        if latest is not None and not (latest / ck.MODEL_FILE).is_file():
            return _load_distributed(self, latest, model, optimizer, seed, say)
        loaded = ck.load_latest(run_dir, model, optimizer)
        return loaded.path, loaded.step, loaded.state

    def explain_failure(self, error: RuntimeError) -> Exception:
        """The error to raise for ``error`` (on one process: itself)."""
        return error

    def close(self) -> None:
        """Leave the process group (when this layout created it)."""


class DistributedRun(SingleProcess):
    """N processes on a ("dp", "ep") mesh, or ("dp", "ep", "tp") with tensor parallelism (``switchformer train
    --nproc N``, torchrun)."""

    def __init__(self, device: torch.device, ep: int, owns_group: bool, timeout_s: float, tp: int = 1) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        super().__init__(device)
        self.timeout_s = timeout_s
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.ep, self.tp = ep, tp
        self.dp = self.world // (ep * tp)
        self.owns_group = owns_group
        if tp > 1:
            self.mesh = init_device_mesh(device.type, (self.dp, ep, tp), mesh_dim_names=("dp", "ep", "tp"))
            # the "tp" ranks of one data shard compute the same losses and statistics: reduce over shards only
            self._data_group = self.mesh["dp", "ep"]._flatten("dp_ep").get_group()
        else:
            self.mesh = init_device_mesh(device.type, (self.dp, ep), mesh_dim_names=("dp", "ep"))
            self._data_group = None
        self.shards = self.dp * ep
        self.shard = self.mesh.get_local_rank("dp") * ep + self.mesh.get_local_rank("ep")

    @classmethod
    def start(cls, cfg: RunConfig, device: torch.device) -> DistributedRun:
        """Join (or create, from torchrun's environment) the process group and check the layout against ``cfg``."""
        pc = cfg.parallel
        if device.type == "cuda":  # one GPU per process on each machine
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            backend = pc.backend if pc.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
            if backend == "nccl" and device.type != "cuda":
                raise ConfigError(f"parallel.backend = 'nccl' needs CUDA devices, but train.device is {device}; "
                                  "use parallel.backend=gloo (or auto)")
            dist.init_process_group(backend, timeout=timedelta(seconds=pc.timeout_s),
                                    device_id=device if backend == "nccl" else None)
        world = dist.get_world_size()
        try:
            # every rank must run the same config before anything else: a difference would hang or corrupt later
            from switchformer.distributed import check_same_config

            check_same_config(dataclasses.asdict(cfg), what="the run config")
            check_layout(cfg, world)
            return cls(device, pc.ep, owns, pc.timeout_s, pc.tp)
        except BaseException:
            if owns:
                dist.destroy_process_group()
            raise

    def main_first(self, fn: Callable[[], T]) -> T:
        if self.is_main:
            value = fn()
        dist.barrier()
        if not self.is_main:
            value = fn()
        return value

    def from_main(self, fn: Callable[[], T]) -> T:
        box = [fn() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def parallelize(self, model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        from switchformer.distributed import parallelize

        return parallelize(model, self.mesh, dense=cfg.parallel.dense)

    def build_optimizer(self, model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
        optimizer = build_optimizer(model, cfg)
        if isinstance(optimizer, torch.optim.Adafactor):
            groups = [{k: v for k, v in g.items()} for g in optimizer.param_groups]
            return ShardedAdafactor(groups)
        return optimizer  # AdamW is element-wise: DTensor parameters (local shards) give the one-process update

    def local(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = next(iter(batch.values())).shape[0]
        per = rows // self.shards
        return {k: v[self.shard * per:(self.shard + 1) * per] for k, v in batch.items()}

    def stream_seed(self, seed: int) -> int:
        # shard 0 keeps the one-process stream; other shards draw independent dropout/jitter noise. The "tp" ranks
        # of a shard share theirs: dropout on their replicated activations must drop the same elements.
        return seed + self.shard

    def sum(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, group=self._data_group)
        return t.tolist()

    def reduce_router(self, stats: RouterStats) -> RouterStats:
        names = sorted(stats.tokens_per_expert)
        scalars = [stats.dropped, stats.routed, stats.entropy_sum, stats.entropy_count, stats.lb_sum, stats.z_sum,
                   stats.num_results]
        parts = [torch.tensor(scalars, dtype=torch.float64)] + [stats.tokens_per_expert[n].double() for n in names]
        flat = torch.cat(parts).to(self._comm_device)
        dist.all_reduce(flat, group=self._data_group)
        flat = flat.cpu()
        out = RouterStats()
        (out.dropped, out.routed, out.entropy_sum, out.entropy_count, out.lb_sum, out.z_sum,
         out.num_results) = flat[:len(scalars)].tolist()
        for key in ("dropped", "routed", "entropy_count", "num_results"):
            setattr(out, key, int(round(getattr(out, key))))
        offset = len(scalars)
        for n in names:
            size = stats.tokens_per_expert[n].numel()
            out.tokens_per_expert[n] = flat[offset:offset + size].round().to(torch.int64)
            offset += size
        return out

    def first(self, text: str | None) -> str | None:
        every: list[str | None] = [None] * self.world
        dist.all_gather_object(every, text)
        for rank, value in enumerate(every):
            if value is not None:
                return f"rank {rank}: {value}"
        return None

    def finish_gradients(self, model: torch.nn.Module) -> None:
        from switchformer.distributed import reduce_expert_gradients

        reduce_expert_gradients(model)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        from switchformer.distributed import clip_grad_norm_

        return float(clip_grad_norm_(model, max_norm))

    def save_checkpoint(self, run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict, config_toml: str, keep: int) -> Path:
        from switchformer.distributed.checkpoint import save_distributed_checkpoint

        # every rank's RNG states and the layout go into the checkpoint's train state with the tensors
        return save_distributed_checkpoint(run_dir, step, model, optimizer, state, config_toml, keep=keep)

    def load_checkpoint(self, run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        seed: int, say: Callable[[str], None] = print) -> tuple[Path, int, dict]:
        latest = self.from_main(lambda: ck.latest_checkpoint(run_dir))
        if latest is None:
            raise CheckpointError(f"no checkpoint in {Path(run_dir) / ck.CHECKPOINTS_DIR}; train first")
        return _load_distributed(self, latest, model, optimizer, seed, say)

    def explain_failure(self, error: RuntimeError) -> Exception:
        """A collective that failed because a peer died or stalled becomes a one-line ``RunError``."""
        text = str(error)
        if not (isinstance(error, dist.DistError) or any(m in text for m in _PEER_FAILURES)):
            return error
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
        return RunError(f"rank {self.rank}: a collective with the other processes failed ({first[:200]}); another "
                        f"process died or stopped responding (parallel.timeout_s = {self.timeout_s:g}); its own "
                        "error, if any, says why")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def check_layout(cfg: RunConfig, world: int) -> None:
    """One-line errors for layouts that cannot work, before anything is built."""
    ep, tp, bs = cfg.parallel.ep, cfg.parallel.tp, cfg.train.batch_size
    if world % (ep * tp):
        what = f"parallel.ep = {ep}" if tp == 1 else f"parallel.ep * parallel.tp = {ep * tp}"
        raise ConfigError(f"{what} does not divide the {world} processes: the processes form a (dp, ep, tp) grid "
                          f"with dp * ep * tp = {world}; choose ep (and tp) so that ep * tp divides {world}")
    if tp > 1:
        mc = cfg.model
        for name, value in (("num_heads", mc.num_heads), ("d_ff", mc.d_ff)):
            if value % tp:
                raise ConfigError(f"parallel.tp = {tp} does not divide model.{name} = {value}: tensor parallelism "
                                  f"splits attention heads and dense FFN units over tp ranks")
        if cfg.optim.name == "adafactor":
            raise ConfigError("parallel.tp > 1 needs optim.name=adamw: Adafactor's factored statistics are not "
                              "implemented for weights split along their last dimension (row-parallel layers)")
        if mc.switch_attention:
            raise ConfigError("parallel.tp > 1 cannot split Switch attention (model.switch_attention); use tp=1")
    experts = cfg.model.moe.num_experts
    if ep > 1 and not cfg.model.is_sparse:
        raise ConfigError(f"parallel.ep = {ep} but the model has no Switch layer; use parallel.ep=1 for a dense "
                          "model")
    if experts % ep:
        raise ConfigError(f"parallel.ep = {ep} does not divide model.moe.num_experts = {experts}; every "
                          "expert-parallel rank holds the same number of experts")
    shards = world // tp
    if bs % shards:
        raise ConfigError(f"train.batch_size = {bs} (the global batch) does not split over {shards} data shards "
                          f"(processes / tp); use a multiple of {shards}, e.g. {shards * max(bs // shards, 1)}")


def _load_distributed(layout: SingleProcess, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      seed: int, say: Callable[[str], None]) -> tuple[Path, int, dict]:
    """Load checkpoint folder ``path`` (written at any layout) and restore this rank's RNG streams: its own when
    the layout is unchanged, else reseeded from (seed, step, rank) with a one-line note."""
    from switchformer.distributed.checkpoint import load_distributed_checkpoint

    state = load_distributed_checkpoint(path, model, optimizer, restore_rng=False)
    step = int(state["step"])
    saved_layout = state.get("layout") or {}
    saved = {"world": int(state.get("world_size", 1)), "dp": saved_layout.get("dp", 1),
             "ep": saved_layout.get("ep", 1)}
    here = {"world": layout.world, "dp": getattr(layout, "dp", 1), "ep": getattr(layout, "ep", 1)}
    if saved == here and "rng" in state:
        ck.set_rng_state(state["rng"])  # this rank's own states (the loader picks them by rank)
    else:
        torch.manual_seed((seed * 1_000_003 + step * 1009 + layout.rank) % 2**63)
        if layout.is_main:
            say(f"note: {path.name} was written on {saved['world']} process(es) (dp={saved['dp']}, "
                  f"ep={saved['ep']}); this run has {here['world']} (dp={here['dp']}, ep={here['ep']}), so the "
                  "dropout/jitter streams are reseeded from (seed, step, rank)")
    return path, step, state


# ------------------------------------------------------------------------------------------------------ Adafactor
class ShardedAdafactor(torch.optim.Adafactor):
    """``torch.optim.Adafactor``'s update (its ``_single_tensor_adafactor``, same hyper-parameters and state names)
    for parameters that are DTensors sharded over processes.

    torch's Adafactor fails on FSDP-sharded DTensors (an in-place op on a partial norm) and is wrong on expert
    DTensors. Here each rank updates its local shard, which gives the one-process update because the update is
    element-wise except for four statistics, which are reduced over the ranks that hold different shards:

    - the parameter RMS (the relative step size) and the update RMS (update clipping) are over the whole tensor:
      their sums of squares are all-reduced;
    - the factored second moments of a >= 2-D tensor are a row mean over its last dim and a column mean over its
      second-to-last dim. Shards along the leading dims (experts [E, F, M] split over E; FSDP's rows of a 2-D
      weight along dim 0 = -2 only when the tensor is 2-D) keep whole rows, so the row statistic is local; when
      dim -2 is the sharded one, the column sums and the mean of the row statistic are all-reduced.

    Two small all-reduces per step (all parameters together). Statistics are kept as DTensors placed like their
    parameter (Replicate on a dimension reduced to 1), so distributed checkpoints reshard them with the weights.
    """

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        local = _local(p)
        if p.dim() > 1:
            row = list(local.shape)
            row[-1] = 1
            col = list(local.shape)
            col[-2] = 1
            state["row_var"] = _like_param(p, local.new_zeros(row), reduced_dim=p.dim() - 1)
            state["col_var"] = _like_param(p, local.new_zeros(col), reduced_dim=p.dim() - 2)
        else:
            state["variance"] = _like_param(p, torch.zeros_like(local), reduced_dim=None)

    def _step_group(self, group: dict) -> None:
        eps1_cfg, eps2 = group["eps"]
        lr, d, wd = float(group["lr"]), group["d"], group["weight_decay"]
        entries = []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                self._init_state(p, state)
            entries.append(_Entry(p, state, group["maximize"]))
        if not entries:
            return
        world = dist.get_world_size() if dist.is_initialized() else 1
        # phase 1: step counters, row statistics, and the partial sums that need a reduction
        partial = []
        for e in entries:
            e.state["step"] += 1
            e.step = float(e.state["step"])
            e.beta = e.step ** group["beta2_decay"]
            e.param_sq = _local(e.param).double().square().sum()
            if e.factored:
                g_sq = e.grad.square()
                row_mean = g_sq.sum(-1, keepdim=True).div_(e.param.shape[-1])
                e.row_var.lerp_(row_mean, e.beta)
                e.col_sum = g_sq.sum(-2, keepdim=True)
                e.row_sum = e.row_var.sum(-2, keepdim=True)
            if e.copies:
                partial.append(e.param_sq.reshape(1) / e.copies)
                if e.factored and e.rows_sharded:
                    partial += [e.col_sum.double().reshape(-1) / e.copies, e.row_sum.double().reshape(-1) / e.copies]
        reduced = _all_reduce_cat(partial, world)
        # phase 2: the second-moment estimate and the update, and the update's sum of squares
        partial = []
        for e in entries:
            if e.copies:
                e.param_sq, reduced = reduced[0], reduced[1:]
                if e.factored and e.rows_sharded:
                    n_col, n_row = e.col_sum.numel(), e.row_sum.numel()
                    e.col_sum = reduced[:n_col].view_as(e.col_sum).to(e.col_sum.dtype)
                    e.row_sum = reduced[n_col:n_col + n_row].view_as(e.row_sum).to(e.row_sum.dtype)
                    reduced = reduced[n_col + n_row:]
            eps1 = eps1_cfg if eps1_cfg is not None else torch.finfo(e.param.dtype).eps
            rho = min(lr, 1 / e.step ** 0.5)
            e.alpha = max(eps2, math.sqrt(float(e.param_sq)) / e.param.numel() ** 0.5) * rho
            local_param = _local(e.param)
            if wd != 0:
                local_param.mul_(1 - lr * wd)
            if e.factored:
                rows = e.param.shape[-2]
                e.col_var.lerp_(e.col_sum.div_(rows), e.beta)
                var = e.row_var @ e.col_var
                var.div_(e.row_sum.div(rows).clamp_(min=eps1))
            else:
                e.variance.lerp_(e.grad * e.grad, e.beta)
                var = e.variance.clone()
            e.update = var.clamp_(min=eps1 * eps1).rsqrt_().mul_(e.grad)
            e.update_sq = e.update.double().square().sum()
            if e.copies:
                partial.append(e.update_sq.reshape(1) / e.copies)
        reduced = _all_reduce_cat(partial, world)
        # phase 3: apply, with the update clipped by its global RMS
        for e in entries:
            if e.copies:
                e.update_sq, reduced = reduced[0], reduced[1:]
            denom = max(1.0, math.sqrt(float(e.update_sq)) / (e.param.numel() ** 0.5 * d))
            _local(e.param).add_(e.update, alpha=-e.alpha / denom)
            e.update = None


class _Entry:
    """One parameter's local views and bookkeeping during a ``ShardedAdafactor`` step."""

    def __init__(self, param: torch.Tensor, state: dict, maximize: bool) -> None:
        self.param, self.state = param, state
        grad = _local(param.grad)
        self.grad = -grad if maximize else grad
        self.factored = param.dim() > 1
        self.row_var = _local(state["row_var"]) if self.factored else None
        self.col_var = _local(state["col_var"]) if self.factored else None
        self.variance = None if self.factored else _local(state["variance"])
        self.copies = 0  # ranks holding the same shard, for DTensors; 0 for a plain (whole) tensor
        self.rows_sharded = False
        if isinstance(param, DTensor):
            mesh, shards, dims = param.device_mesh, 1, set()
            for mesh_dim, placement in enumerate(param.placements):
                if placement.is_shard():
                    shards *= mesh.size(mesh_dim)
                    dims.add(placement.dim % param.dim())
                elif not placement.is_replicate():
                    raise ValueError(f"ShardedAdafactor: unsupported placement {placement} of a parameter")
            if mesh.size() != dist.get_world_size():
                raise ValueError("ShardedAdafactor needs parameter meshes that span every process")
            if self.factored and param.dim() - 1 in dims:
                raise ValueError("ShardedAdafactor: a parameter sharded along its last dimension is not supported "
                                 "(its row statistic would need a reduction)")
            self.copies = dist.get_world_size() // shards
            self.rows_sharded = self.factored and (param.dim() - 2) in dims


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _like_param(param: torch.Tensor, local: torch.Tensor, reduced_dim: int | None) -> torch.Tensor:
    """``local`` as a DTensor placed like ``param`` (a dimension reduced to size 1 is replicated), or itself for a
    plain parameter."""
    if not isinstance(param, DTensor):
        return local
    placements = [Replicate() if p.is_shard() and p.dim % param.dim() == reduced_dim else p
                  for p in param.placements]
    shape = list(param.shape)
    if reduced_dim is not None:
        shape[reduced_dim] = 1
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, param.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def _all_reduce_cat(parts: list[torch.Tensor], world: int) -> torch.Tensor:
    """Sum over ranks of the concatenation of ``parts`` (float64); one collective, none on one process."""
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    flat = torch.cat([p.reshape(-1).double() for p in parts])
    if world > 1:
        dist.all_reduce(flat)
    return flat


def describe(layout: Any) -> str:
    """'2 processes (dp=1 x ep=2)' or '' for one process: for the run's first console line."""
    if layout.world == 1:
        return ""
    tp = getattr(layout, "tp", 1)
    return f"{layout.world} processes (dp={layout.dp} x ep={layout.ep}{f' x tp={tp}' if tp > 1 else ''})"
