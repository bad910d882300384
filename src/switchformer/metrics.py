"""Run metrics: router statistics (per-layer expert load, dropped fraction, router entropy), token counts, and the
JSONL (+ optional TensorBoard) logger.

Router entropy has one definition, used by training logs and evaluation alike: the mean, over the rows of real
routed tokens (padding excluded), of the entropy of the router distribution ``-sum_i p_i log p_i`` in nats, over
every Switch FFN layer; a uniform router gives log(E), a one-hot one 0. ``RouterEntropyProbe`` measures it with
forward hooks, which see each layer's padding mask (the layers' router results mark padding and dropped tokens
alike with expert -1). A model without Switch FFN layers falls back to the entropy of the *load* distribution
``tokens_per_expert / sum`` ("load entropy", also logged separately), which measures balance, not confidence.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch


def _get(r: Any, name: str):
    """Attribute ``name`` of a router result, looking inside a nested ``aux`` (MoEAux) when present."""
    v = getattr(r, name, None)
    if v is None and getattr(r, "aux", None) is not None:
        v = getattr(r.aux, name, None)
    return v


def router_entropy_sum(probs: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[float, int]:
    """(sum of the router-distribution entropies in nats, number of rows) over the real tokens.

    Args:
        probs: ``[..., E]`` router probabilities, one row per routed position.
        padding_mask: True for real tokens, one entry per row (any shape with that many elements); None: all real.
    """
    p = probs.detach().float().reshape(-1, probs.shape[-1])
    if padding_mask is not None and padding_mask.numel() == p.shape[0]:
        p = p[padding_mask.reshape(-1).bool()]
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    return float(ent.sum()), int(ent.numel())


class RouterStats:
    """Accumulates router results of several forward passes, per layer (keyed by ``MoEAux.name``)."""

    def __init__(self) -> None:
        self.tokens_per_expert: dict[str, torch.Tensor] = {}
        self.dropped = 0
        self.routed = 0
        self.entropy_sum = 0.0
        self.entropy_count = 0
        self.lb_sum = 0.0
        self.z_sum = 0.0
        self.num_results = 0

    def add(self, router: list | None, entropy: tuple[float, int] | None = None) -> None:
        """Add the ``out.router`` list of one forward pass and its router entropy ``(sum, rows)`` over real tokens
        (``RouterEntropyProbe.sums()`` of the same pass)."""
        for i, r in enumerate(router or []):
            name = getattr(r, "name", None) or f"layer{i}"
            tpe = _get(r, "tokens_per_expert").detach().to("cpu", torch.int64)
            self.tokens_per_expert[name] = self.tokens_per_expert.get(name, torch.zeros_like(tpe)) + tpe
            self.dropped += int(_get(r, "dropped_tokens"))
            n = _get(r, "num_tokens")
            self.routed += int(n) if n is not None else int(tpe.sum()) + int(_get(r, "dropped_tokens"))
            self.lb_sum += float(_get(r, "load_balancing_loss").detach())
            z = _get(r, "router_z_loss")
            self.z_sum += float(z.detach()) if z is not None else 0.0
            self.num_results += 1
        if entropy is not None:
            self.entropy_sum += entropy[0]
            self.entropy_count += entropy[1]

    def summary(self) -> dict:
        """Aggregate statistics: drop fraction, router/load entropy (nats), per-layer load fractions."""
        out: dict[str, Any] = {}
        if not self.tokens_per_expert:
            return out
        out["drop_fraction"] = self.dropped / max(self.routed, 1)
        out["load_balancing_loss"] = self.lb_sum / max(self.num_results, 1)
        out["router_z_loss"] = self.z_sum / max(self.num_results, 1)
        load_entropies = []
        per_layer = {}
        for name, tpe in self.tokens_per_expert.items():
            total = int(tpe.sum())
            frac = (tpe.double() / max(total, 1)).tolist()
            per_layer[name] = tpe.tolist()
            load_entropies.append(-sum(f * math.log(f) for f in frac if f > 0))
        out["load_entropy"] = sum(load_entropies) / len(load_entropies)
        out["router_entropy"] = (
            self.entropy_sum / self.entropy_count if self.entropy_count else out["load_entropy"]
        )
        out["tokens_per_expert"] = per_layer
        return out


class RouterEntropyProbe:
    """Context manager: forward hooks on every ``SwitchFFN`` that sum the router-distribution entropy of the real
    tokens (``MoEAux.router_probs`` rows where the layer's padding mask is True).

        with RouterEntropyProbe(model) as probe:
            out = model(**batch)
        stats.add(out.router, probe.sums())
        probe.mean()   # nats; log(E) for a uniform router, 0 for a one-hot one
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.total = 0.0
        self.count = 0
        self._handles: list = []

    def _hook(self, module, args, kwargs, output) -> None:
        if not (isinstance(output, tuple) and len(output) == 2):
            return
        probs = getattr(output[1], "router_probs", None)
        if probs is None or not probs.numel():
            return
        total, count = router_entropy_sum(probs, kwargs.get("padding_mask", args[1] if len(args) > 1 else None))
        self.total += total
        self.count += count

    def __enter__(self) -> RouterEntropyProbe:
        from switchformer.moe import SwitchFFN

        for m in self.model.modules():
            if isinstance(m, SwitchFFN):
                self._handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def sums(self) -> tuple[float, int]:
        """(entropy sum in nats, real-token rows) seen so far."""
        return self.total, self.count

    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens processed by one batch: encoder plus decoder tokens."""
    n = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
    if "decoder_attention_mask" in batch:
        n += int(batch["decoder_attention_mask"].sum())
    elif "decoder_input_ids" in batch:
        n += int(batch["decoder_input_ids"].numel())
    return n


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl`` (and scalars to TensorBoard when installed)."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                self._tb = None

    def log(self, record: dict) -> None:
        """Write ``record`` (must hold 'step' and 'kind'); flushed at once so a killed run keeps its lines."""
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """Records of ``run_dir/metrics.jsonl`` (optionally only those of one ``kind``: 'train', 'eval', ...)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory?")
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
    return out


def truncate_metrics(run_dir: str | os.PathLike, after_step: int) -> None:
    """Drop records with step > ``after_step`` (written after the checkpoint a resumed run restarts from)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= after_step and r.get("kind") != "end"]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)
