"""Fine-tuning benchmark, a Table 4 analog (paper §2.4, §4.1): expert dropout 0.1 / 0.2 / 0.3 / 0.4 over seeds.

One pretrained Switch model (``configs/default.toml`` trained for ``--pretrain-steps`` steps, or ``--source``) is
fine-tuned on a built-in task once per arm and seed with ``switchformer.train.finetune``: dropout 0.1 on the
non-expert layers in every arm and 0.1 / 0.2 / 0.3 / 0.4 inside the experts. Seeds change the dropout stream and the
order of the training examples (``train.seed``, ``data.seed``); the pretrained weights and the task split are the
same in every run. Per arm: the peak validation score (the paper reports the peak, evaluating every 200 steps), the
test score of that checkpoint, the final validation loss and target-token accuracy, as mean, sample standard
deviation and range over seeds, and each arm's per-seed difference to expert dropout 0.1. The paper's Table 4 is
printed beside (its rows raise dropout everywhere, d = 0.1 / 0.2 / 0.3, and add one row with d = 0.1 and expert
dropout 0.4).

    python benchmarks/bench_finetune.py                          # pretrain 300 steps; 4 arms x 3 seeds
    python benchmarks/bench_finetune.py --source runs/switch     # fine-tune an existing run instead
    python benchmarks/bench_finetune.py train.steps=600 --task stdlib-name    # overrides before the options
    python benchmarks/bench_finetune.py --quick                  # tiny model, 2 arms, 1 seed: a smoke test

Fine-tuning overrides after the options apply to every run. Finished runs are reused when the benchmark is started
again with the same ``--runs-dir``. Writes ``benchmarks/results/finetune_expert_dropout_cpu_<date>.{md,json}``.
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

from switchformer.cli import build_config
from switchformer.config import apply_overrides
from switchformer.train.finetune import RESULTS_JSON, finetune
from switchformer.train.loop import train

HERE = Path(__file__).resolve().parent

PAPER_TABLE4 = [  # paper Table 4: fine-tuning after pre-training on 34B tokens
    ("T5-Base, d=0.1", 82.9, 19.6, 83.5, 72.4),
    ("Switch-Base, d=0.1", 84.7, 19.1, 83.7, 73.0),
    ("Switch-Base, d=0.2", 84.4, 19.2, 83.9, 73.2),
    ("Switch-Base, d=0.3", 83.9, 19.6, 83.4, 70.7),
    ("Switch-Base, d=0.1, ed=0.4", 85.2, 19.6, 83.7, 73.0),
]

# Sized for < 20 min on 2 idle cores, estimated from the idle pretraining throughput of configs/default.toml's
# model (docs/training.md: ~10,700 tokens/s): ~2.5 min of pretraining, then 12 runs of ~70 s (200 steps of 16
# examples, 5 evaluations decoding 96 validation examples, the test split once).
FINETUNE = [
    "train.steps=200", "train.eval_every=50", "train.checkpoint_every=200", "train.batch_size=16",
    "finetune.input_length=128", "finetune.target_length=32", "finetune.eval_examples=96",
    "train.progress=false", "train.plots=false", "train.tensorboard=false", "train.log_every=25",
    "train.max_minutes=0",
    "model.dropout_rate=0.1",
    # T5X's constant 1e-3 leaves this model emitting pretraining sentinels after 200 steps (ROUGE-L 0.06 on
    # stdlib-docstring); 1e-3 x 10 makes it write docstrings within the budget, the same in every arm
    "optim.lr=0.01",
]
QUICK_PRETRAIN = ["model.d_model=32", "model.d_ff=64", "model.d_kv=8", "model.num_heads=4", "data.vocab_size=500",
                  "data.max_bytes=300000", "data.num_sentinels=20", "data.input_length=32", "train.batch_size=8",
                  "model.moe.num_experts=4"]
QUICK_FINETUNE = ["train.steps=20", "train.eval_every=10", "finetune.eval_examples=16", "finetune.test_examples=16",
                  "finetune.max_bytes=450000", "finetune.input_length=64", "finetune.target_length=16"]


def _stats(values: list[float]) -> dict:
    out = {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}
    out["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def pretrain(args, runs_dir: Path) -> Path:
    run_dir = runs_dir / "pretrained"
    if (run_dir / "checkpoints").is_dir() and any(
            json.loads(line).get("kind") == "end" for line in (run_dir / "metrics.jsonl").read_text().splitlines()):
        print(f"reusing the pretrained model in {run_dir}")
        return run_dir
    over = [f"out_dir={runs_dir}", "name=pretrained", f"train.steps={args.pretrain_steps}", "train.max_minutes=0",
            f"train.checkpoint_every={args.pretrain_steps}", "train.progress=false", "train.tensorboard=false",
            f"train.num_threads={args.threads}", *(QUICK_PRETRAIN if args.quick else [])]
    cfg = apply_overrides(build_config(None, []), over)
    t0 = time.perf_counter()
    result = train(cfg, run_dir=run_dir, print_fn=lambda s: None)
    print(f"pretrained {result.step} steps in {time.perf_counter() - t0:.0f}s: val loss "
          f"{result.final_eval['val_loss']:.4f}")
    return run_dir


def run_arm(source: Path, task: str, expert_dropout: float, seed: int, runs_dir: Path, extra: list[str],
            threads: int) -> dict:
    run_dir = runs_dir / f"{task}-ed{expert_dropout:g}-seed{seed}"
    results_file = run_dir / RESULTS_JSON
    if results_file.is_file():
        results = json.loads(results_file.read_text())
        print(f"reusing {run_dir}")
        return {"expert_dropout": expert_dropout, "seed": seed, "seconds": results.get("bench_seconds"),
                "results": results}
    over = [*FINETUNE, f"model.moe.expert_dropout={expert_dropout}", f"train.seed={seed}", f"data.seed={seed}",
            f"train.num_threads={threads}", f"out_dir={runs_dir}", *extra]
    t0 = time.perf_counter()
    res = finetune(str(source), task, over, run_dir=run_dir, print_fn=lambda s: None)
    seconds = time.perf_counter() - t0
    results = dict(res.results, bench_seconds=seconds)
    results_file.write_text(json.dumps(results, indent=1) + "\n")
    metric = results["metric"]
    print(f"expert dropout {expert_dropout:g} seed {seed}: peak {metric} {results['best'][metric]:.2f} at step "
          f"{results['best']['step']}, test {results['test'].get(metric, float('nan')):.2f}, final val loss "
          f"{results['last']['val_loss']:.4f} ({seconds:.0f}s)")
    return {"expert_dropout": expert_dropout, "seed": seed, "seconds": seconds, "results": results}


def summarize(runs: list[dict]) -> dict:
    metric = runs[0]["results"]["metric"]
    arms: dict[float, list[dict]] = {}
    for r in runs:
        arms.setdefault(r["expert_dropout"], []).append(r)
    base = {r["seed"]: r for r in arms.get(min(arms), [])}
    out = {}
    for ed, rs in sorted(arms.items()):
        peak = [r["results"]["best"][metric] for r in rs]
        row = {
            "seeds": [r["seed"] for r in rs],
            f"peak_val_{metric}": _stats(peak),
            f"test_{metric}": _stats([r["results"]["test"][metric] for r in rs if r["results"]["test"]]),
            "final_val_loss": _stats([r["results"]["last"]["val_loss"] for r in rs]),
            "final_token_accuracy": _stats([r["results"]["last"]["token_accuracy"] for r in rs]),
            "peak_step": [r["results"]["best"]["step"] for r in rs],
        }
        paired = [r["results"]["best"][metric] - base[r["seed"]]["results"]["best"][metric] for r in rs
                  if r["seed"] in base]
        row[f"peak_val_{metric}_minus_lowest_ed"] = _stats(paired) if paired else None
        out[f"{ed:g}"] = row
    return out


def markdown(report: dict) -> str:
    metric, s = report["metric"], report["summary"]
    lines = [f"# Fine-tuning with expert dropout (paper Table 4 analog), {report['date']}", "",
             *([f"**Partial: {len(report['runs'])} of {len(report['runs']) + len(report['missing'])} runs finished; "
                f"missing: {', '.join(report['missing'])}.**", ""] if report.get("missing") else []),
             f"Task `{report['task']}` ({report['task_description']}): {report['sizes']['train']} train / "
             f"{report['sizes']['validation']} validation ({report['eval_examples']} scored per evaluation) / "
             f"{report['sizes']['test']} test examples; metric {metric} (0-100, higher is better). Source: "
             f"{report['source']}. Every run: dropout 0.1 on the non-expert layers, the expert dropout of its row, "
             f"{report['settings']}. Seeds {report['seeds']} (dropout stream and example order).", "",
             f"Machine: {report['machine']}; load average {report['load_start']} when this invocation started, "
             f"{report['load_end']} when it ended (a shared machine: wall times vary with the other work on it; the "
             f"scores do not). The fine-tuning runs took {report['total_seconds'] / 60:.1f} min in all.", "",
             f"| expert dropout | peak validation {metric} (mean ± std, min-max) | minus ed={min(map(float, s)):g}, "
             f"paired by seed | test {metric} of the peak checkpoint | final val loss | final token accuracy |",
             "|---:|---:|---:|---:|---:|---:|"]

    def f(st, digits=2):
        if not st or not st.get("n"):
            return "-"
        if st["n"] == 1:  # one seed: no spread to show
            return f"{st['mean']:.{digits}f} (1 seed)"
        return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f} ({st['min']:.{digits}f}-{st['max']:.{digits}f})"

    for ed, row in s.items():
        lines.append(f"| {ed} | {f(row[f'peak_val_{metric}'])} | {f(row[f'peak_val_{metric}_minus_lowest_ed'])} | "
                     f"{f(row[f'test_{metric}'])} | {f(row['final_val_loss'], 4)} | "
                     f"{f(row['final_token_accuracy'])} |")
    lines += ["", "Per run (peak validation score, its step, test score, final validation loss, seconds):", "",
              "| expert dropout | seed | peak | step | test | final val loss | seconds |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        res = r["results"]
        sec = f"{r['seconds']:.0f}" if r.get("seconds") is not None else "-"
        lines.append(f"| {r['expert_dropout']:g} | {r['seed']} | {res['best'][metric]:.2f} | {res['best']['step']} | "
                     f"{res['test'].get(metric, float('nan')):.2f} | {res['last']['val_loss']:.4f} | {sec} |")
    lines += ["", "The paper's Table 4 (Switch-Base, 7B parameters, pre-trained on 34B tokens; GLUE and SuperGLUE: "
              "averages, CNNDM: ROUGE-2, SQuAD: exact match). Its d rows raise dropout everywhere; the last row "
              "keeps d = 0.1 and uses 0.4 inside the experts, the setting this benchmark varies:", "",
              "| model | GLUE | CNNDM | SQuAD | SuperGLUE |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {a} | {b} | {c} | {d} |" for name, a, b, c, d in PAPER_TABLE4]
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="fine-tuning overrides for every run (train.steps=600 ...)")
    ap.add_argument("--source", help="a pretrained run or checkpoint directory (default: pretrain one)")
    ap.add_argument("--task", default="stdlib-docstring", help="built-in task or data (default stdlib-docstring)")
    ap.add_argument("--expert-dropout", type=float, nargs="+", default=None, help="arms (default 0.1 0.2 0.3 0.4)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    ap.add_argument("--pretrain-steps", type=int, default=300, help="steps of configs/default.toml (default 300)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 arms, 1 seed: checks the script end to end")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: report the runs already finished in --runs-dir (a partial report names the "
                         "missing ones and is written with the suffix _partial)")
    ap.add_argument("--runs-dir", default=None, help="where the runs go (default runs/bench_finetune_<date>)")
    ap.add_argument("--results-dir", default=str(HERE / "results"), help="where the report goes")
    args = ap.parse_args(argv)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    runs_dir = Path(args.runs_dir or f"runs/bench_finetune_{date}{'_quick' if args.quick else ''}")
    runs_dir.mkdir(parents=True, exist_ok=True)
    arms = args.expert_dropout or ([0.1, 0.4] if args.quick else [0.1, 0.2, 0.3, 0.4])
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if args.quick and args.pretrain_steps == 300:
        args.pretrain_steps = 20
    torch.set_num_threads(args.threads)
    load_start = round(os.getloadavg()[0], 2)
    source = Path(args.source) if args.source else pretrain(args, runs_dir)
    extra = [*(QUICK_FINETUNE if args.quick else []), *args.overrides]
    if args.report_only:
        wanted = [(ed, seed) for seed in seeds for ed in arms]
        runs = [run_arm(source, args.task, ed, seed, runs_dir, extra, args.threads) for ed, seed in wanted
                if (runs_dir / f"{args.task}-ed{ed:g}-seed{seed}" / RESULTS_JSON).is_file()]
        missing = [f"ed={ed:g} seed {seed}" for ed, seed in wanted
                   if not (runs_dir / f"{args.task}-ed{ed:g}-seed{seed}" / RESULTS_JSON).is_file()]
        if not runs:
            raise SystemExit(f"no finished run in {runs_dir}")
    else:
        runs = [run_arm(source, args.task, ed, seed, runs_dir, extra, args.threads) for seed in seeds
                for ed in arms]
        missing = []
    first = runs[0]["results"]
    report = {
        "date": date, "task": first["task"], "task_description": first["description"], "metric": first["metric"],
        "sizes": first["sizes"], "eval_examples": first["eval_examples"], "source": str(source),
        "settings": ", ".join(f"{k} {v}" for k, v in first["settings"].items()
                              if k not in ("dropout_rate", "expert_dropout")) + f", {first['steps']} steps",
        "seeds": seeds, "expert_dropout": arms, "overrides": [*FINETUNE, *extra],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} "
                   "threads",
        "load_start": load_start, "load_end": round(os.getloadavg()[0], 2),
        "total_seconds": sum(r["seconds"] or 0.0 for r in runs), "summary": summarize(runs), "runs": runs,
        "missing": missing,
        "paper_table4": [dict(zip(("model", "GLUE", "CNNDM", "SQuAD", "SuperGLUE"), row, strict=True))
                         for row in PAPER_TABLE4],
        "command": "python benchmarks/bench_finetune.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    text = markdown(report)
    print(text)
    if args.quick:
        return 0  # a smoke test writes no result file
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"finetune_expert_dropout_cpu_{date}{'_partial' if missing else ''}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
