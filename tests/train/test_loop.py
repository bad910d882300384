"""The training loop on configs/tiny_test.toml: loss falls, non-finite detection names the layer, exact resume
after SIGKILL, a rejected resume writes nothing, the time budget is per invocation, evaluation metrics are
consistent."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from switchformer import checkpoint as ck
from switchformer.config import apply_overrides, load_toml
from switchformer.errors import RunError
from switchformer.metrics import read_metrics
from switchformer.train.loop import (
    KILL_AFTER_STEP_ENV,
    NonFiniteLossError,
    Trainer,
    build_components,
    evaluate,
    train,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_test.toml"


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """One out_dir for the module, so the tiny tokenizer is trained once and cached in <out_dir>/.cache."""
    return tmp_path_factory.mktemp("runs")


def _cfg(out_dir, *overrides):
    return apply_overrides(load_toml(TINY), [f"out_dir={out_dir}", "train.num_threads=1", *overrides])


def test_loss_decreases_and_run_dir(out_dir):
    cfg = _cfg(out_dir, "name=learn", "train.steps=24", "train.eval_every=12", "train.plots=true",
               "train.checkpoint_every=12")
    result = train(cfg, print_fn=lambda s: None)
    run = result.run_dir
    train_recs = read_metrics(run, "train")
    first = sum(r["loss"] for r in train_recs[:3]) / 3
    last = sum(r["loss"] for r in train_recs[-3:]) / 3
    assert last < first - 0.5, (first, last)
    evals = read_metrics(run, "eval")
    assert [e["step"] for e in evals] == [12, 24]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    ev = evals[-1]
    assert ev["neg_log_perplexity"] == -ev["val_loss"]
    assert set(ev["tokens_per_expert"]) == {"encoder.block.1", "decoder.block.1"}
    assert 0 <= ev["drop_fraction"] < 1 and 0 < ev["router_entropy"] <= math.log(4) + 1e-6
    assert (run / "checkpoints" / "step_000024" / "model.safetensors").is_file()
    assert (run / "plots" / "loss.png").is_file() and (run / "plots" / "expert_load.png").is_file()
    assert (run / "tokenizer" / "spiece.model").is_file()
    assert load_toml(run / "config.toml").model.vocab_size % 128 == 0


@pytest.mark.parametrize("arch", ["encoder-decoder", "decoder-only"])
def test_bfloat16_autocast_trains_with_a_float32_router(out_dir, arch):
    """train.precision=bfloat16 (autocast) trains both architectures on the ragged CPU experts path, and the
    router's logits stay float32 (selective precision, paper §2.4): under autocast they equal the logits of the
    router's own float32 arithmetic on the same input."""
    extra = ["model.arch=decoder_only", "data.objective=causal_lm"] if arch == "decoder-only" else []
    cfg = _cfg(out_dir, f"name=bf16-{arch}", "train.steps=6", "train.eval_every=6", "train.precision=bfloat16",
               *extra)
    result = train(cfg, print_fn=lambda s: None)
    losses = [r["loss"] for r in read_metrics(result.run_dir, "train")]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(read_metrics(result.run_dir, "eval")[-1]["val_loss"])
    comp = build_components(cfg, torch.device("cpu"))
    mlp = next(m for m in comp.model.modules() if hasattr(m, "router") and hasattr(m, "experts"))
    seen = {}
    mlp.router.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], logits=out.logits_TE))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        comp.model.eval()(**comp.val_batches[0])
    assert seen["logits"].dtype == torch.float32
    want = seen["x"].double() @ mlp.router.weight.detach().double().T
    torch.testing.assert_close(seen["logits"].double(), want, rtol=1e-5, atol=1e-5)


def test_evaluate_matches_independent_cross_entropy(out_dir):
    cfg = _cfg(out_dir)
    comp = build_components(cfg, torch.device("cpu"))
    comp.model.eval()
    rec = evaluate(comp.model, comp.val_batches, torch.device("cpu"))
    total, count = 0.0, 0
    with torch.no_grad():
        for b in comp.val_batches:
            logits = comp.model(**b).logits.double()
            logp = torch.log_softmax(logits, -1)
            mask = b["labels"] != -100
            total += float(-logp.gather(-1, b["labels"].clamp_min(0)[..., None])[..., 0][mask].sum())
            count += int(mask.sum())
    assert rec["val_tokens"] == count
    assert rec["val_loss"] == pytest.approx(total / count, rel=1e-5)


def test_nonfinite_names_step_and_layer(out_dir):
    cfg = _cfg(out_dir, "name=nan", "train.steps=4")
    comp = build_components(cfg, torch.device("cpu"))
    with torch.no_grad():
        comp.model.encoder.block[1].layer[1].mlp.experts.w_out.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"step 1: first non-finite output in encoder\.block\.1\.layer\.1"):
        train(cfg, components=comp, print_fn=lambda s: None)


def test_skip_nonfinite_continues(out_dir):
    cfg = _cfg(out_dir, "name=skip", "train.steps=3", "train.skip_nonfinite=true")
    comp = build_components(cfg, torch.device("cpu"))
    with torch.no_grad():
        comp.model.decoder.block[1].layer[0].SelfAttention.o.weight.fill_(float("inf"))
    result = train(cfg, components=comp, print_fn=lambda s: None)
    skips = read_metrics(result.run_dir, "skip")
    assert [s["step"] for s in skips] == [1, 2, 3]
    assert all("decoder.block.1.layer.0.SelfAttention.o" in s["where"] for s in skips)


def _cli(out_dir, name, *extra):
    return [sys.executable, "-m", "switchformer.cli", "train", str(TINY), f"out_dir={out_dir}", f"name={name}",
            "train.num_threads=1", "train.steps=24", "train.checkpoint_every=3", "train.eval_every=6",
            "train.keep_checkpoints=2", "train.log_every=2", *extra]


def _records(run_dir):
    keys = ("loss", "lm_loss", "grad_norm", "lr", "val_loss", "drop_fraction", "tokens_per_expert")
    return [(r["kind"], r["step"], {k: r[k] for k in keys if k in r})
            for r in read_metrics(run_dir) if r["kind"] in ("train", "eval")]


def test_sigkill_resume_matches_uninterrupted(out_dir):
    """Killed (SIGKILL, through the loop's test hook) after step 12's log and eval records and before its
    checkpoint, then resumed: the run restarts from step 9 and logs exactly what an uninterrupted run logs."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    subprocess.run(_cli(out_dir, "ref"), check=True, env=env, capture_output=True)
    run_dir = Path(out_dir) / "killed"
    proc = subprocess.run(_cli(out_dir, "killed"), env={**env, KILL_AFTER_STEP_ENV: "12"}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    killed_at = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert killed_at == 12 < 24, "the run finished before it was killed; nothing was tested"
    assert [p.name for p in ck.list_checkpoints(run_dir)] == ["step_000006", "step_000009"]
    out = subprocess.run(_cli(out_dir, "killed", "--resume"), check=True, env=env, capture_output=True, text=True)
    assert "resumed from" in out.stdout and "(step 9)" in out.stdout
    assert "stopped at step 24: finished all 24 steps" in out.stdout
    ref, got = _records(Path(out_dir) / "ref"), _records(run_dir)
    assert [(k, s) for k, s, _ in got] == [(k, s) for k, s, _ in ref]
    assert got == ref  # bitwise: same losses, gradient norms, routing counts


def test_rejected_resume_writes_nothing(out_dir):
    """A resume whose config does not fit the run's checkpoints fails before touching the run directory."""
    cfg = _cfg(out_dir, "name=keep", "train.steps=2")
    run = train(cfg, print_fn=lambda s: None).run_dir
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    bad = apply_overrides(cfg, ["model.moe.num_experts=8"])
    with pytest.raises(RunError, match="cannot resume"):
        train(bad, resume=True, run_dir=run, print_fn=lambda s: None)
    after = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert after == before
    assert load_toml(run / "config.toml").model.moe.num_experts == 4
    with pytest.raises(RunError, match="no checkpoints to resume from"):
        train(cfg, resume=True, run_dir=Path(out_dir) / "never-trained", print_fn=lambda s: None)
    assert not (Path(out_dir) / "never-trained").exists()


def test_time_budget_applies_to_each_invocation_and_the_stop_reason_is_printed(out_dir):
    lines = []
    cfg = _cfg(out_dir, "name=budget", "train.steps=6", "train.max_minutes=1e-9")
    result = train(cfg, print_fn=lines.append)
    assert result.step == 1 and result.stop_reason.startswith("time budget")
    assert any(line.startswith("stopped at step 1: time budget") and "train.max_minutes" in line for line in lines)
    assert read_metrics(result.run_dir, "end")[-1]["stop"] == result.stop_reason
    # a checkpoint left by a write that was killed midway is removed when training starts again
    tmp = result.run_dir / "checkpoints" / ".tmp_step_000002_999999999"
    tmp.mkdir()
    # the restored training time (far over the budget) does not count against this invocation's budget
    comp = build_components(cfg, torch.device("cpu"))
    trainer = Trainer(apply_overrides(cfg, ["train.max_minutes=1"]), comp, result.run_dir, torch.device("cpu"))
    trainer.restore()
    trainer.state.train_seconds = 1e9
    assert trainer.stop_reason() is None
    trainer.session_seconds = 61.0
    assert "time budget" in trainer.stop_reason()
    again = train(cfg, resume=True, run_dir=result.run_dir, print_fn=lines.append)
    assert again.step == 2 and not tmp.exists()
    done = train(apply_overrides(cfg, ["train.max_minutes=0"]), resume=True, run_dir=result.run_dir,
                 print_fn=lines.append)
    assert done.step == 6 and lines[-1] == "stopped at step 6: finished all 6 steps"
