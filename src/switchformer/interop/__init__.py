"""Checkpoint interop: transformers' SwitchTransformers <-> switchformer (safetensors; pickles as tensors only).

One concern per module (docs/checkpoints.md):

- :mod:`~switchformer.interop.hf_config`: transformers config.json <-> :class:`~switchformer.config.ModelConfig`.
- :mod:`~switchformer.interop.state_dict`: the checkpoint mapping, state dict in, state dict out, no files.
- :mod:`~switchformer.interop.files`: safetensors I/O (atomic writes, shards), shared with training checkpoints.
- :mod:`~switchformer.interop.hub`: which weight files a directory or Hub id resolves to (``resolve_weights``:
  safetensors, else the Hub's conversion PR, else ``pytorch_model.bin`` through ``torch.load(weights_only=True)``).
- :mod:`~switchformer.interop.pretrained`: ``from_pretrained`` / ``save_pretrained`` / ``from_transformers``, the
  only part that builds models (also ``switchformer.from_pretrained`` / ``switchformer.save_pretrained``).
"""

from switchformer.errors import CheckpointError
from switchformer.interop.files import FORMAT_VERSION, INDEX_NAME, WEIGHTS_NAME
from switchformer.interop.hf_config import (
    MARKER,
    config_from_hf,
    config_to_hf,
    hf_unsupported,
    sparse_step_from_blocks,
)
from switchformer.interop.hub import ResolvedWeights, open_weights, resolve_weights
from switchformer.interop.pretrained import from_pretrained, from_transformers, save_pretrained
from switchformer.interop.state_dict import (
    TIED_ALIASES,
    hf_param_shapes,
    infer_sparse_steps,
    state_dict_from_hf,
    state_dict_to_hf,
)

__all__ = [
    "FORMAT_VERSION",
    "INDEX_NAME",
    "MARKER",
    "ResolvedWeights",
    "TIED_ALIASES",
    "WEIGHTS_NAME",
    "CheckpointError",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "from_transformers",
    "hf_param_shapes",
    "hf_unsupported",
    "infer_sparse_steps",
    "open_weights",
    "resolve_weights",
    "save_pretrained",
    "sparse_step_from_blocks",
    "state_dict_from_hf",
    "state_dict_to_hf",
]
