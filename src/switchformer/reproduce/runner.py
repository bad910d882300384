"""Running a registered experiment: every arm x seed trained on one shared data pipeline, then judged and reported.

Per run: the model is initialised from the seed (``torch.manual_seed(seed)`` before it is built, as ``train``
does), the training batches come in the seed's order (``data.seed = seed``), and every run of every seed is
evaluated on the same fixed validation batches (corruption seed 0), before training and every ``eval_every``
steps. The learning rate falls linearly to zero over the last 15% of the steps (the same for every arm).

A run that produces a non-finite loss, or ends with a loss above its untrained value, is marked diverged and keeps
its untrained quality (the worst possible; ``switchformer.reproduce.judging``).

Each finished run leaves ``result.json`` in its run directory (``<runs_dir>/<experiment>/<arm>-s<seed>/``, next to
the usual ``metrics.jsonl``); running the experiment again reuses every finished run whose configuration is
unchanged, so an interrupted suite continues where it stopped, one run at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from switchformer.config import RunConfig, apply_overrides, round_vocab, to_dict
from switchformer.reproduce.finished import finished_result
from switchformer.reproduce.judging import (
    judge_better,
    judge_equivalent,
    judge_no_benefit,
    judge_spread,
    judge_sweep,
    mean,
    pooled_std,
    sample_std,
)
from switchformer.reproduce.precision import BF16_BACKENDS, autocast_overrides, emulate_precision
from switchformer.reproduce.registry import (
    COOLDOWN_FRACTION,
    EXPERIMENTS,
    MISSING,
    SMOKE_LABEL,
    Experiment,
    base_config,
    missing_requirements,
)

PROTOCOL_VERSION = 1
"""Bumped when the training protocol changes, so earlier run results are not reused."""
def arm_config(exp: Experiment, arm_name: str, seed: int, *, quick: bool, steps: int | None = None,
               bf16: str = "emulated") -> RunConfig:
    """The full config of one run: base, the experiment's overrides, the arm's, then steps and seeds; with
    ``bf16="autocast"`` a bfloat16 or selective arm also trains in real bfloat16 (``autocast_overrides``)."""
    arm = exp.arm(arm_name)
    cfg = apply_overrides(base_config(quick), [*exp.overrides, *arm.overrides])
    n_steps = steps if steps is not None else (cfg.train.steps if quick else exp.steps)
    hardware = autocast_overrides(arm.precision) if bf16 == "autocast" else []
    return apply_overrides(cfg, [*hardware, f"train.steps={n_steps}", f"train.seed={seed}", f"data.seed={seed}",
                                 f"name={arm_name}-s{seed}"])


class _DataCache:
    """Corpus, tokenizer and the fixed validation batches, built once per data configuration (seed aside)."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._entries: dict[str, tuple] = {}

    def get(self, cfg: RunConfig):
        from switchformer.data import get_tokenizer, load_corpus, make_loader

        data = dataclasses.replace(cfg.data, seed=0)
        key = json.dumps([to_dict(data), cfg.train.batch_size, cfg.train.eval_batches, cfg.model.arch])
        if key not in self._entries:
            corpus = load_corpus(data)
            tok = get_tokenizer(data, corpus, self.cache_dir)
            val = make_loader(data, tok, corpus.val_texts, cfg.train.batch_size, "val", cfg.model.arch,
                              cache_dir=self.cache_dir)
            val_batches = list(val.epoch_batches(cfg.train.eval_batches))
            summary = corpus.summary() if hasattr(corpus, "summary") else ""
            self._entries[key] = (corpus, tok, val_batches, summary)
        return self._entries[key]


class _RouterLogitProbe:
    """Largest |router logit| seen in evaluation since the last ``take()`` (forward hooks on every router)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from switchformer.moe.router import Router

        self.max_abs = 0.0
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, Router)]

    def _hook(self, module, args, output) -> None:
        if not module.training and output.logits_TE.numel():
            self.max_abs = max(self.max_abs, float(output.logits_TE.detach().abs().max()))

    def take(self) -> float | None:
        value, self.max_abs = self.max_abs, 0.0
        return value if self.handles else None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _run_key(cfg: RunConfig, precision: str) -> str:
    blob = json.dumps([to_dict(cfg), precision, PROTOCOL_VERSION, COOLDOWN_FRACTION], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _eval_point(ev: dict, probe: _RouterLogitProbe) -> dict:
    keep = ("step", "neg_log_perplexity", "val_loss", "drop_fraction", "router_entropy", "router_z_loss",
            "train_seconds", "tokens_seen")
    point = {k: ev[k] for k in keep if k in ev}
    logit = probe.take()
    if logit is not None:
        point["max_abs_router_logit"] = logit
    return point


def train_run(cfg: RunConfig, arm: str, precision: str, run_dir: Path, data: _DataCache,
              print_fn: Callable[[str], None] = print, save_checkpoint: bool = False, *,
              trainer_cls: type | None = None, prepare: Callable | None = None, key_extra: str = "") -> dict:
    """Train one run of an arm (or reuse its finished result) and return its result record; ``save_checkpoint``
    keeps the final weights (a source for fine-tuning). ``prepare(components)`` may change the components before
    training (a distilled student's teacher and initialisation), ``trainer_cls`` replaces ``Trainer``, and
    ``key_extra`` joins the run's reuse key (e.g. the teacher's)."""
    from switchformer.data import make_loader
    from switchformer.models import build_model
    from switchformer.models.presets import flops_per_sequence
    from switchformer.train.loop import Components, NonFiniteLossError, Trainer, resolve_device

    key = _run_key(cfg, precision) + key_extra + ("-saved" if save_checkpoint else "")
    previous = finished_result(run_dir, key, print_fn)
    if previous is not None:
        return previous
    result_file = run_dir / "result.json"

    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    corpus, tok, val_batches, summary = data.get(cfg)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=round_vocab(tok.vocab_size))
    torch.manual_seed(cfg.train.seed)
    model = build_model(model_cfg).to(device)
    # real bfloat16 (train.precision=bfloat16, set by arm_config) needs no rounding on top
    emulation = emulate_precision(model, "float32" if cfg.train.precision == "bfloat16" else precision)
    train_loader = make_loader(cfg.data, tok, corpus.train_texts, cfg.train.batch_size, "train", model_cfg.arch,
                               cache_dir=data.cache_dir)
    comp = Components(model, model_cfg, tok, train_loader, val_batches, summary)
    if prepare is not None:
        comp = prepare(comp)
    trainer = (trainer_cls or Trainer)(cfg, comp, run_dir, device, print_fn=lambda s: None)
    steps = cfg.train.steps
    cooldown = max(1, round(COOLDOWN_FRACTION * steps))

    def cool_down(optimizer, args, kwargs) -> None:  # after set_lr: scale this step's rate
        remaining = steps - trainer.state.step
        if remaining <= cooldown:
            for group in optimizer.param_groups:
                group["lr"] *= remaining / cooldown

    trainer.optimizer.register_step_pre_hook(cool_down)
    probe = _RouterLogitProbe(model)
    torch.manual_seed(cfg.train.seed)  # the dropout / jitter stream, as train() seeds it
    trainer.start()
    t0 = time.perf_counter()
    evals = [_eval_point(trainer.evaluate(), probe)]
    diverged_at = None
    stop = f"finished all {steps} steps"
    while trainer.state.step < steps:
        try:
            trainer.train_step(trainer.next_batches())
        except NonFiniteLossError as e:
            diverged_at, stop = trainer.state.step + 1, f"diverged: {e}"
            break
        step = trainer.state.step
        if step % cfg.train.log_every == 0 or step == steps:
            trainer.log()
        if step % cfg.train.eval_every == 0 or step == steps:
            evals.append(_eval_point(trainer.evaluate(), probe))
            if not math.isfinite(evals[-1]["neg_log_perplexity"]):
                diverged_at, stop = step, "diverged: non-finite validation loss"
                break
    if diverged_at is None:
        if save_checkpoint:
            trainer.save()
        trainer.finish(stop)
    else:
        trainer.close()
    probe.remove()
    emulation.remove()

    from switchformer.metrics import read_metrics

    train_recs = [{k: r.get(k) for k in ("step", "loss", "lm_loss", "grad_norm", "tokens_per_s", "drop_fraction")}
                  for r in read_metrics(run_dir, "train")]
    step0 = evals[0]["neg_log_perplexity"]
    final = evals[-1]["neg_log_perplexity"]
    if diverged_at is None and not final > step0:
        diverged_at, stop = steps, "diverged: final loss above its untrained value"
    diverged = diverged_at is not None
    tps = [r["tokens_per_s"] for r in train_recs if r.get("tokens_per_s")]
    drops = [r["drop_fraction"] for r in train_recs if r.get("drop_fraction") is not None]
    targets_length = getattr(train_loader, "targets_length", 0)
    result = {
        "key": key, "arm": arm, "seed": cfg.train.seed, "precision": precision,
        "config": to_dict(dataclasses.replace(cfg, model=model_cfg)), "run_dir": str(run_dir),
        "evals": evals, "train": train_recs, "step0_quality": step0,
        "final_quality": final if math.isfinite(final) else None,
        "quality": step0 if diverged else final, "diverged": diverged, "diverged_at": diverged_at, "stop": stop,
        "steps_done": trainer.state.step, "wall_seconds": time.perf_counter() - t0,
        "train_seconds": trainer.state.train_seconds,
        "tokens_per_s": statistics.median(tps[1:] if len(tps) > 2 else tps) if tps else None,
        "train_drop_fraction": mean(drops) if drops else None,
        "train_flops_per_step": 3 * cfg.train.batch_size * flops_per_sequence(
            model_cfg, cfg.data.input_length, targets_length),
    }
    result_file.write_text(json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------------------------------------ judging


def _by_seed(runs: Sequence[dict]) -> dict[int, float]:
    return {r["seed"]: r["quality"] for r in runs}


def _curve(runs: Sequence[dict]) -> list[tuple[int, float]]:
    """Mean quality over seeds at each evaluation step all seeds reached."""
    steps = sorted(set.intersection(*(set(e["step"] for e in r["evals"]) for r in runs))) if runs else []
    out = []
    for s in steps:
        vals = [e["neg_log_perplexity"] for r in runs for e in r["evals"] if e["step"] == s]
        out.append((s, mean(vals)))
    return out


def steps_to(runs: Sequence[dict], target: float) -> float | None:
    """First step at which the seed-mean quality curve reaches ``target`` (interpolated), or None."""
    from switchformer.train.compare import crossing

    curve = [{"step": s, "val_loss": -q} for s, q in _curve(runs)]
    return crossing(curve, -target, "step")


def judge_experiment(exp: Experiment, runs: Sequence[dict], fig12: dict | None = None) -> dict:
    """Sigma, per-arm summaries and every claim's verdict for the finished ``runs`` of ``exp``."""
    by_arm: dict[str, list[dict]] = {a.name: sorted((r for r in runs if r["arm"] == a.name),
                                                    key=lambda r: r["seed"]) for a in exp.arms}
    qualities = {a: [r["quality"] for r in rs] for a, rs in by_arm.items() if rs}
    sigma = pooled_std(list(qualities.values()))
    sigma_source = "pooled over this experiment's seeds"
    if sigma is None and fig12 and fig12.get("sigma") is not None:
        sigma, sigma_source = fig12["sigma"], "Fig. 12's pooled seed std (this experiment has one seed per arm)"
    elif sigma is None:
        sigma_source = "no repeated seeds here and no Fig. 12 result: the 0.005-nat floor"

    delta_sd = sd_source = None
    if exp.reference and all(by_arm.get(a) for a in exp.reference):
        a, b = (_by_seed(by_arm[x]) for x in exp.reference)
        common = sorted(set(a) & set(b))
        delta_sd, sd_source = mean([a[s] - b[s] for s in common]), f"{exp.reference[0]} - {exp.reference[1]}"
    elif fig12 and fig12.get("delta_sd") is not None:
        delta_sd, sd_source = fig12["delta_sd"], "Fig. 12's 8e - dense"

    arms = {}
    target = None
    if exp.reference and by_arm.get(exp.reference[1]):
        target = mean(qualities[exp.reference[1]])
    for a in exp.arms:
        rs = by_arm[a.name]
        if not rs:
            continue
        q = qualities[a.name]
        summary = {"seeds": [r["seed"] for r in rs], "qualities": q, "mean": mean(q), "std": sample_std(q),
                   "diverged": sum(r["diverged"] for r in rs), "x": a.x, "label": a.title, "precision": a.precision}
        for key in ("tokens_per_s", "train_drop_fraction", "train_flops_per_step", "peak_metric", "last_train_loss",
                    "last_val_loss", "teacher_quality", "kept_percent"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            summary[key] = mean(vals) if vals else None
        logits = [e["max_abs_router_logit"] for r in rs for e in r["evals"] if "max_abs_router_logit" in e]
        summary["max_abs_router_logit"] = max(logits) if logits else None
        zs = [r["evals"][-1].get("router_z_loss") for r in rs if r["evals"][-1].get("router_z_loss") is not None]
        summary["final_router_z_loss"] = mean(zs) if zs else None
        if target is not None:
            summary["steps_to_reference"] = steps_to(rs, target)
        arms[a.name] = summary
    if target is not None and arms.get(exp.reference[1], {}).get("steps_to_reference"):
        base_steps = arms[exp.reference[1]]["steps_to_reference"]
        for s in arms.values():
            s["step_speedup"] = base_steps / s["steps_to_reference"] if s.get("steps_to_reference") else None

    claims = []
    for c in exp.claims:
        rec = {"kind": c.kind, "arms": list(c.arms), "text": c.text, "paper": c.paper, "paper_delta": c.paper_delta,
               "expect": c.expect}
        if not all(by_arm.get(a) for a in c.arms):
            rec.update(verdict="NOT RUN", judgement=None)
            claims.append(rec)
            continue
        if c.kind == "sweep":
            xs = [exp.arm(a).x for a in c.arms]
            j = judge_sweep(xs, [mean(qualities[a]) for a in c.arms], sigma)
        else:
            a, b = (_by_seed(by_arm[x]) for x in c.arms)
            common = sorted(set(a) & set(b))
            qa, qb = [a[s] for s in common], [b[s] for s in common]
            if c.kind == "spread":
                j = judge_spread(qualities[c.arms[0]], qualities[c.arms[1]], sigma)
            else:
                fn = {"better": judge_better, "equivalent": judge_equivalent, "no_benefit": judge_no_benefit}[c.kind]
                j = fn(qa, qb, sigma)
            rec["seeds"] = common
        rec["verdict"], rec["judgement"] = j.verdict, j.to_dict()
        if c.kind in ("better", "equivalent", "no_benefit") and delta_sd:
            rec["delta_over_delta_sd"] = j.delta / delta_sd
            if c.paper_delta is not None and exp.paper_reference_delta:
                rec["paper_delta_over_delta_sd"] = c.paper_delta / exp.paper_reference_delta
        claims.append(rec)
    return {"sigma": sigma, "sigma_source": sigma_source, "delta_sd": delta_sd, "delta_sd_source": sd_source,
            "reference_quality": target, "arms": arms, "claims": claims}


# ------------------------------------------------------------------------------------------------ driver


def run_experiment(
    name: str, *, quick: bool = False, seeds: int | None = None, out_dir: str | Path | None = None,
    runs_dir: str | Path | None = None, steps: int | None = None, print_fn: Callable[[str], None] = print,
    bf16: str = "emulated",
) -> dict | None:
    """Run experiment ``name`` (every arm x seed), judge it, and write ``<out>/<name>.json``, ``.png`` and ``.md``.

    Args:
        name: a key of ``EXPERIMENTS``.
        quick: a very small model for a few dozen steps, one seed: a smoke test of the pipeline, not a result.
        seeds: seeds per arm (default: the experiment's registered count; 1 with ``quick``).
        out_dir: where the JSON, figure and markdown go (default ``docs/reproduction``; quick:
            ``runs/reproduce-quick``).
        runs_dir: where the training runs go (default ``runs/reproduce``; quick: ``<out_dir>/runs``).
        steps: override the step budget (tests).
        print_fn: progress lines.
        bf16: how the bfloat16 and selective-precision arms run: "emulated" (rounding in float32, any CPU) or
            "autocast" (real bfloat16 mixed precision, for a GPU; float32 arms are shared with the emulated runs).

    Returns:
        The experiment's result record, or None when it was skipped for a missing capability.
    """
    from switchformer.reproduce.report import write_outputs

    if bf16 not in BF16_BACKENDS:
        from switchformer.errors import ConfigError

        raise ConfigError(f"--bf16 must be one of {', '.join(BF16_BACKENDS)}, got {bf16!r}")
    exp = EXPERIMENTS[name]
    has_bf16_arms = any(a.precision != "float32" for a in exp.arms)
    if bf16 == "autocast" and has_bf16_arms and _device_name() == "cpu":
        print_fn(f"{name}: warning: --bf16 autocast on a CPU; without bfloat16 units this is far slower than the "
                 "emulation")
    missing = missing_requirements(exp)
    if missing:
        print_fn(f"{name}: {MISSING}; skipped ({exp.source}: {exp.title})")
        return None
    out = results_dir(out_dir, quick)
    runs_root = Path(runs_dir) if runs_dir is not None else (out / "runs" if quick else Path("runs/reproduce"))
    if seeds is None and quick:
        seeds = 1
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    data = _DataCache(runs_root / ".cache")
    plan = [(arm, s) for arm in exp.arms for s in range(exp.seeds_of(arm, seeds))]
    label = f" ({SMOKE_LABEL})" if quick else ""
    print_fn(f"== {name}: {exp.source}, {exp.title}{label}: {len(plan)} runs")
    t0 = time.perf_counter()
    runs = []
    if "finetune" in exp.requires:
        from switchformer.reproduce.finetuning import run_finetune_experiment

        runs = run_finetune_experiment(exp, plan, runs_root, data, quick=quick, print_fn=print_fn,
                                       train_run=train_run)
        plan = []
    if "distill" in exp.requires:
        from switchformer.reproduce.distillation import run_distill_experiment

        runs = run_distill_experiment(exp, plan, runs_root, data, quick=quick, print_fn=print_fn,
                                      train_run=train_run, arm_config=arm_config, steps=steps)
        plan = []
    for i, (arm, seed) in enumerate(plan, 1):
        cfg = arm_config(exp, arm.name, seed, quick=quick, steps=steps, bf16=bf16)
        cfg = apply_overrides(cfg, [f"out_dir={runs_root / name}"])
        r = train_run(cfg, arm.name, arm.precision, runs_root / name / f"{arm.name}-s{seed}", data, print_fn)
        flag = f", diverged at step {r['diverged_at']}" if r["diverged"] else ""
        print_fn(f"  [{i}/{len(plan)}] {arm.name} seed {seed}: neg log perplexity {r['quality']:.4f} after "
                 f"{r['steps_done']} steps ({r['wall_seconds']:.0f}s){flag}")
        runs.append(r)
    judged = judge_experiment(exp, runs, None if name == "fig12" else _fig12_judged(out, quick))
    steps_used = max((r["steps_done"] for r in runs), default=exp.steps)
    record = {
        "experiment": name, "title": exp.title, "source": exp.source, "factor": exp.factor, "quick": quick,
        "label": SMOKE_LABEL if quick else "result", "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "bf16": bf16 if has_bf16_arms else None, "device": _device_name(),
        "steps": steps_used, "seeds": sorted({r["seed"] for r in runs}), "wall_seconds": time.perf_counter() - t0,
        "base_config": to_dict(base_config(quick)), "experiment_overrides": list(exp.overrides),
        "arms": [{"name": a.name, "label": a.title, "overrides": list(a.overrides), "x": a.x,
                  "precision": a.precision, "seeds": exp.seeds_of(a, seeds)} for a in exp.arms],
        "judged": judged, "runs": runs,
    }
    write_outputs(record, out)
    for c in judged["claims"]:
        print_fn(f"  {c['verdict']:>12}  {c['text']}")
    print_fn(f"{name}: wrote {out / (name + '.json')}, {name}.png, {name}.md ({record['wall_seconds']:.0f}s)")
    if name == "fig12":
        # Experiments with one seed per arm take their sigma, and every experiment its Delta_SD, from Fig. 12:
        # results written before this one are judged again, so the verdicts do not depend on the run order.
        for other in EXPERIMENTS:
            if other != "fig12" and (out / f"{other}.json").is_file():
                rejudge_experiment(other, quick=quick, out_dir=out, print_fn=print_fn)
    return record


def _device_name() -> str:
    """What the runs train on (``train.device = "auto"``): the GPU's name, or ``cpu``."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def results_dir(out_dir: str | Path | None, quick: bool) -> Path:
    """Where an experiment's JSON, figure and markdown go: ``out_dir``, else ``docs/reproduction`` for full runs and
    ``runs/reproduce-quick`` for smoke tests."""
    return Path(out_dir) if out_dir is not None else Path("runs/reproduce-quick" if quick else "docs/reproduction")


def _fig12_judged(out: Path, quick: bool) -> dict | None:
    """The judged block of ``<out>/fig12.json`` when it exists and has the same quick flag, else None."""
    path = out / "fig12.json"
    if not path.is_file():
        return None
    try:
        prior = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return prior.get("judged") if bool(prior.get("quick")) == quick else None


def rejudge_experiment(
    name: str, *, quick: bool = False, out_dir: str | Path | None = None, print_fn: Callable[[str], None] = print,
) -> dict:
    """Judge the runs recorded in ``<out>/<name>.json`` again, without training, and rewrite its outputs.

    The verdicts then follow the current registered claims and the current Fig. 12 result (sigma for one-seed
    experiments, Delta_SD for the ratios); the runs, their creation time and wall time are kept as recorded.
    Raises ``ConfigError`` when the file is missing, unreadable, or of the other kind (quick vs full).
    """
    from switchformer.errors import ConfigError
    from switchformer.reproduce.report import write_outputs

    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    out = results_dir(out_dir, quick)
    path = out / f"{name}.json"
    kind = "--quick " if quick else ""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--rejudge needs a written result, but {path} does not exist; run "
                          f"'switchformer reproduce {name} {kind}--out {out}' first") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path} ({e}); run 'switchformer reproduce {name} {kind}' again") from None
    if bool(record.get("quick")) != quick:
        raise ConfigError(f"{path} holds a {'quick' if record.get('quick') else 'full'} result; "
                          f"{'drop' if quick else 'add'} --quick to re-judge it")
    exp = EXPERIMENTS[name]
    record["judged"] = judge_experiment(exp, record["runs"], None if name == "fig12" else _fig12_judged(out, quick))
    record["rejudged"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write_outputs(record, out)
    verdicts = "; ".join(f"{c['text']}: {c['verdict']}" for c in record["judged"]["claims"])
    sigma = record["judged"]["sigma"]
    sigma_text = "the 0.005-nat floor" if sigma is None else f"{sigma:.4f}"
    print_fn(f"{name}: re-judged {len(record['runs'])} recorded runs (sigma {sigma_text}): {verdicts}")
    return record


def expand_names(names: Sequence[str]) -> list[str]:
    """Experiment names in run order; ``all`` is every registered one. Unknown names raise ``ConfigError``."""
    from switchformer.errors import ConfigError

    if not names:
        raise ConfigError(f"name one or more experiments, or 'all': {', '.join(EXPERIMENTS)} (--list describes them)")
    out: list[str] = []
    for n in names:
        chosen = list(EXPERIMENTS) if n == "all" else [n]
        for c in chosen:
            if c not in EXPERIMENTS:
                raise ConfigError(f"unknown experiment {n!r}; choose from {', '.join(EXPERIMENTS)} or 'all'")
            if c not in out:
                out.append(c)
    return out


def list_text() -> str:
    """What ``switchformer reproduce --list`` prints: each experiment, its budget and its registered directions."""
    lines = []
    for name, exp in EXPERIMENTS.items():
        runs = sum(exp.seeds_of(a) for a in exp.arms)
        status = f"  [{MISSING}]" if missing_requirements(exp) else ""
        lines.append(f"{name:<8} {exp.source}: {exp.title}{status}")
        lines.append(f"         {len(exp.arms)} arms x {exp.seeds} seed(s) ({runs} runs), {exp.steps} steps each; "
                     f"factor: {exp.factor}")
        for c in exp.claims:
            lines.append(f"         - {c.text} ({c.paper})")
    return "\n".join(lines)


def run_suite(
    names: Sequence[str], *, quick: bool = False, seeds: int | None = None, out_dir: str | Path | None = None,
    print_fn: Callable[[str], None] = print, rejudge: bool = False, bf16: str = "emulated",
) -> dict[str, dict | None]:
    """Run the named experiments (or ``all``) in registry order; skipped ones map to None.

    With ``rejudge``, nothing trains: each named experiment's recorded runs are judged again
    (``rejudge_experiment``); ``all`` then means every experiment with a written result.
    """
    chosen = expand_names(names)
    if rejudge:
        if seeds is not None:
            from switchformer.errors import ConfigError

            raise ConfigError("--rejudge judges the recorded runs again and trains nothing; drop --seeds")
        out = results_dir(out_dir, quick)
        if "all" in names:
            chosen = [n for n in chosen if (out / f"{n}.json").is_file()]
        return {n: rejudge_experiment(n, quick=quick, out_dir=out, print_fn=print_fn) for n in chosen}
    results = {}
    for name in chosen:
        results[name] = run_experiment(name, quick=quick, seeds=seeds, out_dir=out_dir, print_fn=print_fn,
                                       bf16=bf16)
    ran = [n for n, r in results.items() if r is not None]
    skipped = [n for n, r in results.items() if r is None]
    print_fn(f"reproduce: ran {', '.join(ran) or 'nothing'}" + (f"; skipped {', '.join(skipped)} ({MISSING})"
                                                               if skipped else ""))
    if quick and ran:
        print_fn("--quick runs are smoke tests of the pipeline, not results")
    return results
