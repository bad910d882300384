"""PNG plots of runs (matplotlib, Agg backend): loss curves of several runs overlaid, per-layer expert load over
time, and the Switch-vs-dense comparison.

    switchformer plot runs/switch runs/switch-dense --out plots/
"""

from __future__ import annotations

import os
from pathlib import Path

from switchformer.metrics import read_metrics


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ModuleNotFoundError("plots need matplotlib: pip install 'switchformer[train]'") from None

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def plot_losses(run_dirs: list[str | os.PathLike], out_png: str | os.PathLike, x: str = "step") -> Path:
    """Training loss (thin) and validation loss (markers) of each run, overlaid, against ``x`` ('step' or
    'train_seconds')."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, rd in enumerate(run_dirs):
        color = f"C{i % 10}"
        label = Path(rd).name
        train = read_metrics(rd, "train")
        evals = read_metrics(rd, "eval")
        if train:
            ax.plot([r[x] for r in train], [r["loss"] for r in train], color=color, alpha=0.35, lw=1)
        if evals:
            xs, ys = [r[x] for r in evals], [r["val_loss"] for r in evals]
            ax.plot(xs, ys, "o-", color=color, ms=3, label=f"{label} val")
    ax.set_xlabel("training seconds" if x == "train_seconds" else "step")
    ax.set_ylabel("loss (nats / token); thin: train, markers: validation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_expert_load(run_dir: str | os.PathLike, out_png: str | os.PathLike) -> Path | None:
    """Heatmaps (one per sparse layer) of the fraction of tokens each expert processed, at each evaluation.

    Returns None when the run has no router statistics (a dense model).
    """
    evals = [r for r in read_metrics(run_dir, "eval") if r.get("tokens_per_expert")]
    if not evals:
        return None
    plt = _plt()
    import numpy as np

    layers = list(evals[-1]["tokens_per_expert"])
    fig, axes = plt.subplots(len(layers), 1, figsize=(7, 1.6 + 1.6 * len(layers)), squeeze=False)
    steps = [r["step"] for r in evals]
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        counts = np.array([r["tokens_per_expert"].get(layer, []) for r in evals], dtype=float)  # [evals, E]
        frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        im = ax.imshow(frac.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                       extent=(0, len(steps), -0.5, frac.shape[1] - 0.5))
        ax.set_title(f"{layer}: fraction of tokens per expert (uniform = {1 / frac.shape[1]:.3f})", fontsize=9)
        ax.set_ylabel("expert")
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).astype(int)
        ax.set_xticks(ticks + 0.5, [str(steps[t]) for t in ticks])
        fig.colorbar(im, ax=ax, fraction=0.03)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Write ``plots/loss.png`` and ``plots/expert_load.png`` into a run directory."""
    out = [plot_losses([run_dir], Path(run_dir) / "plots" / "loss.png")]
    load = plot_expert_load(run_dir, Path(run_dir) / "plots" / "expert_load.png")
    if load is not None:
        out.append(load)
    return out


def plot_runs(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Overlaid loss curves (by step and by wall time) of ``run_dirs``, plus each run's expert-load heatmap."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    out_dir = Path(out_dir)
    out = [plot_losses(run_dirs, out_dir / "loss_by_step.png"),
           plot_losses(run_dirs, out_dir / "loss_by_time.png", x="train_seconds")]
    for rd in run_dirs:
        p = plot_expert_load(rd, out_dir / f"expert_load_{Path(rd).name}.png")
        if p is not None:
            out.append(p)
    return out


def plot_language_speedups(by_language: dict[str, dict], out_png: str | os.PathLike) -> Path:
    """Bar chart of the per-language step speedup of Switch over dense (``compare``'s ``by_language``; paper
    Figs. 7-8). A language where Switch never reached dense's final loss gets an empty bar marked 'not reached'."""
    plt = _plt()
    langs = list(by_language)
    values = [by_language[lg]["step_speedup"] or 0.0 for lg in langs]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(langs) + 2), 4))
    bars = ax.bar(langs, values, color=["C0" if by_language[lg]["step_speedup"] else "C3" for lg in langs])
    for bar, lg in zip(bars, langs, strict=True):
        v = by_language[lg]["step_speedup"]
        ax.annotate(f"{v:.2f}x" if v else "not reached", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_ylabel("step speedup of Switch over dense\n(dense steps / Switch steps to dense's final loss)")
    ax.set_xlabel("language")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
