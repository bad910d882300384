"""Table 4's protocol: pre-train a dense and a Switch model once, then fine-tune every arm from them (§2.4, §4.1).

Both sources are pre-trained from seed 0 with the shared base config (the dense one with every block dense, the
Switch one with 8 experts), for the experiment's pre-training budget, and keep their final checkpoint. Every
fine-tuning arm then runs ``switchformer finetune`` on the built-in ``stdlib-name`` task (restore a function's
masked name from its body and docstring; exact match) with the paper's fine-tuning settings (constant learning rate
1e-3) and the arm's dropout rates, once per seed (``train.seed`` sets the dropout stream, ``data.seed`` the
example order).

The paper reports the peak validation score of each run (§4.1), so a run's quality is its best validation
negative log-likelihood in nats (the lowest loss over its evaluations), judged like every other experiment; the
peak exact match and the last training and validation losses (does the model overfit at all?) are reported beside.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from switchformer.config import apply_overrides
from switchformer.reproduce.finished import finished_result
from switchformer.reproduce.registry import DENSE, Experiment, base_config, experts

TASK = "stdlib-name"
SOURCES = {"dense": DENSE, "switch": experts(8)}


def _settings(quick: bool) -> dict:
    if quick:
        return {"pretrain_steps": 30, "steps": 20, "batch": 8, "eval_every": 10,
                "task": ("finetune.max_bytes=2000000", "finetune.eval_examples=16", "finetune.test_examples=16",
                         "finetune.input_length=64", "finetune.target_length=16")}
    return {"pretrain_steps": 1500, "steps": 600, "batch": 16, "eval_every": 100,
            # ~10 MB of standard-library files: a few thousand training functions, small enough to overfit
            "task": ("finetune.max_bytes=10000000", "finetune.val_fraction=0.1", "finetune.test_fraction=0.05",
                     "finetune.eval_examples=500", "finetune.test_examples=500", "finetune.input_length=128",
                     "finetune.target_length=16")}


def pretrain_sources(name: str, runs_root: Path, data, *, quick: bool, print_fn: Callable[[str], None],
                     train_run: Callable[..., dict]) -> dict:
    """Pre-train (or reuse) the dense and Switch sources with the runner's ``train_run``; returns {kind: run
    directory}."""
    steps = _settings(quick)["pretrain_steps"]
    out = {}
    for kind, overrides in SOURCES.items():
        cfg = apply_overrides(base_config(quick), [*overrides, f"train.steps={steps}", "train.seed=0", "data.seed=0",
                                                   f"name=pretrain_{kind}", f"out_dir={runs_root / name}"])
        run_dir = runs_root / name / f"pretrain_{kind}"
        r = train_run(cfg, f"pretrain_{kind}", "float32", run_dir, data, print_fn, save_checkpoint=True)
        print_fn(f"  pre-trained {kind} source: neg log perplexity {r['quality']:.4f} after {r['steps_done']} steps")
        out[kind] = run_dir
    return out


def finetune_run(exp: Experiment, arm_name: str, seed: int, source: Path, run_dir: Path, *, quick: bool,
                 print_fn: Callable[[str], None]) -> dict:
    """Fine-tune ``source`` for one arm and seed (or reuse the finished run); returns the run record."""
    from switchformer.metrics import read_metrics
    from switchformer.train.finetune import RESULTS_JSON, finetune

    arm = exp.arm(arm_name)
    s = _settings(quick)
    overrides = [*arm.overrides, f"train.steps={s['steps']}", f"train.seed={seed}", f"data.seed={seed}",
                 f"train.batch_size={s['batch']}",
                 f"train.eval_every={s['eval_every']}", "train.checkpoint_every=0", "train.progress=false",
                 "train.tensorboard=false", "train.plots=false", *s["task"]]
    key = json.dumps([str(source), overrides, TASK])
    previous = finished_result(run_dir, key, print_fn)
    if previous is not None:
        return previous
    result_file = run_dir / "result.json"
    t0 = time.perf_counter()
    res = finetune(str(source), TASK, overrides, run_dir=run_dir, print_fn=lambda line: None)
    results = json.loads((run_dir / RESULTS_JSON).read_text())
    metric = results["metric"]
    evals = [{"step": e["step"], "neg_log_perplexity": -e["val_loss"], "val_loss": e["val_loss"],
              metric: e.get(metric), "token_accuracy": e.get("token_accuracy")} for e in results["evals"]]
    finite = [e for e in evals if math.isfinite(e["val_loss"])]
    train = read_metrics(run_dir, "train")
    best_loss = min(e["val_loss"] for e in finite) if finite else math.inf
    diverged = not finite or not math.isfinite(evals[-1]["val_loss"])
    record = {
        "key": key, "arm": arm_name, "seed": seed, "precision": "float32", "source": str(source),
        "config": json.loads(json.dumps(results.get("settings", {}))), "run_dir": str(run_dir), "evals": evals,
        "train": [{k: r.get(k) for k in ("step", "loss", "lm_loss", "grad_norm", "tokens_per_s")} for r in train],
        "step0_quality": evals[0]["neg_log_perplexity"] if evals else None,
        "final_quality": evals[-1]["neg_log_perplexity"] if evals else None,
        "quality": evals[0]["neg_log_perplexity"] if diverged else -best_loss,
        "diverged": diverged, "diverged_at": None, "stop": results.get("stop", ""),
        "steps_done": res.train.step, "wall_seconds": time.perf_counter() - t0,
        "train_seconds": res.train.train_seconds, "metric": metric,
        "peak_metric": max((e[metric] for e in evals if e.get(metric) is not None), default=None),
        "last_train_loss": train[-1]["lm_loss"] if train else None,
        "last_val_loss": evals[-1]["val_loss"] if evals else None,
        "task_sizes": results.get("sizes"),
    }
    result_file.write_text(json.dumps(record, indent=1))
    return record


def run_finetune_experiment(exp: Experiment, plan: list, runs_root: Path, data, *, quick: bool,
                            print_fn: Callable[[str], None], train_run: Callable[..., dict]) -> list[dict]:
    """Every (arm, seed) of a fine-tuning experiment (Table 4), after pre-training its two sources with the
    runner's ``train_run`` (passed in: the runner imports this module)."""
    sources = pretrain_sources(exp.name, runs_root, data, quick=quick, print_fn=print_fn, train_run=train_run)
    runs = []
    for i, (arm, seed) in enumerate(plan, 1):
        kind = exp.extra["sources"][arm.name]
        r = finetune_run(exp, arm.name, seed, sources[kind], runs_root / exp.name / f"{arm.name}-s{seed}",
                         quick=quick, print_fn=print_fn)
        peak = "–" if r["peak_metric"] is None else f"{r['peak_metric']:.1f}"
        print_fn(f"  [{i}/{len(plan)}] {arm.name} seed {seed}: best val loss {-r['quality']:.4f}, peak "
                 f"{r['metric']} {peak} ({r['wall_seconds']:.0f}s)")
        runs.append(r)
    return runs
