"""Tables 6-7's protocol: pre-train a Switch-8 teacher once, then train every dense student arm with the objective
and initialisation of ``switchformer distill`` (paper §4.2).

The teacher is the shared base config with 8 experts, pre-trained from seed 0 for the experiment's budget (its
final checkpoint kept). Each arm is a dense student (the teacher's FLOP-matched counterpart: every block dense) whose
``distill.*`` overrides pick the recipe: soft targets or not, initialisation of the non-expert weights from the
teacher or not, the hard/soft mix. Students train with the runner's protocol (the same seeds, data order,
evaluation batches and cool-down as every other experiment) through ``switchformer.train.distill.DistillTrainer``,
so the teacher's soft targets come from the same micro-batches.

Each run also records the teacher's quality on the same evaluation batches and the share of the teacher's gain it
keeps, (Q_run - Q_scratch) / (Q_teacher - Q_scratch), against the scratch arm of the same seed (paper Table 6).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from switchformer.config import RunConfig, apply_overrides
from switchformer.reproduce.registry import Experiment, base_config


def _teacher(exp: Experiment, runs_root: Path, data, *, quick: bool, steps: int | None,
             print_fn: Callable[[str], None], train_run: Callable[..., dict]) -> tuple[Path, dict]:
    n = steps if steps is not None else (base_config(quick).train.steps if quick else exp.steps)
    cfg = apply_overrides(base_config(quick), [*exp.extra["teacher"], f"train.steps={n}", "train.seed=0",
                                               "data.seed=0", "name=teacher", f"out_dir={runs_root / exp.name}"])
    run_dir = runs_root / exp.name / "teacher"
    r = train_run(cfg, "teacher", "float32", run_dir, data, print_fn, save_checkpoint=True)
    print_fn(f"  teacher (Switch, {cfg.model.moe.num_experts} experts): neg log perplexity {r['quality']:.4f} after "
             f"{r['steps_done']} steps")
    return run_dir, r


def run_distill_experiment(exp: Experiment, plan: list, runs_root: Path, data, *, quick: bool,
                           print_fn: Callable[[str], None], train_run: Callable[..., dict],
                           arm_config: Callable[..., RunConfig], steps: int | None = None) -> list[dict]:
    """Every (arm, seed) of the distillation experiment after pre-training (or reusing) its teacher with the
    runner's ``train_run``, each student's config from the runner's ``arm_config`` (both passed in: the runner
    imports this module); each run record gets ``teacher_quality`` and ``kept_percent``."""
    from switchformer.models import build_model
    from switchformer.train.distill import DistillComponents, DistillTrainer, init_from_teacher, kept_fraction
    from switchformer.train.finetune import load_source

    teacher_dir, teacher_run = _teacher(exp, runs_root, data, quick=quick, steps=steps, print_fn=print_fn,
                                        train_run=train_run)
    src = load_source(str(teacher_dir))
    teacher = build_model(src.cfg.model, init=False)
    teacher.load_state_dict(src.state_dict)
    teacher.eval().requires_grad_(False)

    runs = []
    for i, (arm, seed) in enumerate(plan, 1):
        cfg = arm_config(exp, arm.name, seed, quick=quick, steps=steps)
        cfg = apply_overrides(cfg, [f"out_dir={runs_root / exp.name}", f"distill.teacher={teacher_dir}"])

        def prepare(comp, cfg=cfg):
            fields = {name: getattr(comp, name) for name in comp.__dataclass_fields__}
            dc = cfg.distill
            out = DistillComponents(**fields, teacher=teacher.to(next(comp.model.parameters()).device)
                                    if dc.soft_fraction > 0 else None)
            if dc.init == "non_expert":
                init_from_teacher(out.model, src.state_dict, dc.expert_ffn_init)
            return out

        r = train_run(cfg, arm.name, arm.precision, runs_root / exp.name / f"{arm.name}-s{seed}", data, print_fn,
                      trainer_cls=DistillTrainer, prepare=prepare, key_extra=f"-teacher{teacher_run['key']}")
        print_fn(f"  [{i}/{len(plan)}] {arm.name} seed {seed}: neg log perplexity {r['quality']:.4f} after "
                 f"{r['steps_done']} steps ({r['wall_seconds']:.0f}s)")
        runs.append(r)
    reference = exp.extra.get("reference_arm", "scratch")
    scratch = {r["seed"]: r["quality"] for r in runs if r["arm"] == reference}
    for r in runs:
        r["teacher_quality"] = teacher_run["quality"]
        kept = kept_fraction(r["quality"], scratch[r["seed"]], teacher_run["quality"]) if r["seed"] in scratch \
            else None
        r["kept_percent"] = None if kept is None else 100 * kept
    return runs
