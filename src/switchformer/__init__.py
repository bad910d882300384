"""switchformer: Switch Transformers (Fedus, Zoph & Shazeer, JMLR 2022) in PyTorch.

    import switchformer
    model = switchformer.build_model(switchformer.ModelConfig())
    model = switchformer.from_pretrained("path/to/switch-base-8")   # transformers checkpoint directory
"""

from __future__ import annotations

from switchformer.config import ModelConfig
from switchformer.models import build_model

__version__ = "0.1.0"
__all__ = ["ModelConfig", "build_model", "from_pretrained", "__version__"]


def from_pretrained(path_or_id, **kwargs):
    """Load a transformers SwitchTransformers / T5 checkpoint (delegates to ``switchformer.interop.hf``)."""
    from switchformer.interop.hf import from_pretrained as _from_pretrained

    return _from_pretrained(path_or_id, **kwargs)
