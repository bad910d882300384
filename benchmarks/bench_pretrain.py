"""Pre-training benchmark: Switch vs the FLOP-matched dense model (`switchformer compare`) over several seeds.

Measures, per seed and as the mean over seeds: the steps and training wall time Switch needs to reach the dense
model's final validation loss, as ratios to dense's (the paper's speed-up measure, paper Figures 5 and 6), and the
throughput ratio (Switch tokens/s / dense tokens/s).

    python benchmarks/bench_pretrain.py                 # configs/default.toml, seeds 0 1 2 (about 2 x 3 runs)
    python benchmarks/bench_pretrain.py --quick         # tiny config, 1 seed, seconds: a smoke test of the script
    python benchmarks/bench_pretrain.py --config configs/decoder.toml train.steps=900
    python benchmarks/bench_pretrain.py --jobs 2        # each seed's Switch and dense side by side, 1 thread each
    python benchmarks/bench_pretrain.py --jobs 2 --wide-dense 4   # + a 4x-wider dense reference per seed

``--jobs N`` trains N runs at once in separate processes (``switchformer train``, one intra-op thread each), so on
a 2-core machine the Switch run and its dense baseline share the machine equally and their throughputs are measured
under the same conditions; the default trains them one after the other with all threads.

``--wide-dense K`` also trains, per seed, the dense model with K x wider FFNs (``switchformer compare --wide-dense``):
how much extra FFN parameters, which is what a Switch layer adds, buy at this budget (a reference, not a strict
bound: see ``switchformer.train.compare``). Those runs are queued after all Switch/dense pairs, so the pairs'
throughputs are still measured side by side.

Writes ``benchmarks/results/pretrain_cpu_<date>.{md,json}`` and ``..._loss.png`` (or ``--results-dir``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from switchformer.cli import build_config, find_recipe
from switchformer.config import apply_overrides, to_toml
from switchformer.train.compare import (
    compare,
    dense_counterpart,
    mean_over_seeds,
    seed_config,
    summarize,
    wide_dense_counterpart,
)

HERE = Path(__file__).resolve().parent


def _finished(run_dir: Path, steps: int) -> bool:
    from switchformer.metrics import read_metrics

    return (run_dir / "metrics.jsonl").is_file() and any(r.get("step") == steps for r in read_metrics(run_dir, "end"))


def run_parallel(base, seeds: list[int], runs_dir: Path, jobs: int, wide_dense: int = 0) -> list[dict]:
    """Train every seed's Switch and dense runs, ``jobs`` processes at a time, then summarise each seed.

    Runs are queued Switch, dense, Switch, dense... so with ``jobs=2`` each pair trains side by side; the wide dense
    references (``wide_dense``) come last.
    """
    runs, wide_runs, seed_dirs = [], [], {}
    for seed in seeds:
        cfg = seed_config(base, seed, runs_dir, ["train.num_threads=1", "train.max_minutes=0",
                                                 "train.progress=false"])
        out = runs_dir / f"seed{seed}"
        dense = dense_counterpart(cfg)
        wide = wide_dense_counterpart(cfg, wide_dense) if wide_dense else None
        seed_dirs[seed] = (out / cfg.name, out / dense.name, out / wide.name if wide else None)
        runs += [(cfg, seed_dirs[seed][0]), (dense, seed_dirs[seed][1])]
        if wide:
            wide_runs.append((wide, seed_dirs[seed][2]))
    runs += wide_runs
    runs_dir.mkdir(parents=True, exist_ok=True)
    from switchformer.train.loop import build_components

    for seed in sorted({cfg.data.seed for cfg, _ in runs}):  # tokenizer and token arrays cached before the runs race
        build_components(next(cfg for cfg, _ in runs if cfg.data.seed == seed), torch.device("cpu"))
    # a run that already finished (an "end" record at the planned step) is kept: an interrupted benchmark resumes
    # with the runs it lacks (same --runs-dir), and those it has keep their numbers
    pending = []
    for cfg, d in runs:
        if _finished(d, cfg.train.steps):
            print(f"keep  {d} (finished)", flush=True)
        else:
            pending.append((cfg, d))
    active = []
    while pending or active:
        while pending and len(active) < jobs:
            cfg, run_dir = pending.pop(0)
            if run_dir.exists():  # an unfinished run from an interrupted benchmark: start it afresh
                shutil.rmtree(run_dir)
            recipe = run_dir.with_suffix(".toml")
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            recipe.write_text(to_toml(cfg))
            cmd = [sys.executable, "-m", "switchformer.cli", "train", "--config", str(recipe),
                   "--run-dir", str(run_dir)]
            print(f"start {run_dir}", flush=True)
            with open(run_dir.with_suffix(".log"), "w") as log:  # the child keeps its own copy of the descriptor
                active.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), run_dir))
        proc, run_dir = active.pop(0)
        if proc.wait() != 0:
            raise RuntimeError(f"run {run_dir} failed; see {run_dir.with_suffix('.log')}")
        print(f"done  {run_dir}", flush=True)
    per_seed = []
    for seed in seeds:
        s = summarize(*seed_dirs[seed])
        s["seed"] = seed
        per_seed.append(s)
    return per_seed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides (train.steps=900 ...)")
    ap.add_argument("--config", default=None, help="recipe (default: configs/default.toml; --quick: tiny_test)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick: 0)")
    ap.add_argument("--quick", action="store_true", help="tiny config, one seed: checks the script end to end")
    ap.add_argument("--runs-dir", default=None, help="where the runs go (default runs/bench_pretrain_<date>)")
    ap.add_argument("--results-dir", default=str(HERE / "results"), help="where the report goes")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once, one thread each (default 1)")
    ap.add_argument("--wide-dense", type=int, default=0, metavar="K",
                    help="also train the dense model with K x wider FFNs per seed (a capacity reference)")
    args = ap.parse_args(argv)

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d_%H%M")
    config = args.config or ("tiny_test" if args.quick else "default")
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    base = build_config(config, args.overrides)
    if args.quick:
        base = apply_overrides(base, ["train.steps=12", "train.eval_every=4", "train.progress=false"])
    runs_dir = Path(args.runs_dir or f"runs/bench_pretrain_{stamp}")
    tag = f"pretrain_cpu{'_quick' if args.quick else ''}_{stamp}"

    if args.jobs > 1:
        per_seed = run_parallel(base, seeds, runs_dir, args.jobs, args.wide_dense)
    else:
        per_seed = []
        for seed in seeds:
            cfg = seed_config(base, seed, runs_dir)
            s = compare(cfg, out_dir=runs_dir / f"seed{seed}", wide_dense=args.wide_dense)
            s["seed"] = seed
            per_seed.append(s)

    keys = ["step_ratio", "time_ratio", "throughput_ratio", "dense_final_val_loss", "switch_final_val_loss",
            "switch_tokens_per_s", "dense_tokens_per_s", "dense_train_seconds"]
    mean = {k: mean_over_seeds([s[k] for s in per_seed]) for k in keys}
    report = {
        "date_utc": stamp, "config": str(find_recipe(config)), "overrides": args.overrides, "quick": args.quick,
        "seeds": seeds, "hardware": {"machine": platform.machine(), "processor": platform.processor(),
                                     "torch_threads": 1 if args.jobs > 1 else torch.get_num_threads(),
                                     "jobs": args.jobs},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "per_seed": per_seed, "mean": mean, "run_config": to_toml(base),
    }
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(report, indent=2))

    from switchformer.plot import plot_losses

    dirs = [Path(s["switch_run"]) for s in per_seed] + [Path(s["dense_run"]) for s in per_seed]
    dirs += [Path(s["wide_dense_run"]) for s in per_seed if "wide_dense_run" in s]
    plot_losses(dirs, out / f"{tag}_loss.png")
    plot_losses(dirs, out / f"{tag}_loss_by_time.png", x="train_seconds")

    def f(v, fmt=".3f"):
        return "n/a" if v is None else format(v, fmt)

    lines = [f"# Pre-training: Switch vs FLOP-matched dense ({'quick smoke run' if args.quick else 'CPU'}, {stamp})",
             "", f"Config: `{report['config']}` {' '.join(args.overrides)}; seeds {seeds}; "
             f"torch {torch.__version__}, {report['hardware']['torch_threads']} threads per run, "
             f"{args.jobs} run(s) at once, {platform.machine()}.", "",
             "| seed | dense final val loss | Switch final val loss | step ratio | time ratio | Switch tok/s | "
             "dense tok/s | throughput ratio |", "|---|---|---|---|---|---|---|---|"]
    for s in per_seed:
        lines.append(f"| {s['seed']} | {f(s['dense_final_val_loss'])} | {f(s['switch_final_val_loss'])} | "
                     f"{f(s['step_ratio'], '.2f')} | {f(s['time_ratio'], '.2f')} | "
                     f"{f(s['switch_tokens_per_s'], '.0f')} | "
                     f"{f(s['dense_tokens_per_s'], '.0f')} | {f(s['throughput_ratio'], '.2f')} |")
    if args.wide_dense:
        kx = args.wide_dense
        lines += ["", f"Capacity reference: the dense model with {kx}x wider FFNs (every parameter active, not "
                  "FLOP-matched), trained on the same data; step ratio = its steps to the FLOP-matched dense "
                  "model's final loss / dense steps.", "",
                  f"| seed | dense final val loss | dense x{kx} final val loss | dense x{kx} step ratio | "
                  "Switch step ratio |", "|---|---|---|---|---|"]
        for s in per_seed:
            lines.append(f"| {s['seed']} | {f(s['dense_final_val_loss'])} | {f(s['wide_dense_final_val_loss'])} | "
                         f"{f(s['wide_dense_step_ratio'], '.2f')} | {f(s['step_ratio'], '.2f')} |")
    lines += ["", "Mean over seeds:", ""]
    for k in ("step_ratio", "time_ratio", "throughput_ratio"):
        missing = [str(s["seed"]) for s in per_seed if s[k] is None]
        why = f" (Switch never reached the dense final loss in seed(s) {', '.join(missing)})" if missing else ""
        lines.append(f"- {k}: {f(mean[k], '.3f')}{why}")
    lines += ["", "step ratio = Switch steps to reach the dense model's final validation loss / dense steps; time "
              "ratio likewise in training wall time (evaluation excluded); both interpolated between evaluations.",
              f"Plots: `{tag}_loss.png`, `{tag}_loss_by_time.png`."]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / (tag + '.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
