"""``switchformer train --nproc N``: start N local training processes through torchrun's launcher (paper §5).

The workers are started by torch's elastic agent (``torch.distributed.launcher.api.elastic_launch``, what
``torchrun --standalone`` uses: a c10d rendezvous on localhost, no restarts). Each runs the same
``switchformer train`` command, so a run started here or with ``torchrun --nproc-per-node N -m switchformer train
...`` is the same run. When a worker dies, the agent stops the others and this command fails naming the rank; a
worker stuck in a collective whose peer is gone raises after ``parallel.timeout_s`` instead of hanging.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid

from switchformer.config import RunConfig
from switchformer.errors import ConfigError, RunError


def under_launcher() -> bool:
    """True inside a worker started by torchrun (or ``--nproc``)."""
    return "LOCAL_RANK" in os.environ and "RANK" in os.environ


def train_or_launch(cfg: RunConfig, args: argparse.Namespace, *, resume: bool = False, run_dir=None):
    """Train ``cfg`` in this process (one process, or one rank under torchrun), or with ``args.nproc`` > 1 start
    that many workers running this same command.

    Returns:
        The ``TrainResult`` on the process that should report it (the only one, or rank 0); None elsewhere and
        after a launch (rank 0 printed the result).

    Raises:
        ConfigError: a layout that cannot work (checked before any worker starts) or ``--nproc`` under torchrun.
        RunError: a worker failed (the message names its rank and how it ended).
    """
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: the number of processes must be >= 1")
    if nproc > 1:
        if under_launcher():
            raise ConfigError("--nproc starts its own workers; under torchrun leave it out (torchrun's "
                              "--nproc-per-node sets the number of processes)")
        from switchformer.train.parallel import check_layout

        check_layout(cfg, nproc)  # one clear line here rather than the same error from every worker
        launch(nproc, worker_argv(args))
        return None
    from switchformer.train.loop import train

    result = train(cfg, resume=resume, run_dir=run_dir)
    return result if int(os.environ.get("RANK", "0")) == 0 else None


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The ``switchformer`` arguments that make a worker run the same training command, without ``--nproc``."""
    argv = ["train"]
    if getattr(args, "debug", False):
        argv.append("--debug")
    if args.config:
        argv += ["--config", args.config]
    if args.decoder_only:
        argv.append("--decoder-only")
    if args.run_dir:
        argv += ["--run-dir", str(args.run_dir)]
    argv += list(args.overrides)
    if args.resume is True:
        argv.append("--resume")
    elif args.resume:
        argv += ["--resume", str(args.resume)]
    return argv


def launch(nproc: int, argv: list[str]) -> None:
    """Run ``python -m switchformer *argv`` on ``nproc`` local workers (torchrun --standalone) and wait.

    Raises:
        RunError: a worker failed; names the first failed rank, how it ended, and the other failures.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "OMP_NUM_THREADS" not in os.environ:
        # what torchrun does for several workers per machine: one OpenMP thread each unless told otherwise
        os.environ["OMP_NUM_THREADS"] = "1"
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1, start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-m", "switchformer", *argv)
    except ChildFailedError as e:
        raise RunError(describe_failures(e.failures)) from None


def describe_failures(failures: dict) -> str:
    """One line: the first failed rank and how it ended (a signal is the likelier cause on a tie), then the others."""
    def how(failure) -> str:
        if failure.exitcode is not None and failure.exitcode < 0:
            return f"was killed by {failure.signal_name()}"
        return f"exited with status {failure.exitcode}"

    # SIGTERM is how the agent stops the survivors: those are consequences, listed after the first real failure
    order = sorted(failures, key=lambda r: (how(failures[r]).endswith("SIGTERM"), failures[r].timestamp, r))
    first = order[0]
    text = f"worker rank {first} {how(failures[first])}"
    others = [f"rank {r} {how(failures[r])}" for r in order[1:]]
    if others:
        text += f" (then {', '.join(others)})"
    return (f"{text}; the launcher stopped the other workers. The failed worker's own error, if it printed one, is "
            "above")
