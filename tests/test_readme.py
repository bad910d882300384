"""The README and docs/ run as written.

Every ```python block of README.md and docs/*.md runs in a fresh namespace, in a temporary working directory that
sees the repository's configs/. A block preceded by a line ``<!-- no-test: why -->`` is skipped (Hub downloads,
long runs). Every ``switchformer SUBCOMMAND --flag`` in a bash block or an inline code span must parse with the
real CLI parser, every ``configs/*.toml`` and relative link must exist, and ``make`` targets must be in the
Makefile.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import torch

from switchformer.cli import make_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NO_TEST = re.compile(r"<!--\s*no-test\b[^>]*-->\s*$")


def _blocks(path: Path, lang: str) -> list[tuple[int, str, bool]]:
    """(line number, code, skipped) of each fenced block of ``lang`` in ``path``."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) != lang:
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append((text.count("\n", 0, m.start()) + 1, m.group(2), bool(NO_TEST.search(before))))
    return out


PYTHON_BLOCKS = [
    pytest.param(code, id=f"{path.relative_to(ROOT)}:{line}")
    for path in DOCS
    for line, code, no_test in _blocks(path, "python")
    if not no_test
]
# Blocks marked <!-- no-test --> need the network or a long run: they are compiled, not run.
NO_TEST_BLOCKS = [
    pytest.param(code, id=f"{path.relative_to(ROOT)}:{line}")
    for path in DOCS
    for line, code, no_test in _blocks(path, "python")
    if no_test
]


@pytest.mark.parametrize("code", NO_TEST_BLOCKS)
def test_no_test_block_compiles(code: str) -> None:
    compile(code, "<doc block>", "exec")


@pytest.mark.parametrize("code", PYTHON_BLOCKS)
def test_python_block_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})


def test_python_blocks_found() -> None:
    """The extraction works: the README's layer, model, checkpoint and generation snippets are all collected."""
    readme = [code for _, code, skip in _blocks(ROOT / "README.md", "python") if not skip]
    assert len(readme) >= 4
    assert any("SwitchFFN(" in c for c in readme)
    assert any("save_pretrained(" in c for c in readme)


def _cli_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after 'switchformer') for every switchformer command line in bash blocks and inline code."""
    found = []
    for path in DOCS:
        rel = str(path.relative_to(ROOT))
        lines = [ln for _, code, _ in _blocks(path, "bash") for ln in code.splitlines()]
        lines += re.findall(r"`((?:\S*/)?switchformer [^`]+)`", path.read_text())
        for ln in lines:
            try:
                words = shlex.split(ln, comments=True)
            except ValueError:
                continue
            for i, w in enumerate(words):
                if (w == "switchformer" or w.endswith("/switchformer")) and i + 1 < len(words):
                    found.append((f"{rel}: {ln.strip()}", words[i + 1:]))
                    break
    return found


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = make_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_cli_commands_in_docs_exist() -> None:
    subs = _subcommands()
    top = set(make_parser()._option_string_actions)
    commands = _cli_commands()
    assert len(commands) >= 10
    bad = []
    for where, argv in commands:
        sub = argv[0]
        if sub not in subs:
            bad.append(f"{where}: no subcommand {sub!r} (have {sorted(subs)})")
            continue
        known = set(subs[sub]._option_string_actions) | top
        bad += [f"{where}: {sub} has no option {w.split('=')[0]}" for w in argv[1:]
                if w.startswith("--") and w.split("=")[0] not in known]
        try:  # required arguments present, values of the right type
            make_parser().parse_known_args(argv)
        except SystemExit:
            bad.append(f"{where}: the parser rejects {argv}")
    assert not bad, "\n".join(bad)


def test_config_files_in_docs_exist() -> None:
    missing = [f"{p.relative_to(ROOT)}: {name}" for p in DOCS
               for name in set(re.findall(r"configs/[\w.-]+\.toml", p.read_text())) if not (ROOT / name).is_file()]
    assert not missing, missing


def test_make_targets_in_docs_exist() -> None:
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    used = set()
    for p in DOCS:
        inline = re.findall(r"`([^`\n]+)`", p.read_text())
        code = "\n".join([c for _, c, _ in _blocks(p, "bash")] + inline)
        used |= set(re.findall(r"^\s*make ([a-z][\w-]*)", code, re.M))
    assert used, "no make targets found in the docs"
    assert used <= targets, sorted(used - targets)


def test_relative_links_resolve() -> None:
    broken = []
    for p in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", p.read_text()):
            if "://" in target or target.startswith(("#", "mailto:")):
                continue
            if not (p.parent / target.split("#")[0]).exists():
                broken.append(f"{p.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_readme_size_and_no_history() -> None:
    """The README is short; README and docs describe the product, not how it was made or files outside it."""
    assert len((ROOT / "README.md").read_text()) < 12_000
    pattern = re.compile(r"\bsession[- ]?\d|paper\.md|anchors\.md|user-needs\.md|STYLE\.md|"
                         r"(?<!docs/)(?<!\()reproduction\.md|target[s]? (?:met|missed|not met)", re.I)
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in DOCS for m in pattern.finditer(p.read_text())]
    assert not hits, hits
