"""The import direction of the package, read from the source (AST), lazy imports inside functions included:

    config, errors, dtypes, runtime  <-  moe  <-  models  <-  interop  <-  distributed  <-  train  <-  cli
    data imports only config and errors (and numpy, torch, sentencepiece; datasets/pyarrow lazily)

moe and models never import torch.distributed; nothing but ``python -m switchformer`` imports the CLI; no
submodule imports its own package's ``__init__`` (or the top-level ``switchformer``); and no chain of imports between
modules forms a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

import switchformer

ROOT = Path(switchformer.__file__).parent
FOUNDATION = {"config", "errors", "dtypes", "runtime"}  # leaves: they import no other switchformer module
ALLOWED = {  # package -> the switchformer packages / top-level modules it may import
    "moe": FOUNDATION | {"moe"},
    "models": FOUNDATION | {"moe", "models"},
    "interop": FOUNDATION | {"moe", "models", "interop"},
    "data": {"config", "errors", "data"},
    "distributed": FOUNDATION | {"moe", "models", "interop", "distributed", "checkpoint"},
    "reproduce": FOUNDATION | {"moe", "models", "data", "train", "plot", "metrics", "reproduce"},
}
ANYTHING_BUT_CLI = {"train"}
NO_DISTRIBUTED = {"moe", "models"}

DATA_THIRD_PARTY = {"numpy", "torch", "sentencepiece"}
DATA_OPTIONAL_LAZY = {"datasets", "pyarrow"}  # imported inside functions, only for the inputs that need them


def _module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _module_files()


@dataclass(frozen=True)
class Imp:
    source: str  # importing module
    target: str  # imported module (a key of MODULES for switchformer imports, else the dotted name)
    line: int
    lazy: bool  # inside a function or class body

    def __str__(self) -> str:
        return f"{MODULES[self.source].relative_to(ROOT.parent)}:{self.line} imports {self.target}"


def _resolve(name: str) -> str:
    """Longest prefix of ``name`` that is a switchformer module (``switchformer.x.Name`` -> ``switchformer.x``)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) if parts else name


def _imports(module: str) -> list[Imp]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[Imp] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    target = _resolve(a.name) if a.name.split(".")[0] == "switchformer" else a.name
                    out.append(Imp(module, target, child.lineno, lazy))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([child.module] if child.module else []))
                if base.split(".")[0] != "switchformer":
                    out.append(Imp(module, base, child.lineno, lazy))
                    continue
                for a in child.names:  # `from pkg import submodule` imports the submodule, else pkg itself
                    full = f"{base}.{a.name}"
                    out.append(Imp(module, full if full in MODULES else _resolve(base), child.lineno, lazy))
            visit(child, inner)

    visit(tree, False)
    return out


IMPORTS = {m: _imports(m) for m in MODULES}


def _group(module: str) -> str:
    """``switchformer.moe.layer`` -> ``moe``; ``switchformer.config`` -> ``config``; ``switchformer`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _internal(imp: Imp) -> bool:
    return imp.target in MODULES


def test_the_rules_see_the_packages():
    groups = {_group(m) for m in MODULES}
    assert set(ALLOWED) | ANYTHING_BUT_CLI | {"cli"} <= groups, groups
    assert len(IMPORTS["switchformer.interop.pretrained"]) > 5  # the parser finds imports at all


@pytest.mark.parametrize("package", sorted(ALLOWED) + sorted(ANYTHING_BUT_CLI))
def test_package_imports_point_downward(package):
    bad = []
    for module, imps in IMPORTS.items():
        if _group(module) != package:
            continue
        for imp in filter(_internal, imps):
            target = _group(imp.target)
            allowed = target != "cli" if package in ANYTHING_BUT_CLI else target in ALLOWED[package]
            if not allowed or target == "":
                bad.append(str(imp))
    rule = "anything but cli" if package in ANYTHING_BUT_CLI else sorted(ALLOWED[package])
    assert not bad, f"switchformer.{package} may import only {rule}:\n  " + "\n  ".join(bad)


def test_foundation_modules_are_leaves():
    bad = [str(imp) for module in MODULES if _group(module) in FOUNDATION
           for imp in filter(_internal, IMPORTS[module]) if _group(imp.target) not in FOUNDATION]
    assert not bad, "config, errors, dtypes and runtime import only each other:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("package", sorted(NO_DISTRIBUTED))
def test_layer_and_models_do_not_import_torch_distributed(package):
    bad = [str(imp) for module, imps in IMPORTS.items() if _group(module) == package
           for imp in imps if imp.target == "torch.distributed" or imp.target.startswith("torch.distributed.")]
    assert not bad, "\n".join(bad)


ENTRY_POINTS = {"switchformer.cli", "switchformer.__main__"}  # `switchformer ...` and `python -m switchformer`


def test_nothing_imports_the_cli():
    bad = [str(imp) for module, imps in IMPORTS.items() if module not in ENTRY_POINTS
           for imp in imps if imp.target == "switchformer.cli"]
    assert not bad, "\n".join(bad)


def test_no_submodule_imports_its_own_package_init():
    """``from switchformer.models import build_model`` inside models/ (or ``import switchformer`` anywhere in the
    package) re-enters an ``__init__`` that is still executing: a cycle. Import the submodule that defines it."""
    bad = []
    for module, imps in IMPORTS.items():
        parts = module.split(".")
        if MODULES[module].name == "__init__.py":
            parts = parts[:-1]  # a package's __init__ belongs to the packages above it
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
        bad += [str(imp) for imp in imps if imp.target in ancestors]
    assert not bad, "\n".join(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import): Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return out


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]] and _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    edges: dict[str, set[str]] = defaultdict(set)
    for module, imps in IMPORTS.items():
        edges[module] |= {imp.target for imp in imps if _internal(imp) and imp.target != module}
    cycles = _cycles(dict(edges))
    detail = []
    for comp in cycles:
        members = set(comp)
        detail += [str(imp) for m in comp for imp in IMPORTS[m] if imp.target in members and imp.target != m]
    assert not cycles, f"import cycles {cycles}:\n  " + "\n  ".join(detail)


def test_importing_the_layer_and_models_loads_no_checkpoint_training_or_data_code():
    """``import switchformer.moe`` / ``switchformer.models`` stays light: interop is imported when
    ``switchformer.from_pretrained`` is first called, and training, data and plotting code not at all."""
    code = ("import sys, switchformer, switchformer.moe, switchformer.models; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('switchformer', 'matplotlib', 'sentencepiece'))))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                timeout=120).stdout.split())
    heavy = {m for m in loaded if m.startswith("switchformer.") and _group(m) in {"interop", "train", "data", "cli"}}
    heavy |= {m for m in loaded if m.split(".")[0] in {"matplotlib", "sentencepiece"}}
    assert not heavy, sorted(heavy)


def test_data_third_party_imports():
    """data depends only on numpy, torch, sentencepiece and the standard library (datasets/pyarrow lazily)."""
    seen = set()
    for module, imps in IMPORTS.items():
        if _group(module) != "data":
            continue
        for imp in imps:
            top = imp.target.split(".")[0]
            seen.add(top)
            if top in ("switchformer", "__future__"):
                continue
            if top in DATA_OPTIONAL_LAZY:
                assert imp.lazy, f"{imp}: must be imported lazily, inside a function"
            else:
                assert top in DATA_THIRD_PARTY or top in sys.stdlib_module_names, str(imp)
    assert DATA_THIRD_PARTY <= seen
