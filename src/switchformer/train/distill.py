"""Distilling a Switch model into a dense student (paper §4.2, Tables 6-8), through the training loop's own steps.

    switchformer distill runs/switch                                  # student: the FLOP-matched dense model
    switchformer distill runs/switch --student tiny train.steps=300   # a preset (or a TOML recipe) as student
    switchformer distill runs/switch-stdlib-name --task stdlib-name   # a fine-tuned teacher, on its task

``distill(teacher)`` trains two dense students on the same batches for the same number of steps and reports the
paper's measure of how much of the teacher's quality the distilled one keeps:

1. the **distilled student**. Its weights that have a same-named, same-shaped weight in the teacher start as the
   teacher's: embeddings, attention, layer norms and the dense FFNs (paper §4.2: "we initialize the dense model with
   the non-expert weights", Table 6's best row). The FFNs of the blocks that are Switch layers in the teacher have no
   dense counterpart there; they keep the student's own random init (``distill.expert_ffn_init=student``, the
   paper's recipe, which copies only non-expert weights), or start at the mean of the teacher's experts
   (``distill.expert_ffn_init=mean``, an option the paper does not test). It trains on

       loss = (1 - f) * CE(student, labels) + f * T^2 * CE(softmax(teacher / T), log_softmax(student / T))

   with f = ``distill.soft_fraction`` = 0.25 (paper Table 6: "0.25 of teacher probabilities and 0.75 of ground
   truth") and T = ``distill.temperature`` = 1.0 (the paper states none; the T^2 factor keeps the soft gradients'
   scale independent of T, as Mesh TensorFlow's ``StudentTeacher`` does). The teacher runs in eval mode (no
   dropout, no router jitter, the evaluation capacity factor) without gradients, on the same micro-batch;
2. the **same student from scratch**: its own random init and the labels alone (f = 0), or an existing run given as
   ``baseline``, re-evaluated on the same validation batches.

The teacher, both students and the measure are written to ``<out>/distill_results.json`` and ``.md`` (and printed):
the share of the teacher's gain over the scratch model that the student keeps,

    kept = (Q_student - Q_scratch) / (Q_teacher - Q_scratch)

with Q the negative log perplexity on the same validation batches (paper Table 6 keeps 29%, Table 7 27-37%). With
``task`` (a fine-tuning task, paper Table 8) the students are trained on the task's examples with the fine-tuning
defaults of ``switchformer finetune``, scored by its metric, and ``kept`` is also given for the metric.

Everything except the student's model comes from the teacher's run config (data, tokenizer, optimizer, budget),
then the command line's overrides (``model.*`` overrides change the student). A run directory's teacher brings its
corpus and tokenizer; a transformers-format teacher brings its ``spiece.model``, used on the configured corpus.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from switchformer.config import IGNORE_INDEX, ModelConfig, RunConfig, apply_overrides, load_toml, round_vocab
from switchformer.errors import ConfigError, RunError
from switchformer.train.finetune import FinetuneComponents, FinetuneTrainer, load_source
from switchformer.train.loop import (
    Trainer,
    TrainResult,
    _autocast,
    evaluate,
    label_count,
    lm_nll,
    resolve_device,
    train,
)

RESULTS_JSON = "distill_results.json"
RESULTS_MD = "distill_results.md"
STUDENT_DIR = "student"
SCRATCH_DIR = "scratch"

PAPER_TABLE6 = {"T5-Base (scratch)": -1.636, "Switch-Base (teacher)": -1.444, "distillation": -1.631,
                "+ init non-expert weights": -1.598, "+ 0.75 hard / 0.25 soft mix": -1.580,
                "init non-expert weights, no distillation": -1.639}
"""Paper Table 6: negative log perplexity of a T5-Base student of a 3.8B-parameter Switch-Base teacher."""
PAPER_KEPT = {"distillation": 3, "+ init non-expert weights": 20, "+ 0.75 hard / 0.25 soft mix": 29}
"""Paper Table 6: percent of the teacher's gain kept."""


# ----------------------------------------------------------------------------------------------------------------
# The loss


def soft_nll(student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: dict[str, torch.Tensor],
             temperature: float = 1.0) -> torch.Tensor:
    """Summed cross-entropy of the student's distribution against the teacher's probabilities, times T^2, over the
    positions ``lm_nll`` counts (real labels; a decoder-only model's position t predicts t + 1).

    Per position: T^2 * sum_v -softmax(teacher / T)_v * log_softmax(student / T)_v, in float32 (or wider).
    """
    labels = batch["labels"]
    if "decoder_input_ids" not in batch:
        student_logits, teacher_logits, labels = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
    real = labels != IGNORE_INDEX
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits[real].to(dtype) / temperature
    t = teacher_logits[real].to(dtype) / temperature
    return -(F.softmax(t, dim=-1) * F.log_softmax(s, dim=-1)).sum() * temperature**2


class _DistillSteps:
    """The distillation objective as the ``Trainer``'s ``batch_loss`` step (mixed into ``Trainer`` and
    ``FinetuneTrainer``); the loop, logging, checkpoints and evaluation stay the trainer's."""

    cfg: RunConfig
    comp: Any
    device: torch.device
    tc: Any
    layout: Any

    def batch_loss(self, out: Any, batch: dict[str, torch.Tensor],
                   global_batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ground-truth CE, distillation loss) of one micro-batch: ``(1 - f) * CE + f * soft CE`` (+ the
        student's auxiliary losses, if it has Switch layers). The logged ``lm_loss`` is the ground-truth CE."""
        dc = self.cfg.distill
        per_token = self.layout.shards / max(label_count(global_batch), 1)
        hard = lm_nll(out.logits, batch) * per_token
        loss = hard
        teacher = getattr(self.comp, "teacher", None)
        if dc.soft_fraction > 0 and teacher is not None:
            with torch.no_grad(), _autocast(self.device, self.tc.precision):
                teacher_logits = teacher(**batch).logits
            soft = soft_nll(out.logits, teacher_logits, batch, dc.temperature) * per_token
            loss = (1.0 - dc.soft_fraction) * hard + dc.soft_fraction * soft
        if getattr(out, "aux_loss", None) is not None:
            loss = loss + out.aux_loss
        return hard, loss


class DistillTrainer(_DistillSteps, Trainer):
    """``Trainer`` whose micro-batch loss is the distillation objective (pretraining data)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.layout.world != 1:
            raise RunError("switchformer distill runs on one process; start it without torchrun / --nproc")


class DistillTaskTrainer(_DistillSteps, FinetuneTrainer):
    """``FinetuneTrainer`` (task metrics, best checkpoint, results) whose loss is the distillation objective."""


@dataclass
class DistillComponents(FinetuneComponents):
    """A student's components plus the teacher (None: no soft targets)."""

    teacher: torch.nn.Module | None = None


# ----------------------------------------------------------------------------------------------------------------
# Initialisation from the teacher


@dataclass
class InitReport:
    """What ``init_from_teacher`` did, by parameter name."""

    copied: list[str] = field(default_factory=list)
    """Student weights set to the teacher's same-named, same-shaped weight."""
    expert_mean: list[str] = field(default_factory=list)
    """Student FFN weights set to the mean of the teacher's experts at the same block."""
    own_init: list[str] = field(default_factory=list)
    """Student weights left at the student's own random init (no same-shaped teacher weight)."""

    def summary(self) -> str:
        text = f"{len(self.copied)} weights copied from the teacher"
        if self.expert_mean:
            text += f", {len(self.expert_mean)} set to the mean of the teacher's experts"
        return text + f", {len(self.own_init)} left at the student's init"


_EXPERT_OF_DENSE = {"wi.weight": "experts.w_in", "wo.weight": "experts.w_out", "wi_0.weight": "experts.w_gate",
                    "wi_1.weight": "experts.w_in"}
"""Dense FFN weight name -> the Switch layer's stacked expert weight (experts x the dense weight's shape); a GEGLU
FFN's gate (wi_0) and input (wi_1) projections are the experts' w_gate and w_in."""


@torch.no_grad()
def init_from_teacher(student: torch.nn.Module, teacher_state: dict[str, torch.Tensor],
                      expert_ffn_init: str = "student") -> InitReport:
    """Set the student's weights from the teacher (paper §4.2, Table 6: "initializing the student with the
    non-expert weights"): every student weight with a same-named, same-shaped teacher weight is copied; FFNs of
    blocks that are Switch layers in the teacher keep the student's init (``"student"``) or take the mean of the
    teacher's experts (``"mean"``)."""
    if expert_ffn_init not in ("student", "mean"):
        raise ConfigError(f"distill.expert_ffn_init = {expert_ffn_init!r}; use 'student' or 'mean'")
    report = InitReport()
    for name, param in student.state_dict().items():
        source = teacher_state.get(name)
        if source is not None and source.shape == param.shape:
            param.copy_(source)
            report.copied.append(name)
            continue
        prefix, _, leaf = name.rpartition(".mlp.")
        expert_name = f"{prefix}.mlp.{_EXPERT_OF_DENSE.get(leaf, '')}"
        experts = teacher_state.get(expert_name) if expert_ffn_init == "mean" and leaf in _EXPERT_OF_DENSE else None
        if experts is not None and experts.shape[1:] == param.shape:
            param.copy_(experts.float().mean(0).to(param.dtype))
            report.expert_mean.append(name)
        else:
            report.own_init.append(name)
    return report


# ----------------------------------------------------------------------------------------------------------------
# Configs


def _student_model(teacher_cfg: RunConfig, student: str | None) -> ModelConfig:
    """The student's model config: the teacher's FLOP-matched dense counterpart (every block dense), a preset, or
    a TOML recipe's model section; always with the teacher's vocabulary."""
    from switchformer.train.compare import dense_counterpart

    vocab = teacher_cfg.model.vocab_size
    if not student:
        return dense_counterpart(teacher_cfg).model
    from switchformer.models.presets import PRESETS, get_preset

    if student in PRESETS:
        model = get_preset(student)
    elif student.endswith(".toml"):
        if not Path(student).is_file():
            raise ConfigError(f"--student {student}: no such file; pass a preset name ({', '.join(list(PRESETS)[:3])}"
                              "...) or a TOML recipe")
        model = load_toml(student).model
    else:
        raise ConfigError(f"--student {student!r} is neither a preset (switchformer info lists them) nor a .toml "
                          "recipe")
    if model.arch != teacher_cfg.model.arch:
        raise ConfigError(f"the student is {model.arch} but the teacher {teacher_cfg.model.arch}; both must share "
                          "the architecture (and the tokenizer)")
    return dataclasses.replace(model, vocab_size=vocab, pad_token_id=teacher_cfg.model.pad_token_id,
                               eos_token_id=teacher_cfg.model.eos_token_id,
                               decoder_start_token_id=teacher_cfg.model.decoder_start_token_id)


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-.")
    return out or "model"


def distill_config(teacher_cfg: RunConfig, teacher: str, *, student: str | None = None, task: str | None = None,
                   tokenizer_file: str | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The distilled student's run config: the teacher's run config with the student's model, the tokenizer file
    of the teacher (pretraining data), ``distill.teacher``, the fine-tuning defaults when ``task`` is given, then
    ``overrides``; named ``<teacher name>-distill`` unless an override names it."""
    from switchformer.train.finetune import finetune_config

    cfg = dataclasses.replace(teacher_cfg, model=_student_model(teacher_cfg, student),
                              distill=dataclasses.replace(teacher_cfg.distill, teacher=teacher),
                              parallel=type(teacher_cfg.parallel)())
    if task is not None:
        cfg = finetune_config(cfg, teacher, task)
    elif tokenizer_file is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tokenizer_file)))
    cfg = dataclasses.replace(cfg, name=_slug(f"{teacher_cfg.name}-distill"))
    return apply_overrides(cfg, list(overrides))


def scratch_config(cfg: RunConfig) -> RunConfig:
    """The same student trained from scratch: its own random init, the labels alone, the same data and budget."""
    return apply_overrides(cfg, ["distill.soft_fraction=0.0", "distill.init=none"])


def _tokenizer_file(source: str) -> Path | None:
    p = Path(os.path.expanduser(source))
    for candidate in (p / "tokenizer" / "spiece.model", p.parent.parent / "tokenizer" / "spiece.model",
                      p / "spiece.model"):
        if candidate.is_file():
            return candidate
    return None


# ----------------------------------------------------------------------------------------------------------------
# Running one student


def build_student(cfg: RunConfig, device: torch.device, tokenizer: Any, teacher: torch.nn.Module | None,
                  teacher_state: dict[str, torch.Tensor] | None,
                  print_fn: Callable[[str], None] = print) -> tuple[DistillComponents, InitReport | None]:
    """The student's model (initialised from ``train.seed``, then from the teacher when ``distill.init``), data
    and loaders: the pretraining corpus of ``cfg.data``, or the task of ``cfg.finetune`` when it has a source."""
    from switchformer.models import build_model
    from switchformer.train.loop import build_components

    if cfg.finetune.source:
        from switchformer.train.finetune import build_finetune_components

        base = build_finetune_components(cfg, device, tokenizer, None, print_fn)
        torch.manual_seed(cfg.train.seed)
        base.model = build_model(base.model_cfg).to(device)  # the task pipeline leaves the weights to a loader
    else:
        base = build_components(cfg, device)
        if base.model_cfg.vocab_size != cfg.model.vocab_size:
            raise ConfigError(f"the teacher's tokenizer gives {base.model_cfg.vocab_size} embedding rows but the "
                              f"teacher has {cfg.model.vocab_size}; distill needs the tokenizer the teacher was "
                              "trained with (data.tokenizer)")
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    comp = DistillComponents(**fields, teacher=teacher if cfg.distill.soft_fraction > 0 else None)
    report = None
    if cfg.distill.init == "non_expert" and teacher_state is not None:
        report = init_from_teacher(comp.model, teacher_state, cfg.distill.expert_ffn_init)
        if not report.copied:
            raise ConfigError("no student weight matches a teacher weight by name and shape: distill.init="
                              "non_expert needs a student with the teacher's d_model, heads and layers (or use "
                              "distill.init=none)")
    return comp, report


def _run_student(cfg: RunConfig, run_dir: Path, tokenizer: Any, teacher: torch.nn.Module | None,
                 teacher_state: dict[str, torch.Tensor] | None,
                 print_fn: Callable[[str], None]) -> tuple[TrainResult, DistillComponents, InitReport | None]:
    device = resolve_device(cfg.train.device)
    comp, report = build_student(cfg, device, tokenizer, teacher, teacher_state, print_fn)
    if report is not None:
        print_fn(f"student init: {report.summary()}")
    trainer_cls = DistillTaskTrainer if cfg.finetune.source else DistillTrainer
    result = train(cfg, run_dir=run_dir, components=comp, print_fn=print_fn, trainer_cls=trainer_cls)
    return result, comp, report


# ----------------------------------------------------------------------------------------------------------------
# The measure and the report


def kept_fraction(student: float, scratch: float, teacher: float) -> float | None:
    """(student - scratch) / (teacher - scratch) for a quality where higher is better (paper Table 6's "% of the
    quality gain"); None when the teacher is no better than the scratch model (nothing to keep)."""
    gain = teacher - scratch
    if not math.isfinite(gain) or gain <= 0:
        return None
    return (student - scratch) / gain


def _row(rec: dict, metric: str | None = None) -> dict:
    out = {"val_loss": rec["val_loss"], "neg_log_perplexity": -rec["val_loss"]}
    if metric is not None and metric in rec:
        out[metric] = rec[metric]
    return out


def results_markdown(results: dict) -> str:
    """The teacher, the distilled student and the scratch student side by side, and the share kept."""
    metric = results.get("metric")
    head = "| model | parameters | steps | val loss | neg log perplexity |" + (f" {metric} |" if metric else "")
    rule = "|---|---:|---:|---:|---:|" + ("---:|" if metric else "")
    rows = []
    for key, label in (("teacher", "teacher (Switch)"), ("scratch", "dense from scratch"),
                       ("student", "distilled dense student")):
        r = results[key]
        steps = "-" if r["steps"] is None else r["steps"]
        rows.append(f"| {label} | {r['parameters']:,} | {steps} | {r['val_loss']:.4f} | "
                    f"{r['neg_log_perplexity']:.4f} |" + (f" {r.get(metric, float('nan')):.2f} |" if metric else ""))
    kept = results["kept_percent"]
    lines = [f"Distillation of {results['teacher']['source']} ({results['data']}); "
             f"{results['settings']['soft_fraction']:g} soft / {1 - results['settings']['soft_fraction']:g} hard, "
             f"temperature {results['settings']['temperature']:g}, init {results['settings']['init']}", "",
             head, rule, *rows, ""]
    lines.append("share of the teacher's gain over the scratch model that the student keeps: "
                 + (f"{kept:.1f}% (neg log perplexity)" if kept is not None else
                    "undefined (the teacher is no better than the scratch model)")
                 + (f"; {results['kept_percent_metric']:.1f}% ({metric})"
                    if metric and results.get("kept_percent_metric") is not None else ""))
    lines.append("paper (Table 6, T5-Base student of Switch-Base): 29% kept with init + 0.75/0.25 mix; Table 7: "
                 "27-37% for 1.1B-14.7B teachers")
    return "\n".join(lines) + "\n"


def _unique_dir(base: Path) -> Path:
    if not base.exists():
        return base
    i = 2
    while Path(f"{base}-{i}").exists():
        i += 1
    return Path(f"{base}-{i}")


@dataclass
class DistillResult:
    """What ``distill`` returns: the output folder and the results written to ``distill_results.json``."""

    out_dir: Path
    results: dict
    student: TrainResult | None = None
    scratch: TrainResult | None = None


def _evaluate_model(model: torch.nn.Module, comp: DistillComponents, cfg: RunConfig, device: torch.device) -> dict:
    """Validation loss (and the task's metrics) of ``model`` on the student's validation batches / examples."""
    ev = evaluate(model, comp.val_batches, device, cfg.train.precision)
    if comp.task is not None:
        from switchformer.train.finetune import score

        scores, _ = score(model, comp.tokenizer, comp.validation, comp.task.metrics,
                          batch_size=cfg.train.batch_size, max_new_tokens=cfg.finetune.target_length, device=device)
        ev.update(scores)
    return ev


def _quality(result: TrainResult, run_dir: Path, task: bool) -> dict:
    """The record a student is compared by: the final evaluation (pretraining), or the best one (a task, as
    ``switchformer finetune`` reports: the paper's peak validation score)."""
    if task:
        rec = json.loads((run_dir / "finetune_results.json").read_text(encoding="utf-8"))
        return rec["best"] or rec["last"]
    return result.final_eval


def distill(teacher: str, *, student: str | None = None, task: str | None = None, overrides: Sequence[str] = (),
            baseline: str | Path | None = None, out_dir: str | Path | None = None,
            print_fn: Callable[[str], None] = print) -> DistillResult:
    """Distil ``teacher`` into a dense student, train (or re-evaluate) the same student from scratch, and report
    the share of the teacher's gain the student keeps (see the module docstring).

    Args:
        teacher: a run directory (or a checkpoint directory in one) or a transformers-format directory.
        student: None (the teacher's FLOP-matched dense counterpart), a preset name, or a TOML recipe (its model).
        task: a fine-tuning task (as ``switchformer finetune --task``); None distils on the pretraining corpus.
        overrides: dotted overrides of the student's run config (``distill.*``, ``train.*``, ``model.*`` ...).
        baseline: a finished run of the dense student from scratch to re-evaluate instead of training one.
        out_dir: the output folder (default ``<out_dir>/<teacher name>-distill``, suffixed -2, -3... if taken).
        print_fn: where progress lines go.

    Raises:
        ConfigError, RunError, CheckpointError, DataError: bad arguments, teacher, baseline or data (one line).
    """
    from switchformer.models import build_model

    if not teacher:
        raise ConfigError("distill needs TEACHER: a run directory or a transformers-format directory, e.g. "
                          "switchformer distill runs/switch")
    if not Path(os.path.expanduser(teacher)).is_dir():
        raise RunError(f"teacher {teacher}: no such directory; pass a run directory (runs/<name>) or a "
                       "transformers-format directory (config.json, weights, spiece.model)")
    if baseline is not None and not (Path(baseline) / "config.toml").is_file():
        raise RunError(f"--baseline {baseline} is not a run directory (no config.toml); pass a finished run of the "
                       "dense student from scratch")
    src = load_source(teacher)
    if not src.cfg.model.is_sparse and not student:
        raise ConfigError(f"the teacher {teacher} has no Switch layer, so its dense counterpart is itself; pass a "
                          "Switch teacher, or a smaller student with --student")
    cfg = distill_config(src.cfg, teacher, student=student, task=task, tokenizer_file=_tokenizer_file(teacher),
                         overrides=overrides)
    if cfg.model.is_sparse:
        print_fn("note: the student has Switch layers; distillation usually targets a dense model")
    if cfg.train.max_minutes > 0:
        # the budget is the step count: a wall-clock cut-off would give the two students different step counts
        print_fn(f"distill: ignoring train.max_minutes={cfg.train.max_minutes:g}; both students train "
                 f"{cfg.train.steps} steps")
        cfg = apply_overrides(cfg, ["train.max_minutes=0"])
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    out = Path(out_dir) if out_dir is not None else _unique_dir(Path(cfg.out_dir) / cfg.name)

    teacher_model = build_model(src.cfg.model, init=False)
    teacher_model.load_state_dict(src.state_dict)
    teacher_model.to(device).eval().requires_grad_(False)
    print_fn(f"distilling {src.description} into a dense student ({cfg.distill.soft_fraction:g} soft targets, "
             f"temperature {cfg.distill.temperature:g}, init {cfg.distill.init}) -> {out}")

    t0 = time.perf_counter()
    student_result, comp, report = _run_student(cfg, out / STUDENT_DIR, src.tokenizer, teacher_model,
                                                src.state_dict, print_fn)
    is_task = comp.task is not None
    student_q = _quality(student_result, out / STUDENT_DIR, is_task)
    metric = comp.task.metric if is_task else None

    scratch_result = None
    if baseline is None:
        print_fn(f"== the same student from scratch -> {out / SCRATCH_DIR}")
        scratch_cfg = scratch_config(cfg)
        scratch_result, _, _ = _run_student(scratch_cfg, out / SCRATCH_DIR, src.tokenizer, None, None, print_fn)
        scratch_q = _quality(scratch_result, out / SCRATCH_DIR, is_task)
        scratch_steps, scratch_source = scratch_result.step, str(out / SCRATCH_DIR)
    else:
        from switchformer.train.runs import load_run

        run = load_run(baseline, device)
        if dataclasses.replace(run.cfg.model, vocab_size=cfg.model.vocab_size) != cfg.model:
            print_fn(f"warning: the baseline's model differs from the student's ({baseline})")
        scratch_q = _evaluate_model(run.model, comp, cfg, device)
        scratch_steps, scratch_source = run.step, str(baseline)
        if scratch_steps != student_result.step:
            print_fn(f"warning: the baseline trained {scratch_steps} steps, the student {student_result.step}")
    teacher_q = _evaluate_model(teacher_model, comp, cfg, device)

    def params(model_cfg: ModelConfig) -> int:
        return sum(p.numel() for p in build_model(model_cfg, init=False, device="meta").parameters())

    student_cfg = dataclasses.replace(cfg.model, vocab_size=round_vocab(cfg.model.vocab_size))
    results = {
        "teacher": {"source": str(teacher), "parameters": params(src.cfg.model), "steps": None,
                    "experts": src.cfg.model.moe.num_experts, **_row(teacher_q, metric)},
        "student": {"run_dir": str(out / STUDENT_DIR), "parameters": params(student_cfg),
                    "steps": student_result.step, **_row(student_q, metric)},
        "scratch": {"run_dir": scratch_source, "parameters": params(student_cfg), "steps": scratch_steps,
                    **_row(scratch_q, metric)},
        "kept_percent": None, "kept_percent_metric": None, "metric": metric,
        "data": f"task {cfg.finetune.task}" if is_task else f"corpus {cfg.data.corpus}",
        "settings": {"soft_fraction": cfg.distill.soft_fraction, "temperature": cfg.distill.temperature,
                     "init": cfg.distill.init, "expert_ffn_init": cfg.distill.expert_ffn_init,
                     "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "lr": cfg.optim.lr,
                     "seed": cfg.train.seed},
        "init": None if report is None else {"copied": len(report.copied), "expert_mean": len(report.expert_mean),
                                             "own_init": report.own_init},
        "validation_tokens": teacher_q.get("val_tokens"), "wall_seconds": time.perf_counter() - t0,
        "paper": {"table6_neg_log_perplexity": PAPER_TABLE6, "table6_kept_percent": PAPER_KEPT,
                  "table7_kept_percent": {"1.1B": 37, "2.0B": 32, "3.8B": 30, "7.4B": 27, "14.7B": 28}},
    }
    kept = kept_fraction(results["student"]["neg_log_perplexity"], results["scratch"]["neg_log_perplexity"],
                         results["teacher"]["neg_log_perplexity"])
    results["kept_percent"] = None if kept is None else 100 * kept
    if metric is not None and all(metric in results[k] for k in ("student", "scratch", "teacher")):
        kept_m = kept_fraction(results["student"][metric], results["scratch"][metric], results["teacher"][metric])
        results["kept_percent_metric"] = None if kept_m is None else 100 * kept_m
    text = results_markdown(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=1) + "\n")
    (out / RESULTS_MD).write_text(text)
    print_fn(text)
    return DistillResult(out, results, student_result, scratch_result)


__all__ = ["DistillTrainer", "DistillTaskTrainer", "distill", "distill_config", "init_from_teacher",
           "kept_fraction", "soft_nll"]
