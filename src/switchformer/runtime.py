"""Process-level allocator setting that makes CPU training of Switch layers fast.

glibc hands every allocation over 32 MB to fresh ``mmap`` pages and returns them to the kernel on free, so a
training step page-faults and zero-fills its largest tensors again each time. The largest of a Switch layer are
its stacked expert gradients (``[E, d_ff, d_model]``: 0.5 GB each at E=128, d_model 512, d_ff 2048), and the
faults cost more than the expert matmuls' skinny-shape penalty. ``reuse_freed_memory()`` asks glibc to keep freed
memory for reuse instead.

Applied automatically: the first ``SwitchFFN`` built with its parameters on the CPU calls
``tune_malloc_once()``. To keep glibc's defaults (e.g. a long-lived process that must hand memory back to the
system after a burst), set ``SWITCHFORMER_MALLOC_TUNING=0`` in the environment or call
``disable_malloc_tuning()`` before the first layer is built. The setting cannot be undone once applied; the cost
is that the process's resident memory does not shrink after a peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV_VAR = "SWITCHFORMER_MALLOC_TUNING"
"""Environment variable: ``0`` (or ``false``/``off``/``no``) keeps glibc's default allocator settings."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_state = {"disabled": False, "attempted": False, "applied": False}


def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to serve every allocation from its heap and keep freed memory for reuse.

    Equivalent to ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>`` in the environment. Applies whatever
    ``SWITCHFORMER_MALLOC_TUNING`` says (an explicit request). Returns False where the C library is not glibc
    (nothing changed).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok_mmap = mallopt(_M_MMAP_MAX, 0) == 1
    ok_trim = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return ok_mmap and ok_trim


def disable_malloc_tuning() -> None:
    """Keep glibc's default allocator settings: Switch layers built after this call do not apply
    ``reuse_freed_memory()`` (one already applied stays)."""
    _state["disabled"] = True


def malloc_tuning_enabled() -> bool:
    """Whether the automatic setting is allowed: not disabled by ``disable_malloc_tuning()`` nor by
    ``SWITCHFORMER_MALLOC_TUNING=0``."""
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    return not _state["disabled"] and value not in ("0", "false", "off", "no")


def malloc_tuning_applied() -> bool:
    """Whether this process has applied the setting automatically."""
    return _state["applied"]


def tune_malloc_once() -> bool:
    """Apply ``reuse_freed_memory()`` once per process unless disabled; returns whether it is in effect.

    Called by ``SwitchFFN`` when it is built on the CPU; later calls cost a dictionary lookup.
    """
    if not _state["attempted"] and malloc_tuning_enabled():
        _state["attempted"] = True
        _state["applied"] = reuse_freed_memory()
    return _state["applied"]
