"""``switchformer train --nproc 2`` end to end, and how runs on several processes fail: a worker killed mid-run
fails the command within the collective timeout naming the rank (never a hang), ranks started with different
configs fail at start-up naming the field, and layouts that cannot work are one-line errors before any worker
starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from parallel.pool import WorkerError, WorkerPool
from switchformer.cli import main
from switchformer.config import apply_overrides, load_toml
from switchformer.errors import ConfigError
from switchformer.train.loop import KILL_AFTER_STEP_ENV, KILL_RANK_ENV
from switchformer.train.parallel import check_layout

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_test.toml"
TIMEOUT_S = 20


def _launch(out_dir: Path, *overrides: str, env_extra: dict | None = None, timeout: float = 240):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env_extra or {})}
    cmd = [sys.executable, "-m", "switchformer", "train", "--nproc", "2", str(TINY), "parallel.ep=2",
           f"out_dir={out_dir}", "train.num_threads=1", f"parallel.timeout_s={TIMEOUT_S}", *overrides]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=out_dir)
    return proc, time.monotonic() - t0


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_nproc_2_end_to_end(tmp_path):
    """Exits 0; rank 0 alone wrote the metrics (each step once) and a distributed checkpoint."""
    proc, _ = _launch(tmp_path, "train.steps=4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "tiny"
    assert [r["step"] for r in _records(run_dir, "train")] == [1, 2, 3, 4]
    assert [r["step"] for r in _records(run_dir, "eval")] == [4]
    assert _records(run_dir, "end")[0]["step"] == 4
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_000004"
    state = json.loads((run_dir / "checkpoints" / latest / "train_state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 2
    assert "2 processes (dp=1 x ep=2)" in proc.stdout
    assert proc.stdout.count("done: 4 steps") == 1  # reported once, by rank 0


def test_killed_worker_fails_the_launcher_naming_the_rank(tmp_path):
    """Rank 1 SIGKILLs itself after step 2; rank 0 is then stuck in (or failing) a collective. The command must
    exit non-zero within the timeout (+10 s) of the kill, naming rank 1."""
    proc, _ = _launch(tmp_path, "train.steps=6", env_extra={KILL_AFTER_STEP_ENV: "2", KILL_RANK_ENV: "1"},
                      timeout=TIMEOUT_S + 200)
    ended = time.time()
    assert proc.returncode != 0
    assert "worker rank 1 was killed by SIGKILL" in proc.stderr, proc.stderr
    # rank 1 killed itself right after rank 0 logged step 2 (the ranks run each step in lockstep)
    killed_near = (tmp_path / "tiny" / "metrics.jsonl").stat().st_mtime
    assert max(r["step"] for r in _records(tmp_path / "tiny", "train")) == 2
    assert ended - killed_near < TIMEOUT_S + 10, ended - killed_near


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(2, timeout=60) as p:
        yield p


def _train_with_rank_seed(out_dir):
    from switchformer.train.loop import train

    cfg = apply_overrides(load_toml(TINY), [f"out_dir={out_dir}", f"train.seed={dist.get_rank()}"])
    train(cfg, print_fn=lambda text: None)


def test_different_configs_fail_at_start_naming_the_field(pool, tmp_path):
    with pytest.raises(WorkerError) as info:
        pool.run(_train_with_rank_seed, tmp_path)
    text = str(info.value)
    assert "failed on ranks [0, 1]" in text
    assert "ranks disagree on the run config: train.seed differs (rank 0: 0, rank 1: 1)" in text
    assert not (tmp_path / "tiny").exists()  # nothing was written


@pytest.mark.parametrize("nproc,overrides,message", [
    (2, ["parallel.ep=3"], "parallel.ep = 3 does not divide the 2 processes"),
    (3, ["parallel.ep=3"], "parallel.ep = 3 does not divide model.moe.num_experts = 4"),
    (4, ["parallel.ep=2", "train.batch_size=6"], "train.batch_size = 6 (the global batch) does not split over 4"),
    (2, ["parallel.ep=2", "model.encoder_sparse_step=0", "model.decoder_sparse_step=0"], "has no Switch layer"),
])
def test_bad_layouts_are_one_line_errors(tmp_path, capsys, nproc, overrides, message):
    cfg = apply_overrides(load_toml(TINY), overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_layout(cfg, nproc)
    # the launcher checks before starting any worker: one line, exit status 2
    status = main(["train", "--nproc", str(nproc), str(TINY), f"out_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("switchformer train: error: ") and message in err
