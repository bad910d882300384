"""The training loop on several gloo processes against the same run on one process.

A tiny decoder-only Switch model in float64 (argmax routing, no dropout, 2 micro-batches per step) trains 20
steps at dp=2, ep=2 and dp=2 x ep=2 through ``train()`` itself (run inside the worker pool); the one-process
reference uses ``model.moe.group_size`` = one rank's tokens per layer call, so it routes the same groups. The
logged loss curve, the final evaluation and the final weights must agree within 1e-9: this checks the global
token-mean loss, the expert-gradient reduction, the global gradient norm, Adafactor on sharded parameters, and the
all-reduced metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from parallel.pool import WorkerPool

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_test.toml"
STEPS = 20
BATCH = 8  # global sequences per step
SEQ = 16


def _cfg(out_dir, *extra):
    from switchformer.config import apply_overrides, load_toml

    return apply_overrides(load_toml(TINY), [
        f"out_dir={out_dir}", "train.num_threads=1", "model.arch=decoder_only", "data.objective=causal_lm",
        f"data.input_length={SEQ}", "model.d_model=16", "model.d_ff=32", "model.d_kv=4", "model.num_heads=4",
        "model.num_layers=2", "model.decoder_sparse_step=1", "model.moe.exploration=argmax",
        "model.moe.router_dtype=float64", f"train.steps={STEPS}", f"train.batch_size={BATCH}", "train.grad_accum=2",
        "train.log_every=1", f"train.eval_every={STEPS}", "train.eval_batches=1", "train.checkpoint_every=0",
        "optim.warmup_steps=2",
        *extra,
    ])


def _train_float64(cfg, run_dir, resume=False, printed=None):
    """``train(cfg)`` with the model converted to float64; returns the final weights (full tensors)."""
    from torch.distributed.tensor import DTensor

    from switchformer.train.loop import build_components, train

    comp = build_components(cfg, torch.device("cpu"))
    comp.model.double()
    model = comp.model  # parallelized in place (FSDP2); a DDP wrapper would hold it as .module
    say = printed.append if printed is not None else (lambda text: None)
    train(cfg, run_dir=run_dir, components=comp, print_fn=say, resume=resume)
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}


def _rank_train(cfg, run_dir, resume=False, printed=None):
    weights = _train_float64(cfg, run_dir, resume, printed)
    return weights if dist.get_rank() == 0 else None


def _rank_resume(cfg, run_dir):
    printed = []
    weights = _rank_train(cfg, run_dir, True, printed)
    return weights, printed


def _records(run_dir, kind):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(out_dir):
    """One-process runs whose routing groups are one rank's tokens at 2 and at 4 processes."""
    torch.set_num_threads(1)
    refs = {}
    for world in (2, 4):
        group = BATCH // world * SEQ
        run_dir = out_dir / f"ref{world}"
        weights = _train_float64(_cfg(out_dir, f"model.moe.group_size={group}"), run_dir)
        refs[world] = (weights, _records(run_dir, "train"), _records(run_dir, "eval"))
    return refs


@pytest.fixture(scope="module")
def pool2():
    with WorkerPool(2, timeout=120) as p:
        yield p


@pytest.fixture(scope="module")
def pool4():
    with WorkerPool(4, timeout=150) as p:
        yield p


def _compare(reference, world, run_dir, weights):
    ref_weights, ref_train, ref_eval = reference[world]
    train, evals = _records(run_dir, "train"), _records(run_dir, "eval")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for mine, ref in zip(train, ref_train, strict=True):
        for key in ("loss", "lm_loss", "grad_norm", "drop_fraction"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), (key, mine["step"])
        # float32 statistics (the model casts the auxiliary losses to float32, the router entropy is summed in
        # float32): per-rank values rounded before the mean, the reference's after
        for key in ("load_balancing_loss", "router_entropy"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-6), (key, mine["step"])
        assert mine["tokens_seen"] == ref["tokens_seen"]
    assert evals[-1]["step"] == ref_eval[-1]["step"] == STEPS
    assert evals[-1]["val_loss"] == pytest.approx(ref_eval[-1]["val_loss"], rel=1e-9)
    assert evals[-1]["val_tokens"] == ref_eval[-1]["val_tokens"]
    assert evals[-1]["tokens_per_expert"] == ref_eval[-1]["tokens_per_expert"]
    assert ref_train[-1]["loss"] < ref_train[0]["loss"] - 0.1  # it trains: the comparison is not of a flat line
    assert weights.keys() == ref_weights.keys()
    for name, ref in ref_weights.items():
        diff = float((weights[name] - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
        assert diff < 1e-9, (name, diff)


@pytest.mark.parametrize("ep,extra", [(1, ()), (2, ()), (2, ("optim.name=adamw", "optim.lr=0.01",
                                                               "parallel.dense=ddp"))],
                         ids=["dp2", "ep2", "ep2-ddp-adamw"])
def test_two_processes_train_like_one(pool2, reference, out_dir, ep, extra):
    run_dir = out_dir / f"w2-ep{ep}-{len(extra)}"
    ref_extra = tuple(e for e in extra if not e.startswith("parallel."))
    if ref_extra:  # another optimizer: its own reference
        group = BATCH // 2 * SEQ
        ref_dir = out_dir / "ref2-adamw"
        weights = _train_float64(_cfg(out_dir, f"model.moe.group_size={group}", *ref_extra), ref_dir)
        reference = {2: (weights, _records(ref_dir, "train"), _records(ref_dir, "eval"))}
    weights = pool2.run(_rank_train, _cfg(out_dir, f"parallel.ep={ep}", *extra), run_dir)[0]
    _compare(reference, 2, run_dir, weights)
    assert (run_dir / "checkpoints" / "latest").is_file()


def test_four_processes_dp2_ep2_train_like_one(pool4, reference, out_dir):
    run_dir = out_dir / "w4-dp2-ep2"
    weights = pool4.run(_rank_train, _cfg(out_dir, "parallel.ep=2"), run_dir)[0]
    _compare(reference, 4, run_dir, weights)


def test_resume_at_another_layout_continues_the_same_run(pool2, reference, out_dir):
    """10 steps at ep=2, then --resume at dp=2 (ep=1) for the other 10: the distributed checkpoint reshards the
    weights and Adafactor's statistics, and the run is the uninterrupted one-process run."""
    run_dir = out_dir / "resumed"
    pool2.run(_rank_train, _cfg(out_dir, "parallel.ep=2", "train.steps=10"), run_dir)
    (weights, printed), (_, printed_1) = pool2.run(_rank_resume, _cfg(out_dir, "parallel.ep=1"), run_dir)
    _compare(reference, 2, run_dir, weights)
    notes = [line for line in printed if line.startswith("note:")]
    assert notes == ["note: step_000010 was written on 2 process(es) (dp=1, ep=2); this run has 2 (dp=2, ep=1), "
                     "so the dropout/jitter streams are reseeded from (seed, step, rank)"], printed
    assert printed_1 == []  # rank 1 prints nothing


def _nan_expert_run(cfg, run_dir):
    """Train with the experts of layer 1 set to NaN on every rank; return the error message (or None)."""
    from switchformer.train.loop import NonFiniteLossError, build_components, train

    comp = build_components(cfg, torch.device("cpu"))
    with torch.no_grad():
        comp.model.decoder.block[1].layer[1].mlp.experts.w_out.fill_(float("nan"))
    try:
        train(cfg, run_dir=run_dir, components=comp, print_fn=lambda text: None)
    except NonFiniteLossError as e:
        return str(e)
    return None


def test_nonfinite_loss_stops_every_rank_naming_the_module(pool2, out_dir):
    """The non-finite decision is collective: both ranks stop at step 1 (no rank left waiting in a collective),
    naming the first rank's first non-finite module; with skip_nonfinite both skip and finish."""
    cfg = _cfg(out_dir, "parallel.ep=2", "train.steps=2")
    messages = pool2.run(_nan_expert_run, cfg, out_dir / "nan")
    assert messages[0] == messages[1]
    assert messages[0].startswith("non-finite loss at step 1: first non-finite output in rank 0: "), messages[0]
    assert "mlp" in messages[0]
    skipped = pool2.run(_nan_expert_run, _cfg(out_dir, "parallel.ep=2", "train.steps=2",
                                              "train.skip_nonfinite=true"), out_dir / "nan-skip")
    assert skipped == [None, None]
    assert [r["step"] for r in _records(out_dir / "nan-skip", "skip")] == [1, 2]


def test_sharded_adafactor_is_torch_adafactor_on_whole_tensors():
    """On plain (unsharded) tensors ShardedAdafactor is torch.optim.Adafactor, weight decay and maximize included:
    the reference its sharded reductions reproduce."""
    from switchformer.train.parallel import ShardedAdafactor

    g = torch.Generator().manual_seed(0)
    shapes = [(7,), (5, 3), (4, 6, 2)]
    for kwargs in ({}, {"weight_decay": 0.1, "maximize": True, "eps": (1e-30, 1e-3), "lr": 0.05}):
        ours = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
        ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        opt_ours, opt_ref = ShardedAdafactor(ours, **kwargs), torch.optim.Adafactor(ref, foreach=False, **kwargs)
        for _ in range(4):
            for a, b in zip(ours, ref, strict=True):
                a.grad = torch.randn(a.shape, generator=g, dtype=torch.float64)
                b.grad = a.grad.clone()
            opt_ours.step()
            opt_ref.step()
        for a, b in zip(ours, ref, strict=True):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), (a.shape, (a - b).abs().max())
        assert opt_ours.state_dict()["state"].keys() == opt_ref.state_dict()["state"].keys()


def test_four_processes_ep2_tp2_train_like_one(pool4, out_dir):
    """ep=2 x tp=2: attention heads split over "tp" (with AdamW; Adafactor refuses tp > 1), two data shards."""
    extra = ("optim.name=adamw", "optim.lr=0.01")
    ref_dir = out_dir / "ref2-adamw-tp"
    weights = _train_float64(_cfg(out_dir, f"model.moe.group_size={BATCH // 2 * SEQ}", *extra), ref_dir)
    reference = {2: (weights, _records(ref_dir, "train"), _records(ref_dir, "eval"))}
    run_dir = out_dir / "w4-ep2-tp2"
    weights = pool4.run(_rank_train, _cfg(out_dir, "parallel.ep=2", "parallel.tp=2", *extra), run_dir)[0]
    _compare(reference, 2, run_dir, weights)
