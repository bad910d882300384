"""Expert and data parallelism, applied from outside the model (paper §5.4-5.6).

    from torch.distributed.device_mesh import init_device_mesh
    from switchformer.distributed import parallelize
    mesh = init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))   # "cuda" on GPUs
    model = parallelize(model, mesh)      # any module holding SwitchFFN layers, a bare SwitchFFN included

Every one of the dp * ep ranks sees its own tokens (expert parallelism is carved out of data parallelism, as in the
paper's §5.6 layouts and torchtitan's "dp2ep"):

- **Experts** of each ``SwitchFFN`` become DTensors of their global shape ``[E, ...]`` placed ``Shard(0)`` over
  "ep" (rank j holds experts [j*E/ep, (j+1)*E/ep)) and ``Replicate()`` over "dp"; the layer's dispatcher becomes an
  ``AllToAllDispatcher`` over the "ep" group. Checkpoints are then keyed by global expert index (``checkpoint``).
- **Everything else** (attention, dense FFNs, embeddings, routers) is data-parallel over all dp * ep ranks:
  FSDP2 (``fully_shard``) by default, or DDP (``dense="ddp"``, returns a ``DistributedDataParallel`` wrapper).
  Expert parameters are excluded from both: DDP would broadcast rank 0's experts everywhere and average different
  experts.

Gradients after ``backward``: dense ones are averaged over all ranks by FSDP/DDP; an expert's gradient already sums
the contributions of the whole expert-parallel group (autograd through the all-to-all). ``reduce_expert_gradients``
sums it over the dp replicas that hold the same experts and divides by the number of data shards (dp * ep), so
every gradient is that of the mean of the ranks' losses. ``clip_grad_norm_`` combines the norms of both meshes.

``moe/`` and ``models/`` never import torch.distributed: this module reaches them only through the
``Dispatcher`` seam and the experts' DTensor weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from switchformer.distributed.checks import check_same_config
from switchformer.distributed.dispatch import AllToAllDispatcher
from switchformer.errors import ConfigError
from switchformer.moe.layer import SwitchFFN

EXPERT_WEIGHTS = ("w_in", "w_gate", "w_out")
PARALLEL_ATTR = "_switchformer_parallel"


@dataclass
class ParallelState:
    """How ``parallelize`` laid a model out; kept on the model as ``model._switchformer_parallel``."""

    mesh: DeviceMesh
    dp: int
    ep: int
    dense: str
    expert_params: list[nn.Parameter] = field(default_factory=list)
    """The DTensor expert weights (empty when ep == 1: experts are then ordinary dense parameters)."""
    expert_names: list[str] = field(default_factory=list)
    tp: int = 1
    """Tensor-parallel size: ranks that share tokens and split attention heads and dense FFN units."""

    @property
    def data_shards(self) -> int:
        """Ranks that see different tokens: dp * ep."""
        return self.dp * self.ep

    def dim_group(self, name: str) -> dist.ProcessGroup | None:
        if name not in (self.mesh.mesh_dim_names or ()):
            return None
        return self.mesh.get_group(name)


def mesh_sizes(mesh: DeviceMesh) -> tuple[int, int]:
    """``(dp, ep)`` of a mesh named ("dp", "ep"), ("dp", "ep", "tp"), or 1-D "dp" / "ep"."""
    dp, ep, _ = mesh_layout(mesh)
    return dp, ep


def mesh_layout(mesh: DeviceMesh) -> tuple[int, int, int]:
    """``(dp, ep, tp)`` of a mesh named ("dp", "ep"), ("dp", "ep", "tp"), or 1-D "dp" / "ep"."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch DeviceMesh (init_device_mesh(...)), got {type(mesh).__name__}")
    names = tuple(mesh.mesh_dim_names or ())
    allowed = {("dp", "ep"), ("dp", "ep", "tp"), ("dp",), ("ep",)}
    if names not in allowed:
        raise ConfigError(
            f"the mesh's dimension names are {names or 'unset'}; use init_device_mesh(device, (dp, ep), "
            "mesh_dim_names=('dp', 'ep')), (dp, ep, tp) with ('dp', 'ep', 'tp'), or a 1-D mesh named 'dp' or 'ep'"
        )
    sizes = dict(zip(names, mesh.mesh.shape, strict=True))
    if mesh.mesh.numel() != dist.get_world_size():
        raise ConfigError(
            f"the mesh spans {mesh.mesh.numel()} ranks but the job has {dist.get_world_size()}: the product of its "
            "sizes must equal the number of processes"
        )
    return sizes.get("dp", 1), sizes.get("ep", 1), sizes.get("tp", 1)


def switch_layers(model: nn.Module) -> list[tuple[str, SwitchFFN]]:
    """Every ``SwitchFFN`` in ``model`` (the model itself included) with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SwitchFFN)]


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    dense: Literal["fsdp", "ddp", "none"] = "fsdp",
    check_configs: bool = True,
) -> nn.Module:
    """Shard the experts over "ep", swap in the all-to-all dispatcher, and make the rest data-parallel.

    Args:
        model: a module holding ``SwitchFFN`` layers (a switchformer model, your own model, or a bare layer),
            identical on every rank (same config; weights are taken from rank 0). Expert weights that are already
            DTensors on ``mesh`` placed ``Shard(0)`` over "ep" (and ``Replicate()`` elsewhere) are kept as they are:
            each rank loaded its own shard (``switchformer.distributed.from_pretrained_sharded``).
        mesh: a 2-D DeviceMesh named ("dp", "ep"), or 1-D "dp" / "ep"; dp * ep = the number of processes. A 3-D
            mesh ("dp", "ep", "tp") adds tensor parallelism of attention and dense FFNs over "tp"
            (``tensor_parallel``; with dense="fsdp" or "none").
        dense: data parallelism for the non-expert parameters: "fsdp" (FSDP2 ``fully_shard``; on gloo it needs
            torch >= 2.8), "ddp" (composable DDP), or "none" (left alone: the caller reduces them).
        check_configs: compare every layer's routing config and the layout across ranks first (one all-gather),
            failing with the differing field instead of hanging or computing garbage later.

    Returns:
        The same module, parallelized in place (its type changes under FSDP2, its attributes do not); with
        ``dense="ddp"`` a ``DistributedDataParallel`` wrapper around it (the model is its ``.module``).
    """
    if dense not in ("fsdp", "ddp", "none"):
        raise ConfigError(f"dense = {dense!r}; use 'fsdp', 'ddp' or 'none'")
    if not dist.is_initialized():
        raise RuntimeError("parallelize needs a process group: run under torchrun (or `switchformer train --nproc "
                           "N`) and create the mesh with init_device_mesh first")
    if hasattr(model, PARALLEL_ATTR):
        raise RuntimeError("this model is already parallelized; build a fresh model for another layout")
    dp, ep, tp = mesh_layout(mesh)
    if tp > 1 and dense == "ddp":
        raise ConfigError("tensor parallelism (tp > 1) combines with dense='fsdp' or 'none', not 'ddp'")
    layers = switch_layers(model)
    if ep > 1 and not layers:
        raise ConfigError(f"parallel.ep = {ep} but the model has no SwitchFFN layer to shard; use ep=1 (data "
                          "parallelism only) for a dense model")
    for name, layer in layers:
        if layer.num_experts % ep:
            raise ConfigError(
                f"{name or 'the layer'} has {layer.num_experts} experts, which do not split evenly over ep={ep} "
                f"ranks; choose an ep that divides {layer.num_experts}"
            )
    if check_configs:
        payload = {"layout": {"dp": dp, "ep": ep, "tp": tp, "dense": dense, "torch": torch.__version__}}
        for name, layer in layers:
            payload[name or "layer"] = {
                **dataclasses.asdict(layer.config), "d_model": layer.d_model,
                "d_ff": int(layer.experts.w_in.shape[1]), "activation": layer.experts.activation,
                "dtype": str(layer.experts.w_in.dtype),
            }
        check_same_config(payload, what="the model")

    state = ParallelState(mesh, dp, ep, dense, tp=tp)
    if tp > 1:
        from switchformer.distributed.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, mesh["tp"])
    if ep > 1:
        ep_group = mesh.get_group("ep")
        # experts split over "ep", whole on every "dp" (and "tp") rank
        placements = [Shard(0) if dim == "ep" else Replicate() for dim in mesh.mesh_dim_names]
        for name, layer in layers:
            for weight in EXPERT_WEIGHTS:
                param = getattr(layer.experts, weight)
                if param is None:
                    continue
                if isinstance(param, DTensor):  # loaded already sharded (from_pretrained_sharded): kept as it is
                    _check_expert_shard(param, mesh, placements, f"{name}.experts.{weight}" if name else weight)
                    shared = param if isinstance(param, nn.Parameter) else nn.Parameter(param)
                else:
                    shared = nn.Parameter(distribute_tensor(param.detach(), mesh, placements),
                                          requires_grad=param.requires_grad)
                setattr(layer.experts, weight, shared)
                state.expert_params.append(shared)
                state.expert_names.append(f"{name}.experts.{weight}" if name else f"experts.{weight}")
            layer.dispatcher = AllToAllDispatcher(ep_group)

    if dp * ep > 1 and dense != "none":
        flat = _flat_mesh(mesh)
        ignored = set(state.expert_params)
        if dense == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # One FSDP2 unit for the whole model: the dense weights are gathered for the forward and their
            # gradients reduce-scattered after backward. (Per-block units need modules whose own forward runs the
            # block; the models call a block's sublayers one by one and share block 0's position bias.)
            fully_shard(model, mesh=flat, ignored_params=ignored or None)
        else:
            from torch.nn.parallel import DistributedDataParallel

            # DDP must never own experts: its first broadcast would copy rank 0's experts to every rank and its
            # all-reduce would average different experts. They are reduced by reduce_expert_gradients instead.
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, state.expert_names)
            setattr(model, PARALLEL_ATTR, state)
            model = DistributedDataParallel(model, process_group=flat.get_group())
    setattr(model, PARALLEL_ATTR, state)
    return model


def _check_expert_shard(param: DTensor, mesh: DeviceMesh, placements: list, name: str) -> None:
    """An expert weight that arrives as a DTensor must already have the layout ``parallelize`` would give it."""
    if param.device_mesh != mesh or tuple(param.placements) != tuple(placements):
        raise ConfigError(
            f"{name} is already a DTensor with placements {tuple(param.placements)} on mesh "
            f"{param.device_mesh.mesh_dim_names}, but expert parallelism needs {tuple(placements)} on "
            f"{mesh.mesh_dim_names}; pass the expert weights as plain tensors, or shard them with these placements "
            "on the mesh given to parallelize"
        )


def parallel_state(model: nn.Module) -> ParallelState | None:
    """The layout ``parallelize`` applied to ``model`` (or to the model inside a DDP wrapper), or None for a model
    on one process."""
    return getattr(unwrap(model), PARALLEL_ATTR, None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (the model itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _flat_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The dp * ep ranks that see different tokens, in one dimension: the dense parameters' data-parallel mesh."""
    if len(mesh.mesh.shape) == 1:
        return mesh
    return mesh["dp", "ep"]._flatten("dp_ep")


# ------------------------------------------------------------------------------------------------------ gradients
@torch.no_grad()
def reduce_expert_gradients(model: nn.Module) -> None:
    """Make expert gradients those of the mean of all ranks' losses (call once per optimizer step, after the last
    micro-batch's backward, before clipping).

    An expert's gradient on rank (d, j) sums, through the all-to-all, the losses of the ep ranks of row d; summing
    over the dp rows that hold the same experts covers every rank, and dividing by dp * ep turns the sum into the
    mean that FSDP/DDP give the dense gradients. A no-op without expert parallelism.
    """
    state = parallel_state(model)
    if state is None or not state.expert_params:
        return
    dp_group = state.dim_group("dp") if state.dp > 1 else None
    for param in state.expert_params:
        if param.grad is None:
            continue
        local = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        if dp_group is not None:
            dist.all_reduce(local, group=dp_group)
        local.div_(state.data_shards)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over a parallelized model's parameters, whose gradients live on two
    meshes (experts on ("dp", "ep"), dense on all ranks) or are plain replicated tensors (DDP).

    Each rank adds up the squares of the gradient elements it holds, weighted by 1 / (how many ranks hold the same
    elements); one all-reduce gives the global squared norm. Returns the total norm (before clipping) as a float32
    scalar on the parameters' device, equal on every rank.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    world = dist.get_world_size()
    device = params[0].grad.device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        g = p.grad
        if isinstance(g, DTensor):
            shards = 1
            for dim, placement in enumerate(g.placements):
                if placement.is_partial():  # not reduced yet: its local values are not the gradient's
                    raise RuntimeError(f"a gradient is still a partial sum ({g.placements}); reduce it first")
                if not placement.is_replicate():  # Shard, and FSDP2's _StridedShard (is_shard() is False for it)
                    shards *= g.device_mesh.size(dim)
            copies = world // shards
            local = g.to_local()
        else:
            copies, local = world, g
        total += local.detach().double().pow(2).sum() / copies
    dist.all_reduce(total)
    norm = total.sqrt()
    if max_norm != float("inf"):
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(scale.to(g.dtype))
    return norm
