"""Start-up checks that turn a would-be hang or silent garbage into a clear error.

Ranks whose configs differ (a different E, capacity factor or dtype) would run different collectives, or the same
all-to-all with different splits, which on gloo and NCCL alike gives wrong rows with no error. One all-gather of
each rank's settings before the first step names the first differing field instead.
"""

from __future__ import annotations

import hashlib
import json

import torch.distributed as dist

from switchformer.errors import ConfigError


def _flatten(d, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = d
    return out


def config_hash(payload: dict) -> str:
    """A short stable hash of a JSON-able settings dict."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_config(payload: dict, *, what: str = "the config", group: dist.ProcessGroup | None = None) -> str:
    """Fail unless every rank passes an equal ``payload`` (a nested dict of settings); return its hash.

    Raises:
        ConfigError: naming the first differing field and its value on each rank.
    """
    mine = config_hash(payload)
    hashes: list[str] = [""] * dist.get_world_size(group)
    dist.all_gather_object(hashes, mine, group=group)
    if len(set(hashes)) == 1:
        return mine
    every: list[dict] = [{}] * dist.get_world_size(group)
    dist.all_gather_object(every, _flatten(payload), group=group)
    keys = sorted(set().union(*every), key=lambda k: (k not in every[0], k))
    for key in keys:
        values = [rank_payload.get(key, "<missing>") for rank_payload in every]
        if any(v != values[0] for v in values):
            shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise ConfigError(f"ranks disagree on {what}: {key} differs ({shown}); start every rank with the same "
                              "config and overrides")
    raise ConfigError(f"ranks disagree on {what} (hashes {hashes}); start every rank with the same config")
