"""Expert and data parallelism on torch.distributed (paper §5): ``parallelize(model, mesh)`` shards each SwitchFFN's
experts over the "ep" mesh dimension behind an all-to-all dispatcher and makes everything else data-parallel
(FSDP2 or DDP). ``save_distributed_checkpoint`` / ``load_distributed_checkpoint`` write and read checkpoints that
reshard across layouts (torch.distributed.checkpoint). ``from_pretrained_sharded(path, mesh)`` loads a released
checkpoint with every rank reading only its own experts. The models themselves never import torch.distributed.
"""

from switchformer.distributed.checkpoint import (
    export_pretrained,
    load_distributed_checkpoint,
    save_distributed_checkpoint,
)
from switchformer.distributed.checks import check_same_config, config_hash
from switchformer.distributed.dispatch import AllToAllDispatcher
from switchformer.distributed.parallelize import (
    ParallelState,
    clip_grad_norm_,
    mesh_sizes,
    parallel_state,
    parallelize,
    reduce_expert_gradients,
    switch_layers,
    unwrap,
)
from switchformer.distributed.pretrained import from_pretrained_sharded

__all__ = [
    "AllToAllDispatcher",
    "ParallelState",
    "check_same_config",
    "clip_grad_norm_",
    "config_hash",
    "export_pretrained",
    "from_pretrained_sharded",
    "load_distributed_checkpoint",
    "mesh_sizes",
    "parallel_state",
    "parallelize",
    "reduce_expert_gradients",
    "save_distributed_checkpoint",
    "switch_layers",
    "unwrap",
]
