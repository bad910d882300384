"""Switch vs the FLOP-matched dense model on the same data and budget (paper §2.5, Table 1; Figure 5).

The dense baseline is the same config with ``encoder_sparse_step = decoder_sparse_step = 0``: every FFN is one
dense FFN of width d_ff, so with top-1 routing both models spend the same FLOPs per token (the router adds
d_model * num_experts per token). Both train for the same steps on the same batches (same data seed), with the
same optimizer and schedule. The report says how many times fewer steps, and how much less training wall time
(evaluation excluded), the Switch model needs to reach the dense model's final validation loss; crossings are
linearly interpolated between evaluation points.

On a multilingual corpus (``data.languages`` or ``data.language_field``; the eval records carry
``val_loss_by_lang``) the report adds, per language, the step speedup to the dense model's final loss *in that
language* (``language_speedups``: the paper's Figs. 7-8, where mSwitch-Base beats mT5-Base on all 101 languages with
a mean 5x step speedup, paper §4.3), and ``compare_language_speedup.png`` draws them as bars.

``wide_dense=K`` (``switchformer compare --wide-dense K``) also trains a dense model whose FFNs are K times wider
(every parameter active, K times the FFN FLOPs). It is a reference point, not a baseline: a Switch layer adds FFN
parameters at constant FLOPs, so where even the wider dense model is no faster to the dense loss, the budget is
one in which extra FFN parameters buy little, and a large Switch gain is unlikely. It is not a strict bound: at
scale the paper's Switch-Base 64e was more sample-efficient than T5-Large, a dense model with 3.5x its FLOPs
(paper Figure 6).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from switchformer.config import RunConfig, apply_overrides
from switchformer.metrics import read_metrics


def dense_counterpart(cfg: RunConfig) -> RunConfig:
    """The FLOP-matched dense config: the same model with every block dense."""
    model = dataclasses.replace(cfg.model, encoder_sparse_step=0, decoder_sparse_step=0, switch_attention=False)
    return dataclasses.replace(cfg, model=model, name=f"{cfg.name}-dense")


def wide_dense_counterpart(cfg: RunConfig, factor: int) -> RunConfig:
    """The dense model with ``factor`` x wider FFNs (``d_ff * factor``): the capacity reference of ``compare``."""
    if not isinstance(factor, int) or factor < 2:
        raise ValueError(f"wide_dense must be an integer >= 2 (the FFN width multiple), got {factor!r}")
    dense = dense_counterpart(cfg)
    model = dataclasses.replace(dense.model, d_ff=cfg.model.d_ff * factor)
    return dataclasses.replace(dense, model=model, name=f"{cfg.name}-dense-x{factor}")


def seed_config(base: RunConfig, seed: int, runs_dir: str | Path, extra: Sequence[str] = ()) -> RunConfig:
    """``base`` for one seed of a multi-seed comparison, named ``seed<N>`` under ``runs_dir``.

    ``data.seed`` follows ``train.seed``: it fixes the validation set's span-corruption noise, so the runs compared
    within a seed must share it (absolute losses move by up to 0.15 nats across data seeds).
    """
    return apply_overrides(base, [f"train.seed={seed}", f"data.seed={seed}", f"name=seed{seed}",
                                  f"out_dir={runs_dir}", *extra])


def mean_over_seeds(values: Sequence[float | None]) -> float | None:
    """Mean of per-seed values; None if any seed has none (a Switch run that never reached the dense loss has no
    step ratio, and averaging only the seeds that did would flatter it)."""
    if not values or any(v is None for v in values):
        return None
    return statistics.mean(values)


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


def language_speedups(switch_evals: list[dict], dense_evals: list[dict]) -> dict[str, dict]:
    """Per language: the steps Switch needs to reach the dense model's final validation loss in that language
    (linearly interpolated, as ``crossing``) and the step speedup, dense steps / Switch steps (paper §4.3, Figs.
    7-8; footnote 9). Empty when the runs have no per-language losses.
    """
    if not switch_evals or not dense_evals or "val_loss_by_lang" not in dense_evals[-1]:
        return {}
    dense_steps = float(dense_evals[-1]["step"])
    out = {}
    for lang, target in dense_evals[-1]["val_loss_by_lang"].items():
        curve = [{"step": r["step"], "val_loss": r["val_loss_by_lang"][lang]} for r in switch_evals
                 if lang in r.get("val_loss_by_lang", {})]
        if not curve:
            continue
        steps = crossing(curve, target, "step")
        out[lang] = {"dense_final_val_loss": target, "switch_final_val_loss": curve[-1]["val_loss"],
                     "switch_steps_to_dense_loss": steps, "step_speedup": dense_steps / steps if steps else None}
    return out


def median_tokens_per_s(run_dir: str | Path) -> float:
    """Median training throughput of a run (the first log window, with warm-up, is left out when possible)."""
    vals = [r["tokens_per_s"] for r in read_metrics(run_dir, "train")]
    if len(vals) > 2:
        vals = vals[1:]
    return statistics.median(vals) if vals else float("nan")


def summarize(switch_dir: str | Path, dense_dir: str | Path, wide_dir: str | Path | None = None) -> dict:
    """The comparison numbers of two finished runs (see the module docstring), plus the wider dense model's when
    ``wide_dir`` is given (``wide_dense_*`` keys: its final loss and steps to the dense model's final loss)."""
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
    } | (_wide_summary(wide_dir, target, de_steps) if wide_dir is not None else {}) | _language_summary(sw, de)


def _language_summary(sw: list[dict], de: list[dict]) -> dict:
    by_lang = language_speedups(sw, de)
    if not by_lang:
        return {}
    speedups = [v["step_speedup"] for v in by_lang.values()]
    return {"by_language": by_lang, "language_step_speedup_mean": mean_over_seeds(speedups),
            "languages_improved": sum(v["switch_final_val_loss"] < v["dense_final_val_loss"]
                                      for v in by_lang.values())}


def _wide_summary(wide_dir: str | Path, target: float, dense_steps: float) -> dict:
    wide = read_metrics(wide_dir, "eval")
    if not wide:
        raise ValueError(f"the wide dense run needs eval records: {wide_dir} has none")
    steps = crossing(wide, target, "step")
    return {
        "wide_dense_run": str(wide_dir),
        "wide_dense_final_val_loss": wide[-1]["val_loss"],
        "wide_dense_steps_to_dense_loss": steps,
        "wide_dense_step_ratio": steps / dense_steps if steps is not None else None,
    }


def _ratio_phrase(ratio: float, amount: str, fewer: str) -> str:
    """Switch's cost relative to dense in words: '1.36x the wall time of dense' when Switch needed more (or the
    same), '1.52x less wall time than dense (ratio 0.66)' when it needed less."""
    if ratio < 1.0:
        return f"{1 / ratio:.2f}x {fewer} than dense (ratio {ratio:.2f})"
    return f"{ratio:.2f}x the {amount} of dense"


def format_summary(s: dict) -> str:
    """Human-readable lines for a ``summarize`` result."""
    lines = [f"dense final val loss {s['dense_final_val_loss']:.4f} at step {s['dense_steps']:.0f} "
             f"({s['dense_train_seconds']:.0f}s); Switch final val loss {s['switch_final_val_loss']:.4f}"]
    if s["step_ratio"] is None:
        lines.append("Switch did not reach the dense model's final validation loss within the budget")
    else:
        at = s["switch_steps_to_dense_loss"]
        steps = _ratio_phrase(s["step_ratio"], "steps", "fewer steps")
        time_ = _ratio_phrase(s["time_ratio"], "wall time", "less wall time")
        lines.append(f"Switch reached it at step {at:.0f}: {steps}, {time_}")
    sw_tps, de_tps = s["switch_tokens_per_s"], s["dense_tokens_per_s"]
    lines.append(f"throughput: Switch {sw_tps:.0f} tok/s, dense {de_tps:.0f} tok/s "
                 f"(ratio {s['throughput_ratio']:.2f})")
    if "by_language" in s:
        lines.append(f"per language (Switch reaches dense's final loss in that language; paper Figs. 7-8): "
                     f"{s['languages_improved']} of {len(s['by_language'])} languages end below dense")
        for lang, v in s["by_language"].items():
            speed = (f"step speedup {v['step_speedup']:.2f}x" if v["step_speedup"] is not None
                     else "did not reach it")
            lines.append(f"  {lang}: dense {v['dense_final_val_loss']:.4f}, Switch {v['switch_final_val_loss']:.4f}; "
                         f"{speed}")
        mean = s["language_step_speedup_mean"]
        if mean is not None:
            lines.append(f"  mean step speedup over languages {mean:.2f}x")
    if "wide_dense_run" in s:
        ratio = s["wide_dense_step_ratio"]
        lines.append(f"capacity reference: the wider dense model ({Path(s['wide_dense_run']).name}) ends at "
                     f"{s['wide_dense_final_val_loss']:.4f}; " + (
                         f"it reached the dense loss in {ratio:.2f}x the steps: extra FFN parameters help at this "
                         "budget" if ratio is not None and ratio < 1.0 else
                         "it was no faster to the dense loss: at this budget extra FFN parameters (all that a Switch "
                         "layer adds) buy little, so a large Switch gain is unlikely"))
    return "\n".join(lines)


def compare(
    cfg: RunConfig, *, out_dir: str | Path | None = None, wide_dense: int = 0,
    print_fn: Callable[[str], None] = print,
) -> dict:
    """Train ``cfg`` (Switch) and its dense counterpart, then write ``compare.json`` and plots into ``out_dir``.

    Args:
        cfg: the Switch run config (must have sparse layers).
        out_dir: where the runs and the report go; default ``<cfg.out_dir>/<cfg.name>-compare`` (fresh).
        wide_dense: if >= 2, also train the dense model with FFNs this many times wider (the capacity reference;
            see the module docstring); 0 skips it.
        print_fn: progress output.

    Returns:
        The ``summarize`` dict plus ``out_dir``.
    """
    from switchformer.plot import plot_language_speedups, plot_losses, plot_runs
    from switchformer.train.loop import train

    if not cfg.model.is_sparse:
        raise ValueError(
            "compare needs a Switch config (model.encoder_sparse_step or decoder_sparse_step > 0, or "
            "model.switch_attention)"
        )
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
    wide_cfg = wide_dense_counterpart(cfg, wide_dense) if wide_dense else None  # validates before any training
    out_dir = Path(out_dir)
    sw_dir, de_dir = out_dir / cfg.name, out_dir / f"{cfg.name}-dense"
    print_fn(f"== Switch model -> {sw_dir}")
    train(cfg, run_dir=sw_dir, print_fn=print_fn)
    print_fn(f"== FLOP-matched dense model -> {de_dir}")
    train(dense_counterpart(cfg), run_dir=de_dir, print_fn=print_fn)
    runs = [sw_dir, de_dir]
    wide_dir = None
    if wide_cfg is not None:
        wide_dir = out_dir / wide_cfg.name
        print_fn(f"== capacity reference: dense model with {wide_dense}x wider FFNs (not FLOP-matched) -> {wide_dir}")
        train(wide_cfg, run_dir=wide_dir, print_fn=print_fn)
        runs.append(wide_dir)
    s = summarize(sw_dir, de_dir, wide_dir)
    s["out_dir"] = str(out_dir)
    (out_dir / "compare.json").write_text(json.dumps(s, indent=2))
    plot_losses(runs, out_dir / "compare_loss_by_step.png")
    plot_losses(runs, out_dir / "compare_loss_by_time.png", x="train_seconds")
    plot_runs([sw_dir], out_dir / "plots")
    if "by_language" in s:
        plot_language_speedups(s["by_language"], out_dir / "compare_language_speedup.png")
    print_fn(format_summary(s))
    print_fn(f"report: {out_dir / 'compare.json'}")
    return s
