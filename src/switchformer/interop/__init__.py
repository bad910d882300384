"""Checkpoint interop: transformers' SwitchTransformers <-> switchformer (safetensors only, never pickle).

See docs/checkpoints.md. ``from_pretrained("google/switch-base-8")`` or a local directory; ``save_pretrained``.
"""

from switchformer.interop.hf import (
    CheckpointError,
    config_from_hf,
    config_to_hf,
    from_pretrained,
    from_transformers,
    hf_param_shapes,
    save_pretrained,
    state_dict_from_hf,
    state_dict_to_hf,
)

__all__ = [
    "CheckpointError",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "from_transformers",
    "hf_param_shapes",
    "save_pretrained",
    "state_dict_from_hf",
    "state_dict_to_hf",
]
