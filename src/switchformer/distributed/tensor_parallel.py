"""Tensor (model) parallelism of attention and dense FFNs over a "tp" mesh dimension (paper §5.2, §5.5).

The ranks of one "tp" group see the same tokens. Each holds a slice of every attention's heads and of every dense
FFN's hidden units (Megatron's column/row split, through ``torch.distributed.tensor.parallel``):

- attention: ``q``, ``k``, ``v`` column-parallel (rank r computes heads [r*H/tp, (r+1)*H/tp)), ``o`` row-parallel
  (its partial outputs are summed with one all-reduce); the relative position bias table is split over heads the
  same way, so every rank's bias matches its heads and each head's bias gets its gradient on the rank that owns it;
- dense FFN: ``wi`` (``wi_0``, ``wi_1``) column-parallel, ``wo`` row-parallel.

Routers, layer norms, embeddings and Switch layers stay whole on every "tp" rank: the router is replicated, as the
paper keeps routing decisions identical across the model-parallel cores, and experts are split over "ep" instead.
Activations between blocks are replicated, so autograd's all-reduce of the column-parallel inputs' gradients keeps
every replicated weight's gradient identical across the group.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from switchformer.errors import ConfigError
from switchformer.models.blocks import Attention, DenseFFN


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> int:
    """Split every (non-Switch) attention and dense FFN of ``model`` over the 1-D ``tp_mesh``; returns the number
    of modules split. Attention modules are told their local head count, so their reshapes see local heads."""
    tp = tp_mesh.size()
    split = 0
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            if module.switch:
                raise ConfigError(f"{name}: Switch attention (model.switch_attention) cannot be tensor-parallel; "
                                  "use parallel.tp=1 or dense attention")
            if module.num_heads % tp:
                raise ConfigError(f"{name} has {module.num_heads} heads, which do not split over tp={tp}; choose a "
                                  f"tp dividing num_heads")
            plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "o": RowwiseParallel()}
            if hasattr(module, "relative_attention_bias"):
                # [buckets, H] table split over heads: compute_bias returns this rank's [1, H/tp, T, S] directly
                plan["relative_attention_bias"] = ColwiseParallel(output_layouts=Shard(-1))
            parallelize_module(module, tp_mesh, plan)
            module.num_heads //= tp
            module.inner //= tp
            split += 1
        elif isinstance(module, DenseFFN):
            d_ff = (module.wi_0 if module.gated else module.wi).out_features
            if d_ff % tp:
                raise ConfigError(f"{name} has d_ff={d_ff}, which does not split over tp={tp}; choose a tp dividing "
                                  "d_ff")
            inputs = ("wi_0", "wi_1") if module.gated else ("wi",)
            parallelize_module(module, tp_mesh, {**{n: ColwiseParallel() for n in inputs}, "wo": RowwiseParallel()})
            split += 1
    return split
