"""Multilingual benchmark, a Figs. 7-8 analog (paper §4.3): per-language step speedup of Switch over the
FLOP-matched dense model, over seeds.

``configs/multilingual.toml`` (eight languages of Debian's fortunes, mixed with mT5's temperature 1/0.3) is trained
as Switch and as its dense counterpart with ``switchformer.train.compare`` once per seed (``train.seed`` and
``data.seed`` both follow the seed, so the language mixture, the tokenizer, the initialisation and the data order
change with it; within a seed the two models see the same batches). Per language: the dense model's final
validation loss in that language, Switch's, and the step speedup (dense steps / the steps Switch needs to reach
that loss, linearly interpolated between evaluations: paper footnote 9), as mean, sample standard deviation and
range over seeds. The paper's statements are printed beside: mSwitch-Base improves on mT5-Base in all 101
languages, with a mean step speedup of 5x and at least 4x in 91% of them (1M steps on mC4).

Needs the fortunes packages (``apt-get install fortunes fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-pl
fortunes-cs fortunes-zh``).

    python benchmarks/bench_multilingual.py                      # seeds 0 1 2
    python benchmarks/bench_multilingual.py --seeds 0 1 train.steps=300    # overrides after the options
    python benchmarks/bench_multilingual.py --quick              # 40 steps, one seed: a smoke test

Finished comparisons are reused when the benchmark is started again with the same ``--runs-dir``. Writes
``benchmarks/results/multilingual_cpu_<date>.{md,json}`` and ``_speedup.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from switchformer.config import apply_overrides, load_toml
from switchformer.train.compare import compare, seed_config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PAPER = [
    "mSwitch-Base vs mT5-Base (FLOP-matched), mC4 with 101 languages, 1M steps each (paper §4.3, Figs. 7-8)",
    "every language improves (Switch's final neg. log perplexity above mT5's)",
    "mean step speedup over languages: 5x; 91% of languages reach at least 4x",
    "per-language values appear only as a bar chart; most between 4x and 6x, outliers near 8x, 10-11x and ~15x",
]
QUIET = ["train.progress=false", "train.tensorboard=false", "train.plots=false"]
QUICK = ["train.steps=40", "train.eval_every=20", "train.checkpoint_every=40", "data.max_bytes_per_language=40000",
         "data.vocab_size=1500"]


def _stats(values: list[float | None]) -> dict:
    """Mean, sample standard deviation and range of the seeds' values (None when a seed has none)."""
    vals = [v for v in values if v is not None]
    out = {"per_seed": values, "seeds_with_value": len(vals)}
    if len(vals) == len(values) and vals:
        out.update(mean=statistics.mean(vals), std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                   min=min(vals), max=max(vals))
    return out


def _fmt(st: dict, digits: int = 2) -> str:
    if "mean" not in st:
        shown = ", ".join("-" if v is None else f"{v:.{digits}f}" for v in st["per_seed"])
        return f"not reached in {len(st['per_seed']) - st['seeds_with_value']} seed(s) ({shown})"
    return (f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f} "
            f"[{st['min']:.{digits}f}, {st['max']:.{digits}f}]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "multilingual.toml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench_multilingual"))
    ap.add_argument("--quick", action="store_true", help="40 steps, one seed, small data: a smoke test")
    ap.add_argument("--out", default=None, help="report path stem (default results/multilingual_cpu_<date>)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=300")
    args = ap.parse_args(argv)
    seeds = args.seeds[:1] if args.quick else args.seeds
    base = apply_overrides(load_toml(args.config), [*QUIET, *(QUICK if args.quick else []), *args.overrides])
    runs_dir = Path(args.runs_dir)
    t_start = time.time()
    per_seed = []
    for seed in seeds:
        cfg = seed_config(base, seed, runs_dir)
        out_dir = runs_dir / f"seed{seed}-compare"
        report = out_dir / "compare.json"
        t0 = time.time()
        if report.is_file():
            s = json.loads(report.read_text())
            print(f"seed {seed}: reusing {report}")
        else:
            if out_dir.exists():
                raise SystemExit(f"{out_dir} holds an unfinished comparison; remove it and run again")
            print(f"== seed {seed}: Switch and dense, {cfg.train.steps} steps each -> {out_dir}", flush=True)
            s = compare(cfg, out_dir=out_dir, print_fn=lambda line: None)
        if "by_language" not in s:
            raise SystemExit(f"{report}: no per-language results; is the config multilingual?")
        s["wall_seconds"] = time.time() - t0
        per_seed.append(s)
        langs = s["by_language"]
        print(f"seed {seed}: overall step speedup {s['step_speedup']}, languages improved "
              f"{s['languages_improved']}/{len(langs)} ({s['wall_seconds']:.0f}s)", flush=True)

    langs = sorted(per_seed[0]["by_language"])
    by_lang = {}
    for lang in langs:
        rows = [s["by_language"][lang] for s in per_seed]
        by_lang[lang] = {
            "step_speedup": _stats([r["step_speedup"] for r in rows]),
            "dense_final_val_loss": _stats([r["dense_final_val_loss"] for r in rows]),
            "switch_final_val_loss": _stats([r["switch_final_val_loss"] for r in rows]),
            "loss_gain": _stats([r["dense_final_val_loss"] - r["switch_final_val_loss"] for r in rows]),
        }
    summary = {
        "overall_step_speedup": _stats([s["step_speedup"] for s in per_seed]),
        "mean_language_step_speedup": _stats([s["language_step_speedup_mean"] for s in per_seed]),
        "languages_improved": [s["languages_improved"] for s in per_seed],
        "overall_dense_final_val_loss": _stats([s["dense_final_val_loss"] for s in per_seed]),
        "overall_switch_final_val_loss": _stats([s["switch_final_val_loss"] for s in per_seed]),
        "throughput_ratio": _stats([s["throughput_ratio"] for s in per_seed]),
    }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    date = dt.datetime.now(dt.timezone.utc)
    meta = {"date_utc": date.strftime("%Y-%m-%d %H:%M"), "config": os.path.relpath(args.config, ROOT),
            "overrides": [*(QUICK if args.quick else []), *args.overrides], "seeds": seeds,
            "steps": base.train.steps, "languages": langs, "language_temperature": base.data.language_temperature,
            "max_bytes_per_language": base.data.max_bytes_per_language, "python": platform.python_version(),
            "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average_at_end": load, "wall_seconds": time.time() - t_start}
    result = {"meta": meta, "paper": PAPER, "summary": summary, "by_language": by_lang, "runs": per_seed}

    stem = Path(args.out) if args.out else HERE / "results" / f"multilingual_cpu_{date:%Y-%m-%d}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Multilingual Switch vs dense, per language (paper §4.3, Figs. 7-8 analog): {meta['date_utc']} UTC",
        "",
        f"`python benchmarks/bench_multilingual.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"Recipe `{meta['config']}` ({base.model.moe.num_experts} experts, encoder_sparse_step "
        f"{base.model.encoder_sparse_step}, decoder_sparse_step {base.model.decoder_sparse_step}, d_model "
        f"{base.model.d_model}), {meta['steps']} steps per model, seeds {seeds}; languages {', '.join(langs)} from "
        f"Debian's fortunes, at most {meta['max_bytes_per_language']} bytes each, mixed at temperature "
        f"{meta['language_temperature']:.3g} (mT5's alpha 0.3). Python {meta['python']}, torch {meta['torch']}, "
        f"{meta['cpus']} CPUs, load average {load:.1f} at the end (a machine shared with other jobs); "
        f"{meta['wall_seconds'] / 60:.1f} min in all.",
        "",
        "Step speedup = dense steps / the steps Switch needs to reach dense's final validation loss in that language "
        "(linear interpolation between evaluations). Values: mean ± sample std [min, max] over seeds.",
        "",
        "| language | step speedup | dense final loss | Switch final loss | dense - Switch (nats) |",
        "|---|---|---|---|---|",
    ]
    for lang in langs:
        b = by_lang[lang]
        lines.append(f"| {lang} | {_fmt(b['step_speedup'])} | {_fmt(b['dense_final_val_loss'], 3)} | "
                     f"{_fmt(b['switch_final_val_loss'], 3)} | {_fmt(b['loss_gain'], 3)} |")
    lines += [
        f"| all (overall val loss) | {_fmt(summary['overall_step_speedup'])} | "
        f"{_fmt(summary['overall_dense_final_val_loss'], 3)} | {_fmt(summary['overall_switch_final_val_loss'], 3)} "
        "| |",
        "",
        f"- mean over languages of the step speedup: {_fmt(summary['mean_language_step_speedup'])}",
        f"- languages where Switch ends below dense, per seed: {summary['languages_improved']} of {len(langs)}",
        f"- training throughput Switch / dense: {_fmt(summary['throughput_ratio'])}",
        "",
        "The paper (its numbers, for comparison; the scale differs by orders of magnitude):",
        "",
        *[f"- {p}" for p in PAPER],
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    try:
        from switchformer.plot import plot_language_speedups

        means = {lang: {"step_speedup": by_lang[lang]["step_speedup"].get("mean")} for lang in langs}
        plot_language_speedups(means, stem.with_name(stem.name + "_speedup.png"))
    except ModuleNotFoundError as e:
        print(f"no plot: {e}")
    print("\n".join(lines))
    print(f"wrote {stem.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
