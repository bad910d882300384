"""Distillation benchmark, a Table 6 analog (paper §4.2): how much of a Switch teacher's gain a dense student keeps.

One Switch teacher (8 experts in every other block, a small T5 layout) is pre-trained on the standard-library corpus.
Then, per seed, five dense students (the teacher's FLOP-matched counterpart) train for the same steps on the same
batches with ``switchformer.train.distill``:

- ``scratch``: the student's own random init, the labels alone (the baseline every other arm is measured against);
- ``kd``: the teacher's probabilities alone as targets (``distill.soft_fraction=1``), own init;
- ``kd_init``: the same, the non-expert weights initialised from the teacher;
- ``kd_init_mix``: 0.75 labels + 0.25 teacher probabilities, initialised from the teacher (the paper's recipe);
- ``init_only``: initialised from the teacher, the labels alone (the paper's control).

Every model is evaluated on the same validation batches. Per arm: the student's negative log perplexity and the
share of the teacher's gain over the same seed's scratch student it keeps, (Q - Q_scratch) / (Q_teacher -
Q_scratch), as mean, sample standard deviation and range over seeds; the soft-target arms also against the
init-only control. The paper's Table 6 is printed beside.

    python benchmarks/bench_distill.py                  # teacher 600 steps; 5 arms x 2 seeds, 600 steps each
    python benchmarks/bench_distill.py --steps 300 --teacher-steps 300 --seeds 3
    python benchmarks/bench_distill.py --quick          # tiny model, a few steps: a smoke test of the script

Finished runs are reused when the benchmark is started again with the same ``--runs-dir``. Writes
``benchmarks/results/distill_cpu_<date>.{md,json}`` (``--quick``: under the runs directory).
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

from switchformer.config import apply_overrides
from switchformer.reproduce.registry import base_config
from switchformer.train.distill import RESULTS_JSON, distill
from switchformer.train.loop import train

HERE = Path(__file__).resolve().parent

PAPER_TABLE6 = [  # paper Table 6: T5-Base student (223M) of a Switch-Base teacher (3.8B), neg. log perplexity
    ("T5-Base (scratch)", -1.636, None),
    ("Switch-Base (teacher)", -1.444, None),
    ("distillation", -1.631, 3),
    ("+ init non-expert weights", -1.598, 20),
    ("+ 0.75 mix of hard and soft loss", -1.580, 29),
    ("init non-expert weights, no distillation", -1.639, None),
]
ARMS = {  # arm -> (distill.soft_fraction, distill.init, label)
    "scratch": (0.0, "none", "dense from scratch"),
    "kd": (1.0, "none", "distillation (soft targets only)"),
    "kd_init": (1.0, "non_expert", "+ init non-expert weights"),
    "kd_init_mix": (0.25, "non_expert", "+ 0.75 hard / 0.25 soft mix"),
    "init_only": (0.0, "non_expert", "init non-expert weights, no distillation"),
}
# A small T5 layout (d_model 64, 2 + 2 blocks, 8 experts in block 1 of each stack) on 64-token span-corruption
# sequences of a 3 MB slice of the standard library. One seed (the teacher and 5 students of 600 steps) took 28 min
# of runs at load average 5-6 on the 2 shared cores; 2 seeds aim at < 20 min on 2 idle cores (an estimate, from
# training about 3x faster there).
MODEL = ["model.d_model=64", "model.d_ff=256", "model.d_kv=32", "model.num_heads=2", "model.moe.num_experts=8",
         "data.input_length=64", "data.vocab_size=1948", "data.num_sentinels=100", "data.max_bytes=3000000",
         "data.val_fraction=0.05", "train.batch_size=16", "train.eval_batches=16"]
QUICK = ["model.d_model=32", "model.d_ff=64", "model.d_kv=16", "data.input_length=32", "data.vocab_size=400",
         "data.num_sentinels=20", "data.max_bytes=300000", "data.val_fraction=0.2", "train.batch_size=8",
         "train.eval_batches=2"]
COMMON = ["train.progress=false", "train.plots=false", "train.tensorboard=false", "train.checkpoint_every=0",
          "train.max_minutes=0"]


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    out = {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}
    out["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def _finished(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return (run_dir / "checkpoints").is_dir() and metrics.is_file() and any(
        json.loads(line).get("kind") == "end" for line in metrics.read_text().splitlines())


def teacher_config(args):
    overrides = [*(QUICK if args.quick else MODEL), *COMMON, f"train.steps={args.teacher_steps}",
                 f"train.eval_every={args.teacher_steps}", f"train.log_every={max(1, args.teacher_steps // 10)}",
                 "train.seed=0", "data.seed=0", "name=teacher", f"out_dir={args.runs_dir}",
                 f"train.num_threads={args.threads}", *args.overrides]
    return apply_overrides(base_config(), overrides)


def run_arm(args, teacher_dir: Path, arm: str, seed: int, baseline: Path | None) -> dict:
    soft, init, _ = ARMS[arm]
    out = Path(args.runs_dir) / f"seed{seed}" / arm
    overrides = [*COMMON, f"train.steps={args.steps}", f"train.eval_every={args.steps}",
                 f"train.log_every={max(1, args.steps // 10)}", f"train.seed={seed}", f"data.seed={seed}",
                 f"distill.soft_fraction={soft}", f"distill.init={init}", f"train.num_threads={args.threads}"]
    results_file = out / RESULTS_JSON
    key = json.dumps([overrides, str(baseline)])
    if results_file.is_file():
        previous = json.loads(results_file.read_text())
        if previous.get("bench_key") == key:
            print(f"  {arm} seed {seed}: reusing {results_file}", flush=True)
            return previous
    t0 = time.perf_counter()
    res = distill(str(teacher_dir), overrides=overrides, baseline=baseline, out_dir=out, print_fn=lambda s: None)
    results = dict(res.results, bench_key=key, bench_wall_seconds=time.perf_counter() - t0)
    results_file.write_text(json.dumps(results, indent=1) + "\n")
    print(f"  {arm} seed {seed}: student {results['student']['neg_log_perplexity']:.4f}, scratch "
          f"{results['scratch']['neg_log_perplexity']:.4f}, teacher {results['teacher']['neg_log_perplexity']:.4f} "
          f"({results['bench_wall_seconds']:.0f}s)", flush=True)
    return results


def summarize(per_seed: dict[int, dict[str, dict]]) -> dict:
    arms = {}
    for arm in ARMS:
        q, kept, vs_init = [], [], []
        for runs in per_seed.values():
            r = runs[arm]
            student = r["scratch" if arm == "scratch" else "student"]["neg_log_perplexity"]
            scratch, teacher = r["scratch"]["neg_log_perplexity"], r["teacher"]["neg_log_perplexity"]
            q.append(student)
            if teacher > scratch:
                kept.append(100 * (student - scratch) / (teacher - scratch))
            if arm in ("kd_init", "kd_init_mix"):
                vs_init.append(student - runs["init_only"]["student"]["neg_log_perplexity"])
        arms[arm] = {"label": ARMS[arm][2], "neg_log_perplexity": _stats(q), "kept_percent": _stats(kept),
                     "minus_init_only": _stats(vs_init), "per_seed": q, "kept_per_seed": kept}
    # data.seed also seeds the validation set's corruption noise: the teacher is evaluated on each seed's batches
    teacher = [runs["scratch"]["teacher"]["neg_log_perplexity"] for runs in per_seed.values()]
    return {"teacher_neg_log_perplexity": _stats(teacher), "arms": arms}


def _fmt(s: dict | None, digits: int = 4, pct: bool = False) -> str:
    if s is None:
        return "–"
    unit = "%" if pct else ""
    spread = f" ± {s['std']:.{digits}f}{unit} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]" if s["n"] > 1 else ""
    return f"{s['mean']:.{digits}f}{unit}{spread}"


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"# Distillation: a Switch-8 teacher into a dense student (paper Table 6 analog), {report['date']}", "",
             f"Machine: {report['machine']}; load average {report['load_start']} at the start, {report['load_end']} "
             "at the end (a shared machine: other agents' work runs beside the benchmark; wall times vary with it, "
             "the losses do not).", "",
             f"Teacher: {report['teacher']['parameters']:,} parameters, {report['teacher']['steps']} steps; "
             f"students: {report['student_parameters']:,} parameters (the FLOP-matched dense model), "
             f"{report['steps']} steps, seeds {report['seeds']}; every model of a seed is evaluated on the same "
             f"validation batches ({report['validation_tokens']} target tokens). Wall time of the runs "
             f"{report['runs_wall_seconds'] / 60:.1f} min (the teacher's training plus each distill call; this "
             f"invocation {report['wall_seconds'] / 60:.1f} min, finished runs reused). Command: "
             f"`{report['command']}`.", "",
             f"Teacher neg. log perplexity (on each seed's validation batches): "
             f"{_fmt(s['teacher_neg_log_perplexity'])}.", "",
             "| arm | neg. log perplexity (mean ± std [min, max]) | % of the teacher's gain kept | minus init-only |",
             "|---|---:|---:|---:|"]
    for arm, a in s["arms"].items():
        kept = "0 (the baseline)" if arm == "scratch" else _fmt(a["kept_percent"], 1, pct=True)
        lines.append(f"| {a['label']} (`{arm}`) | {_fmt(a['neg_log_perplexity'])} | {kept} | "
                     f"{_fmt(a['minus_init_only'])} |")
    lines += ["", "**The paper**, Table 6 (T5-Base student of a 3.8B Switch-Base teacher, neg. log perplexity, % of "
              "the gain kept):", "", "| row | neg. log perplexity | % kept |", "|---|---:|---:|"]
    lines += [f"| {row} | {q:.3f} | {'–' if k is None else f'{k}%'} |" for row, q, k in PAPER_TABLE6]
    lines += ["", "Table 7 (the full recipe, teachers of 1.1B-14.7B parameters): 37%, 32%, 30%, 27%, 28% kept.", "",
              "Reading: the students here are far from converged, so starting from the teacher's trained embeddings "
              "and attention is a large head start on its own (the init-only row), unlike in the paper (-1.639 vs "
              "-1.636); the soft-target arms are also given relative to that control. A share above 100% means the "
              "student ends better than the teacher: the initialised student has trained for the teacher's steps "
              "plus its own."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="teacher (and so student) config overrides, e.g. model.d_model=96")
    ap.add_argument("--steps", type=int, default=600, help="student steps (default 600)")
    ap.add_argument("--teacher-steps", type=int, default=600, help="teacher steps (default 600)")
    ap.add_argument("--seeds", type=int, default=2, help="student seeds (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--runs-dir", default="runs/bench_distill")
    ap.add_argument("--quick", action="store_true", help="tiny model, 20 steps: a smoke test of the script")
    ap.add_argument("--out", help="report path without suffix (default benchmarks/results/distill_cpu_<date>)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.teacher_steps = min(args.steps, 20), min(args.teacher_steps, 20)
        args.runs_dir = args.runs_dir if args.runs_dir != "runs/bench_distill" else "runs/bench_distill_quick"
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    cfg = teacher_config(args)
    teacher_dir = Path(args.runs_dir) / "teacher"
    if _finished(teacher_dir):
        print(f"teacher: reusing {teacher_dir}", flush=True)
    else:
        print(f"teacher: {args.teacher_steps} steps -> {teacher_dir}", flush=True)
        train(cfg, run_dir=teacher_dir, print_fn=lambda s: None)
    per_seed: dict[int, dict[str, dict]] = {}
    for seed in range(args.seeds):
        runs = {"kd_init_mix": run_arm(args, teacher_dir, "kd_init_mix", seed, None)}
        scratch_dir = Path(runs["kd_init_mix"]["scratch"]["run_dir"])
        runs["scratch"] = runs["kd_init_mix"]
        for arm in ("kd", "kd_init", "init_only"):
            runs[arm] = run_arm(args, teacher_dir, arm, seed, scratch_dir)
        per_seed[seed] = runs
    first = per_seed[0]["kd_init_mix"]
    teacher_end = [json.loads(line) for line in (teacher_dir / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line).get("kind") == "end"]
    # the runs' own wall times (reused runs keep theirs) plus the teacher's training time (its setup excluded)
    runs_wall = sum(r.get("bench_wall_seconds", 0.0) for runs in per_seed.values() for arm, r in runs.items()
                    if arm != "scratch") + (teacher_end[-1]["train_seconds"] if teacher_end else 0.0)
    date = dt.datetime.now(dt.timezone.utc)
    report = {
        "date": date.strftime("%Y-%m-%d %H:%M UTC"), "command": "python benchmarks/bench_distill.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
                   f"{torch.__version__}, {args.threads} threads",
        "load_start": round(load_start, 2), "load_end": round(os.getloadavg()[0], 2),
        "wall_seconds": time.perf_counter() - t0, "runs_wall_seconds": runs_wall, "steps": args.steps,
        "seeds": list(range(args.seeds)),
        "teacher": {"run_dir": str(teacher_dir), "steps": args.teacher_steps,
                    "parameters": first["teacher"]["parameters"]},
        "student_parameters": first["student"]["parameters"], "validation_tokens": first["validation_tokens"],
        "summary": summarize(per_seed), "runs": {str(s): r for s, r in per_seed.items()},
        "paper_table6": PAPER_TABLE6,
    }
    out = Path(args.out) if args.out else (Path(args.runs_dir) / "distill_quick" if args.quick else
                                           HERE / "results" / f"distill_cpu_{date:%Y-%m-%d}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
