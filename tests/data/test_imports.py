"""The data package depends only on numpy, torch, sentencepiece, the standard library, switchformer.config and
switchformer.errors: data never imports models or train."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import switchformer.data

ALLOWED_THIRD_PARTY = {"numpy", "torch", "sentencepiece"}
OPTIONAL_LAZY = {"datasets", "pyarrow"}  # imported inside functions, only for the inputs that need them


def test_data_imports_only_allowed_modules():
    root = Path(switchformer.data.__file__).parent
    seen = set()
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [(a.name, node) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [(node.module, node)]
            else:
                continue
            for name, n in names:
                top = name.split(".")[0]
                seen.add(top)
                if top == "switchformer":
                    allowed = name in ("switchformer.config", "switchformer.errors")
                    assert allowed or name.startswith("switchformer.data"), (path, name)
                elif top in OPTIONAL_LAZY:
                    assert n.col_offset > 0, f"{path.name}: {name} must be imported lazily, inside a function"
                elif top != "__future__":
                    assert top in ALLOWED_THIRD_PARTY or top in sys.stdlib_module_names, (path.name, name)
    assert {"numpy", "torch", "sentencepiece"} <= seen
