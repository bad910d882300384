"""Switch-vs-dense comparison: the crossing interpolation, the dense counterpart, per-seed configs and means, the
report's wording, and `switchformer compare` end to end on the tiny recipe."""

import json
from pathlib import Path

import pytest

from switchformer.config import RunConfig, apply_overrides
from switchformer.train.compare import (
    crossing,
    dense_counterpart,
    format_summary,
    mean_over_seeds,
    seed_config,
    summarize,
)

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


def test_wide_dense_counterpart():
    from switchformer.train.compare import wide_dense_counterpart

    cfg = apply_overrides(RunConfig(), ["model.d_ff=256", "name=sw"])
    wide = wide_dense_counterpart(cfg, 4)
    assert wide.model.d_ff == 1024 and wide.name == "sw-dense-x4"
    assert not wide.model.is_sparse
    same = apply_overrides(wide, ["model.d_ff=256", "name=sw-dense"])
    assert same == dense_counterpart(cfg)  # only the FFN width differs from the FLOP-matched baseline
    for bad in (1, 0, 2.5):
        with pytest.raises(ValueError, match="wide_dense must be an integer >= 2"):
            wide_dense_counterpart(cfg, bad)


def _write_evals(run_dir: Path, losses: list[float], seconds_per_step: float = 0.1) -> Path:
    run_dir.mkdir(parents=True)
    recs = [{"kind": "train", "step": 10 * (i + 1), "tokens_per_s": 1000.0} for i in range(len(losses))]
    recs += [{"kind": "eval", "step": 10 * (i + 1), "train_seconds": 10 * (i + 1) * seconds_per_step,
              "val_loss": v} for i, v in enumerate(losses)]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return run_dir


@pytest.mark.parametrize("wide_losses, helps", [([5.0, 4.0, 3.5, 3.0], True), ([5.5, 4.8, 4.4, 4.2], False)])
def test_summary_with_the_wide_dense_reference(tmp_path, wide_losses, helps):
    sw = _write_evals(tmp_path / "sw", [5.0, 4.5, 4.0, 3.9])
    de = _write_evals(tmp_path / "de", [5.0, 4.6, 4.2, 4.0])
    wide = _write_evals(tmp_path / "wide", wide_losses)
    s = summarize(sw, de, wide)
    assert s["step_ratio"] == pytest.approx(30.0 / 40.0)  # Switch reaches the dense 4.0 at step 30
    assert s["wide_dense_final_val_loss"] == wide_losses[-1]
    text = format_summary(s)
    if helps:
        assert s["wide_dense_step_ratio"] == pytest.approx(0.5)  # reaches 4.0 at step 20
        assert "extra FFN parameters help" in text
    else:
        assert s["wide_dense_step_ratio"] is None
        assert "buy little" in text
    assert "wide_dense_run" not in summarize(sw, de)


def test_cli_compare_with_wide_dense(tmp_path, capsys):
    from switchformer.cli import main

    tiny = str(ROOT / "configs" / "tiny_test.toml")
    out = tmp_path / "cmp"
    args = ["compare", tiny, f"out_dir={tmp_path}", "name=t", "train.steps=3", "train.eval_every=3",
            "train.num_threads=1", "--out", str(out)]
    assert main([*args, "--wide-dense", "1"]) == 2
    assert "wide_dense must be an integer >= 2" in capsys.readouterr().err
    assert main([*args, "--wide-dense", "2"]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert Path(report["wide_dense_run"]).name == "t-dense-x2"
    assert report["dense_final_val_loss"] > 0 and report["dense_steps"] == 3
    assert report["wide_dense_final_val_loss"] > 0
    cfg_text = (out / "t-dense-x2" / "config.toml").read_text()
    assert "d_ff = 128" in cfg_text  # tiny_test.toml has d_ff 64
    assert "capacity reference:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("sw_losses", "sw_seconds_per_step", "expected", "absent"),
    [
        # Switch reaches the dense 4.0 at step 30 of 40 in 1.8 x 30 = 54 s vs dense's 40 s: slower in wall time
        ([5.0, 4.5, 4.0, 3.9], 0.18, ["1.33x fewer steps than dense (ratio 0.75)", "1.35x the wall time of dense"],
         ["less wall time"]),
        # ... in 0.05 x 30 = 1.5 s: faster in both
        ([5.0, 4.5, 4.0, 3.9], 0.05, ["1.33x fewer steps than dense (ratio 0.75)",
                                      "2.67x less wall time than dense (ratio 0.38)"], ["the wall time of dense"]),
        # at the last step (40 of 40): the same number of steps
        ([5.0, 4.6, 4.3, 4.0], 0.1, ["1.00x the steps of dense", "1.00x the wall time of dense"], ["fewer"]),
    ],
)
def test_summary_wording_says_more_or_less(tmp_path, sw_losses, sw_seconds_per_step, expected, absent):
    """'Nx less wall time' only when Switch took less; otherwise 'Nx the wall time of dense'."""
    sw = _write_evals(tmp_path / "sw", sw_losses, seconds_per_step=sw_seconds_per_step)
    de = _write_evals(tmp_path / "de", [5.0, 4.6, 4.2, 4.0])
    text = format_summary(summarize(sw, de))
    for phrase in expected:
        assert phrase in text, text
    for phrase in absent:
        assert phrase not in text, text


def test_seed_config_and_mean_over_seeds(tmp_path):
    cfg = seed_config(RunConfig(), 2, tmp_path, ["train.steps=5"])
    got = (cfg.train.seed, cfg.data.seed, cfg.name, cfg.out_dir, cfg.train.steps)
    assert got == (2, 2, "seed2", str(tmp_path), 5)
    assert mean_over_seeds([0.5, 1.0]) == pytest.approx(0.75)
    assert mean_over_seeds([0.5, None]) is None and mean_over_seeds([]) is None
