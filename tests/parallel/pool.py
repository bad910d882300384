"""A pool of gloo worker processes for multi-process tests: spawned once per test module, reused by its tests.

    @pytest.fixture(scope="module")
    def pool():
        with WorkerPool(2) as p:
            yield p

    def test_something(pool):
        results = pool.run(check_fn, arg)      # check_fn(*args) runs on every rank; a list of their return values

``check_fn`` must be a module-level function (workers import it by name). A worker's exception fails the test
with that worker's traceback; a task that outlives ``timeout`` kills the pool and fails the test (the next
``run`` starts a fresh pool), so a hung collective never stalls CI. The process group's own timeout is short
too, so a rank stuck in a collective whose peer died raises instead of waiting 30 minutes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

PG_TIMEOUT_S = 30
TASK_TIMEOUT_S = 90


def _worker(rank: int, world_size: int, init_file: str, tasks, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            torch.manual_seed(0)
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class WorkerError(AssertionError):
    """A worker raised; the message holds every failing rank's traceback."""


class WorkerPool:
    """``world_size`` spawned processes joined in one gloo process group."""

    def __init__(self, world_size: int, timeout: float = TASK_TIMEOUT_S) -> None:
        self.world_size, self.timeout = world_size, timeout
        self._procs: list = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        fd, self._init_file = tempfile.mkstemp(prefix="switchformer-pg-")
        os.close(fd)
        os.unlink(self._init_file)  # FileStore wants a path that does not exist yet
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker, args=(r, self.world_size, self._init_file, self._tasks[r], self._results),
                        daemon=True)
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, timeout: float | None = None, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the ranks' results in rank order."""
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        deadline = time.monotonic() + (timeout or self.timeout)
        got: dict[int, tuple[bool, object]] = {}
        while len(got) < self.world_size:
            left = deadline - time.monotonic()
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in got]
            if left <= 0 or dead:
                self.close()
                why = f"ranks {dead} died" if dead else f"timed out after {timeout or self.timeout:.0f} s"
                errors = "\n".join(f"--- rank {r}:\n{v}" for r, (ok, v) in sorted(got.items()) if not ok)
                raise WorkerError(f"{fn.__name__}: {why}; ranks done: {sorted(got)}\n{errors}")
            try:
                rank, ok, value = self._results.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            got[rank] = (ok, value)
        failed = {r: v for r, (ok, v) in got.items() if not ok}
        if failed:
            self.close()  # a failed collective can leave the group unusable: the next run starts afresh
            text = "\n".join(f"--- rank {r}:\n{tb}" for r, tb in sorted(failed.items()))
            raise WorkerError(f"{fn.__name__} failed on ranks {sorted(failed)}:\n{text}")
        return [got[r][1] for r in range(self.world_size)]

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []
        if getattr(self, "_init_file", None) and os.path.exists(self._init_file):
            os.unlink(self._init_file)
