"""Switch-vs-dense comparison: the crossing interpolation, the dense counterpart, and bench_pretrain --quick."""

import importlib.util
import json
from pathlib import Path

import pytest

from switchformer.config import RunConfig, apply_overrides
from switchformer.train.compare import crossing, dense_counterpart

ROOT = Path(__file__).resolve().parents[2]


def test_crossing_interpolates():
    evals = [{"step": 100, "train_seconds": 10.0, "val_loss": 5.0},
             {"step": 200, "train_seconds": 20.0, "val_loss": 4.0},
             {"step": 300, "train_seconds": 32.0, "val_loss": 3.0}]
    assert crossing(evals, 3.5) == pytest.approx(250.0)
    assert crossing(evals, 3.5, "train_seconds") == pytest.approx(26.0)
    assert crossing(evals, 5.5) == 100.0  # already below at the first evaluation
    assert crossing(evals, 4.0) == 200.0
    assert crossing(evals, 2.0) is None


def test_dense_counterpart_is_flop_matched():
    cfg = apply_overrides(RunConfig(), ["model.moe.num_experts=32", "name=sw"])
    dense = dense_counterpart(cfg)
    assert dense.model.encoder_sparse_step == 0 and dense.model.decoder_sparse_step == 0
    assert dense.name == "sw-dense"
    # everything else (width, depth, d_ff, data, optimizer, steps) is identical
    same = apply_overrides(dense, ["model.encoder_sparse_step=2", "model.decoder_sparse_step=2", "name=sw"])
    assert same == cfg


def test_bench_pretrain_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_pretrain", ROOT / "benchmarks" / "bench_pretrain.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = tmp_path / "results"
    assert bench.main(["--quick", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(res),
                       "train.num_threads=1"]) == 0
    (report,) = res.glob("pretrain_cpu_quick_*.json")
    data = json.loads(report.read_text())
    assert data["seeds"] == [0] and len(data["per_seed"]) == 1
    s = data["per_seed"][0]
    assert s["dense_final_val_loss"] > 0 and s["dense_steps"] == 12
    assert set(data["targets_met"]) == {"step_ratio", "time_ratio", "throughput_ratio"}
    assert list(res.glob("pretrain_cpu_quick_*.md")) and list(res.glob("pretrain_cpu_quick_*_loss.png"))
