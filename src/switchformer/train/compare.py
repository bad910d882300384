"""Switch vs the FLOP-matched dense model on the same data and budget (paper.md §2.5, Fig. 5 / Table 1 style).

The dense baseline is the same config with ``encoder_sparse_step = decoder_sparse_step = 0``: every FFN is one
dense FFN of width d_ff, so with top-1 routing both models spend the same FLOPs per token (the router adds
d_model * num_experts per token). Both train for the same steps on the same batches (same data seed), with the
same optimizer and schedule. The report says how many times fewer steps, and how much less training wall time
(evaluation excluded), the Switch model needs to reach the dense model's final validation loss; crossings are
linearly interpolated between evaluation points.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable
from pathlib import Path

from switchformer.config import RunConfig
from switchformer.metrics import read_metrics


def dense_counterpart(cfg: RunConfig) -> RunConfig:
    """The FLOP-matched dense config: the same model with every block dense."""
    model = dataclasses.replace(cfg.model, encoder_sparse_step=0, decoder_sparse_step=0, switch_attention=False)
    return dataclasses.replace(cfg, model=model, name=f"{cfg.name}-dense")


def crossing(evals: list[dict], target: float, x: str = "step") -> float | None:
    """First ``x`` at which the validation loss reaches ``target`` (linear interpolation between evaluations).

    Args:
        evals: eval records in step order (``val_loss`` and ``x`` keys).
        target: loss to reach.
        x: 'step' or 'train_seconds'.

    Returns:
        The interpolated ``x``, or None if the loss never reaches ``target``.
    """
    prev = None
    for r in evals:
        if r["val_loss"] <= target:
            if prev is None or prev["val_loss"] == r["val_loss"]:
                return float(r[x])
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - r["val_loss"])
            return float(prev[x] + frac * (r[x] - prev[x]))
        prev = r
    return None


def median_tokens_per_s(run_dir: str | Path) -> float:
    """Median training throughput of a run (the first log window, with warm-up, is left out when possible)."""
    vals = [r["tokens_per_s"] for r in read_metrics(run_dir, "train")]
    if len(vals) > 2:
        vals = vals[1:]
    return statistics.median(vals) if vals else float("nan")


def summarize(switch_dir: str | Path, dense_dir: str | Path) -> dict:
    """The comparison numbers of two finished runs (see the module docstring)."""
    sw, de = read_metrics(switch_dir, "eval"), read_metrics(dense_dir, "eval")
    if not sw or not de:
        raise ValueError(f"both runs need eval records: {switch_dir} has {len(sw)}, {dense_dir} has {len(de)}")
    target = de[-1]["val_loss"]
    sw_steps, sw_time = crossing(sw, target, "step"), crossing(sw, target, "train_seconds")
    de_steps, de_time = float(de[-1]["step"]), float(de[-1]["train_seconds"])
    sw_tps, de_tps = median_tokens_per_s(switch_dir), median_tokens_per_s(dense_dir)
    return {
        "switch_run": str(switch_dir),
        "dense_run": str(dense_dir),
        "dense_final_val_loss": target,
        "switch_final_val_loss": sw[-1]["val_loss"],
        "dense_steps": de_steps,
        "dense_train_seconds": de_time,
        "switch_steps_to_dense_loss": sw_steps,
        "switch_seconds_to_dense_loss": sw_time,
        "step_ratio": sw_steps / de_steps if sw_steps is not None else None,
        "time_ratio": sw_time / de_time if sw_time is not None else None,
        "step_speedup": de_steps / sw_steps if sw_steps else None,
        "time_speedup": de_time / sw_time if sw_time else None,
        "switch_tokens_per_s": sw_tps,
        "dense_tokens_per_s": de_tps,
        "throughput_ratio": sw_tps / de_tps if de_tps else None,
    }


def format_summary(s: dict) -> str:
    """Human-readable lines for a ``summarize`` result."""
    lines = [f"dense final val loss {s['dense_final_val_loss']:.4f} at step {s['dense_steps']:.0f} "
             f"({s['dense_train_seconds']:.0f}s); Switch final val loss {s['switch_final_val_loss']:.4f}"]
    if s["step_ratio"] is None:
        lines.append("Switch did not reach the dense model's final validation loss within the budget")
    else:
        at = s["switch_steps_to_dense_loss"]
        lines.append(f"Switch reached it at step {at:.0f}: {s['step_speedup']:.2f}x fewer "
                     f"steps (ratio {s['step_ratio']:.2f}) and {s['time_speedup']:.2f}x less wall time "
                     f"(ratio {s['time_ratio']:.2f})")
    sw_tps, de_tps = s["switch_tokens_per_s"], s["dense_tokens_per_s"]
    lines.append(f"throughput: Switch {sw_tps:.0f} tok/s, dense {de_tps:.0f} tok/s "
                 f"(ratio {s['throughput_ratio']:.2f})")
    return "\n".join(lines)


def compare(cfg: RunConfig, *, out_dir: str | Path | None = None, print_fn: Callable[[str], None] = print) -> dict:
    """Train ``cfg`` (Switch) and its dense counterpart, then write ``compare.json`` and plots into ``out_dir``.

    Args:
        cfg: the Switch run config (must have sparse layers).
        out_dir: where both runs and the report go; default ``<cfg.out_dir>/<cfg.name>-compare`` (fresh).
        print_fn: progress output.

    Returns:
        The ``summarize`` dict plus ``out_dir``.
    """
    from switchformer.plot import plot_losses, plot_runs
    from switchformer.train.loop import train

    if not cfg.model.is_sparse:
        raise ValueError("compare needs a Switch config (model.encoder_sparse_step or decoder_sparse_step > 0)")
    if out_dir is None:
        out_dir = Path(cfg.out_dir) / f"{cfg.name}-compare"
        i = 2
        while out_dir.exists():
            out_dir = Path(cfg.out_dir) / f"{cfg.name}-compare-{i}"
            i += 1
    if cfg.train.max_minutes > 0:
        # the budget is the step count: a wall-clock cut-off would give the two models different step counts
        tc = cfg.train
        print_fn(f"compare: ignoring train.max_minutes={tc.max_minutes}; both models train {tc.steps} steps")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_minutes=0.0))
    out_dir = Path(out_dir)
    sw_dir, de_dir = out_dir / cfg.name, out_dir / f"{cfg.name}-dense"
    print_fn(f"== Switch model -> {sw_dir}")
    train(cfg, run_dir=sw_dir, print_fn=print_fn)
    print_fn(f"== FLOP-matched dense model -> {de_dir}")
    train(dense_counterpart(cfg), run_dir=de_dir, print_fn=print_fn)
    s = summarize(sw_dir, de_dir)
    s["out_dir"] = str(out_dir)
    (out_dir / "compare.json").write_text(json.dumps(s, indent=2))
    plot_losses([sw_dir, de_dir], out_dir / "compare_loss_by_step.png")
    plot_losses([sw_dir, de_dir], out_dir / "compare_loss_by_time.png", x="train_seconds")
    plot_runs([sw_dir], out_dir / "plots")
    print_fn(format_summary(s))
    print_fn(f"report: {out_dir / 'compare.json'}")
    return s
