"""Fine-tuning tasks: function extraction checked against the ast module, the hash split (deterministic, one split
per function, independent of the other files), and text-to-text data files with their errors."""

from __future__ import annotations

import ast
import json
import sys
import textwrap

import pytest

from switchformer.config import FinetuneConfig
from switchformer.data.tasks import (
    BUILTIN_TASKS,
    NAME_MASK,
    builtin_examples,
    docstring_example,
    extract_functions,
    load_task,
    name_example,
    split_of,
    unit_hash,
)
from switchformer.errors import DataError

MODULE = textwrap.dedent('''
    """A module docstring."""
    import functools


    def area(width, height):
        """Return the area of a rectangle.

        More text that is not the first line.
        """
        return width * height


    @functools.cache
    def fib(n):
        """Compute fib numbers recursively; fib(0) is 0."""
        if n < 2:
            return n
        return fib(n - 1) + fib(n - 2)


    def stub(x):
        """Do nothing here at all."""
        raise NotImplementedError("subclasses")


    def no_doc(x):
        return x


    def one_line(x): "Docstring on the def line."; return x


    class Shape:
        """A shape."""

        def __init__(self, sides):
            """Make a shape with some sides."""
            self.sides = sides

        def describe(self, verbose=False):
            """Describe the shape in words.

            The method's _describe helper is not its name.
            """
            def helper():
                """A nested helper is not extracted."""
                return "x"
            return f"{self.sides} sides" + self._describe + helper()

        class Inner:
            def scale(self, k):
                """Scale the inner thing by k."""
                return k * 2


    if True:
        def conditional(a):
            """A function defined under an if statement."""
            return a
''')


def _statements(source: str) -> list[str]:
    fn = ast.parse(source).body[0]
    return [ast.dump(s) for s in fn.body]


def test_extraction_matches_the_ast():
    fns = extract_functions("pkg/mod.py", MODULE)
    assert [f.location for f in fns] == ["pkg/mod.py:area", "pkg/mod.py:fib", "pkg/mod.py:Shape.describe",
                                         "pkg/mod.py:Shape.Inner.scale", "pkg/mod.py:conditional"]
    for fn in fns:
        tree = ast.parse(fn.source)  # the dedented source parses on its own, decorators left out
        node = tree.body[0]
        assert isinstance(node, ast.FunctionDef) and node.name == fn.name and not node.decorator_list
        assert ast.get_docstring(node) == fn.docstring
        # without the docstring: the same statements minus the first, and no docstring
        bare = ast.parse(fn.without_docstring).body[0]
        assert ast.get_docstring(bare) is None
        assert _statements(fn.without_docstring) == _statements(fn.source)[1:]


def test_name_example_masks_every_occurrence_and_only_whole_words():
    fns = {f.name: f for f in extract_functions("m.py", MODULE)}
    ex = name_example(fns["fib"])
    assert ex.target == "fib" and ex.id == "m.py:fib"
    assert ex.input.count(NAME_MASK) == 5  # the def, two mentions in the docstring, two recursive calls
    assert ex.input.replace(NAME_MASK, "fib") == fns["fib"].source
    ex = name_example(fns["describe"])
    assert ex.input.count(NAME_MASK) == 1 and "self._describe" in ex.input  # `_describe` is another identifier


def test_docstring_example_is_the_first_line_of_the_docstring():
    fns = {f.name: f for f in extract_functions("m.py", MODULE)}
    ex = docstring_example(fns["area"])
    assert ex.target == "Return the area of a rectangle." and '"""' not in ex.input
    assert ex.input == "def area(width, height):\n    return width * height\n"
    # fewer than three words: no example
    short = extract_functions("s.py", 'def f(x):\n    """Short doc."""\n    return x\n')[0]
    assert docstring_example(short) is None


def test_duplicated_inputs_are_dropped():
    files = [("a.py", MODULE), ("b.py", MODULE)]
    examples, duplicates = builtin_examples("stdlib-name", files)
    assert duplicates == len(examples) == 5
    assert all(e.id.startswith("a.py:") for e in examples)


def test_split_is_a_hash_of_the_key():
    for key in ["json/decoder.py:JSONDecoder.raw_decode", "a.py:f", ""]:
        u = unit_hash(key)
        assert 0 <= u < 1 and u == unit_hash(key)
        expected = "test" if u < 0.1 else "validation" if u < 0.3 else "train"
        assert split_of(key, 0.2, 0.1) == expected


def _cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(**kw)


@pytest.fixture(scope="module")
def stdlib_name_tasks(tmp_path_factory):
    """stdlib-name from the first 120 kB and the first 450 kB of the standard library, twice the latter (cached,
    then not)."""
    cache = tmp_path_factory.mktemp("cache")
    small = load_task(_cfg(task="stdlib-name", max_bytes=120_000, val_fraction=0.2, test_fraction=0.1))
    big = load_task(_cfg(task="stdlib-name", max_bytes=450_000, val_fraction=0.2, test_fraction=0.1), cache)
    again = load_task(_cfg(task="stdlib-name", max_bytes=450_000, val_fraction=0.2, test_fraction=0.1), cache)
    return small, big, again


def test_builtin_split_is_deterministic_and_by_location(stdlib_name_tasks):
    small, big, again = stdlib_name_tasks
    assert big.splits == again.splits  # the cached copy and a fresh extraction agree
    sizes = big.sizes()
    assert sizes["train"] > 100 and sizes["validation"] > 10 and sizes["test"] > 5, sizes
    where: dict[str, str] = {}
    inputs: dict[str, str] = {}
    for split, examples in big.splits.items():
        for ex in examples:
            assert split_of(ex.id, 0.2, 0.1) == split
            assert where.setdefault(ex.id, split) == split  # a function is in one split
            key = " ".join(ex.input.split())
            assert inputs.setdefault(key, split) == split  # no input in two splits
    # a function keeps its split when more files are read: the split depends on nothing else
    for split, examples in small.splits.items():
        for ex in examples:
            assert where[ex.id] == split


def test_builtin_task_sizes_follow_the_fractions(stdlib_name_tasks):
    _, big, _ = stdlib_name_tasks
    n = sum(big.sizes().values())
    assert abs(big.sizes()["validation"] / n - 0.2) < 0.08 and abs(big.sizes()["test"] / n - 0.1) < 0.06


def test_docstring_task_and_metric_choice():
    data = load_task(_cfg(task="stdlib-docstring", max_bytes=150_000))
    assert data.metric == "rougeL" and data.metrics == BUILTIN_TASKS["stdlib-docstring"][2]
    for ex in data.splits["train"][:50]:
        assert 3 <= len(ex.target.split()) and len(ex.target) <= 120 and "\n" not in ex.target
    data = load_task(_cfg(task="stdlib-name", max_bytes=150_000, metric="subtoken_f1"))
    assert data.metric == "subtoken_f1" and data.metrics[0] == "subtoken_f1"


def test_unknown_task_is_a_clear_error():
    with pytest.raises(DataError, match="not a built-in task.*stdlib-name"):
        load_task(_cfg(task="no-such-task"))


# --------------------------------------------------------------------------------------------------------------
# data files


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


RECORDS = [{"question": f"what is {i} plus {i}?", "answer": 2 * i} for i in range(200)]


def test_jsonl_csv_and_parquet_files(tmp_path):
    cfg = dict(input_field="question", target_field="answer", val_fraction=0.1, test_fraction=0.1)
    f = _write_jsonl(tmp_path / "qa.jsonl", RECORDS)
    data = load_task(_cfg(task=str(f), **cfg))
    assert data.metric == "exact_match" and sum(data.sizes().values()) == 200
    all_examples = [e for split in data.splits.values() for e in split]
    assert sorted(e.target for e in all_examples) == sorted(str(r["answer"]) for r in RECORDS)  # ints as text
    for split, examples in data.splits.items():
        for e in examples:
            assert split_of(" ".join(e.input.split()), 0.1, 0.1) == split  # by a hash of the input
    assert data.splits == load_task(_cfg(task=str(f), **cfg)).splits
    # the same records as CSV
    import csv

    c = tmp_path / "qa.csv"
    with open(c, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["question", "answer"])
        w.writeheader()
        w.writerows(RECORDS)
    from_csv = load_task(_cfg(task=str(c), **cfg))
    assert [(e.input, e.target) for e in from_csv.splits["train"]] == \
        [(e.input, e.target) for e in data.splits["train"]]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    p = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), p)
    from_parquet = load_task(_cfg(task=str(p), **cfg))
    assert [(e.input, e.target) for e in from_parquet.splits["validation"]] == \
        [(e.input, e.target) for e in data.splits["validation"]]


def test_directory_of_split_files(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    _write_jsonl(d / "train.jsonl", [{"input": f"in {i}", "target": f"out {i}"} for i in range(30)])
    _write_jsonl(d / "dev.jsonl", [{"input": f"dev {i}", "target": "x"} for i in range(4)])
    data = load_task(_cfg(task=str(d)))
    assert data.sizes() == {"train": 30 - len(data.splits["test"]), "validation": 4, "test": len(data.splits["test"])}
    assert all(e.input.startswith("dev") for e in data.splits["validation"])
    assert any("test held out from train" in n for n in data.notes)


def test_missing_field_names_the_field_and_the_fix(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "b"}])
    with pytest.raises(DataError, match=r"no field 'input'.*\['label', 'text'\].*finetune.input_field"):
        load_task(_cfg(task=str(f)))
    with pytest.raises(DataError, match=r"no field 'target'.*finetune.target_field"):
        load_task(_cfg(task=str(f), input_field="text"))


def test_bad_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_task(_cfg(task=str(bad)))
    txt = tmp_path / "data.txt"
    txt.write_text("a\n")
    with pytest.raises(DataError, match=r"must be \.jsonl, \.csv or \.parquet"):
        load_task(_cfg(task=str(txt)))


def test_datasets_without_the_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"needs the datasets package.*switchformer\[data\]"):
        load_task(_cfg(task="hf:glue:sst2"))
