"""The training loop on configs/tiny_test.toml: loss falls, non-finite detection names the layer, exact resume
after SIGKILL, evaluation metrics are consistent."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from switchformer.config import apply_overrides, load_toml
from switchformer.metrics import read_metrics
from switchformer.train.loop import NonFiniteLossError, build_components, evaluate, train

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
            "train.num_threads=1", "train.steps=60", "train.checkpoint_every=3", "train.eval_every=6",
            "train.keep_checkpoints=2", "train.log_every=2", *extra]


def _records(run_dir):
    keys = ("loss", "lm_loss", "grad_norm", "lr", "val_loss", "drop_fraction", "tokens_per_expert")
    return [(r["kind"], r["step"], {k: r[k] for k in keys if k in r})
            for r in read_metrics(run_dir) if r["kind"] in ("train", "eval")]


def test_sigkill_resume_matches_uninterrupted(out_dir):
    env = dict(os.environ, PYTHONHASHSEED="0")
    # the reference also warms the tokenizer cache, so both runs below start equally fast
    subprocess.run(_cli(out_dir, "ref"), check=True, env=env, capture_output=True)
    run_dir = Path(out_dir) / "killed"
    proc = subprocess.Popen(_cli(out_dir, "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(0.05)  # land somewhere after the first checkpoint, possibly inside a later one
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert killed_at < 60, "the run finished before it was killed; nothing was tested"
    subprocess.run(_cli(out_dir, "killed", "--resume"), check=True, env=env, capture_output=True)
    ref, got = _records(Path(out_dir) / "ref"), _records(run_dir)
    assert [(k, s) for k, s, _ in got] == [(k, s) for k, s, _ in ref]
    assert got == ref  # bitwise: same losses, gradient norms, routing counts
