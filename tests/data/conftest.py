"""Shared fixtures of the data tests: a tiny corpus of real Python code and a tiny tokenizer trained on it."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from switchformer.data import Tokenizer, train_tokenizer

# A few standard-library modules (present on every machine): ~60 kB of real code.
_MODULES = ["textwrap.py", "glob.py", "fnmatch.py", "bisect.py", "colorsys.py", "keyword.py", "heapq.py", "shlex.py"]


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / m).read_text(encoding="utf-8") for m in _MODULES]


@pytest.fixture(scope="session")
def tiny_tok(tiny_texts: list[str]) -> Tokenizer:
    return train_tokenizer(tiny_texts, vocab_size=400, num_sentinels=100)


@pytest.fixture()
def text_dir(tmp_path: Path, tiny_texts: list[str]) -> Path:
    """tmp_path/corpus/{a,b,...}.txt, one module per file, plus a nested sub/ directory."""
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i, t in enumerate(tiny_texts):
        (d / ("sub" if i % 3 == 0 else ".") / f"doc{i}.txt").write_text(t, encoding="utf-8")
    return d
