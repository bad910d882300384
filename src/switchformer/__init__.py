"""switchformer: Switch Transformers (Fedus, Zoph & Shazeer, JMLR 2022) in PyTorch.

    import switchformer
    model = switchformer.build_model(switchformer.ModelConfig())
    model = switchformer.from_pretrained("google/switch-base-8")   # or a local transformers checkpoint directory
    model = switchformer.from_pretrained(path, mesh=mesh)           # across processes: each reads its own experts
    switchformer.save_pretrained(model, "out/")                     # transformers loads it (encoder-decoder)

The Switch layer alone is :class:`switchformer.moe.SwitchFFN`. Importing ``switchformer`` loads the models but not the
checkpoint code (:mod:`switchformer.interop`), which the two functions below import when first called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from switchformer.config import ModelConfig
from switchformer.models.build import build_model

__version__ = "0.1.0"
__all__ = ["ModelConfig", "build_model", "from_pretrained", "save_pretrained", "__version__"]


def from_pretrained(path_or_id: str | os.PathLike, *, mesh=None, **kwargs: Any):
    """Load a model from a checkpoint directory or a Hugging Face Hub id (transformers SwitchTransformers or T5, or
    switchformer's native format); in eval mode. Keyword arguments: see :func:`switchformer.interop.from_pretrained`.

    With ``mesh`` (a torch ``DeviceMesh``; call on every rank), each rank reads only its own experts and the
    parallelized model is returned: see :func:`switchformer.distributed.from_pretrained_sharded` for its keywords.
    """
    if mesh is not None:
        unsupported = sorted({"device", "strict"} & kwargs.keys())
        if unsupported:
            raise TypeError(f"from_pretrained(mesh=...) does not take {unsupported}: the weights go to the mesh's "
                            "device and every key must match (strict); drop them")
        from switchformer.distributed.pretrained import from_pretrained_sharded

        return from_pretrained_sharded(path_or_id, mesh, **kwargs)
    from switchformer.interop.pretrained import from_pretrained as _from_pretrained

    return _from_pretrained(path_or_id, **kwargs)


def save_pretrained(model, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Save ``model`` as config.json + safetensors: transformers' layout when transformers has the architecture,
    else switchformer's native one. Keyword arguments: see :func:`switchformer.interop.save_pretrained`."""
    from switchformer.interop.pretrained import save_pretrained as _save_pretrained

    return _save_pretrained(model, path, **kwargs)
