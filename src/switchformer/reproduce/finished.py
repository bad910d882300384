"""Reuse of finished runs: a run directory whose ``result.json`` carries the same key (its config) is not run again,
so an interrupted suite continues where it stopped."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path


def finished_result(run_dir: Path, key: str, print_fn: Callable[[str], None]) -> dict | None:
    """The recorded result of ``run_dir`` when it finished with this ``key``; else None, after removing an
    unfinished or outdated run (it restarts from scratch)."""
    result_file = run_dir / "result.json"
    if result_file.is_file():
        try:
            previous = json.loads(result_file.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
        if previous.get("key") == key:
            print_fn(f"  {run_dir.name}: reusing the finished run ({result_file})")
            return previous
    if run_dir.exists() and ((run_dir / "metrics.jsonl").exists() or (run_dir / "config.toml").exists()):
        shutil.rmtree(run_dir)
    return None
