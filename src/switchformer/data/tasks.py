"""Fine-tuning tasks: text-to-text examples (input -> target) in train / validation / test splits (paper §4.1).

``load_task(FinetuneConfig) -> TaskData``; ``FinetuneConfig.task`` is one of:

- ``stdlib-name``: a function's source (signature, docstring and body) with every occurrence of its name replaced
  by ``<extra_id_0>`` -> the name. Metric: exact match (and sub-token F1 beside it).
- ``stdlib-docstring``: a function's source without its docstring -> the first line of the docstring. Metric:
  ROUGE-L (and ROUGE-1/2 beside it).
- a ``.jsonl``, ``.csv`` or ``.parquet`` file (Parquet needs ``pyarrow``) whose records hold the input and the
  target in the fields ``FinetuneConfig.input_field`` / ``target_field``; a directory of such files named
  ``train.*``, ``validation.*`` (or ``valid.*``, ``val.*``, ``dev.*``) and ``test.*``; a directory written by
  ``datasets``' ``save_to_disk``; or ``hf:NAME[:CONFIG]``, a Hugging Face dataset (``datasets``, imported only then).

The two built-in tasks are made from the Python files of ``FinetuneConfig.task_corpus`` (default ``stdlib``: the
standard library that the default pretraining corpus is made of, so nothing is downloaded). Functions and methods
that have a docstring are extracted with :mod:`ast` (functions nested inside functions, dunder methods and
functions whose body is only ``pass`` / ``...`` / ``raise NotImplementedError`` are left out), examples whose input
repeats an earlier one are dropped, and each function goes to a split by a hash of its qualified location
(``json/decoder.py:JSONDecoder.raw_decode``): deterministic, the same on every machine and run, independent of the
other functions, and a function (with all its examples) is in exactly one split. Targets are capped in characters
here (the name at ``MAX_NAME_CHARS``, the docstring line at ``MAX_DOCSTRING_CHARS``); inputs and targets are cut to
``FinetuneConfig.input_length`` / ``target_length`` tokens when they are encoded, while metrics score against the
full target text.

Data without its own validation or test split is split the same way, by a hash of each record's input text (so
repeated inputs stay together), with ``FinetuneConfig.val_fraction`` and ``test_fraction``.

This module imports only the standard library, numpy, ``switchformer.config`` and ``switchformer.errors``
(``pyarrow`` and ``datasets`` lazily, for the inputs that need them).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import os
import re
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from switchformer.config import DataConfig, FinetuneConfig
from switchformer.errors import DataError

TASKS_VERSION = "stdlib-tasks-v1"
"""Bumped when extraction changes, so cached task files of an older extraction are not reused."""

SPLITS = ("train", "validation", "test")
NAME_MASK = "<extra_id_0>"
"""What replaces the function's name in ``stdlib-name`` inputs (T5's first sentinel: 'a span is missing here')."""
MAX_NAME_CHARS = 40
"""``stdlib-name`` keeps functions whose name has at most this many characters."""
MAX_DOCSTRING_CHARS = 120
"""``stdlib-docstring`` keeps docstring first lines of 3 words to this many characters."""
MAX_SOURCE_CHARS = 20_000
"""Functions longer than this (a few generated tables) are left out: their inputs would be cut anyway."""

BUILTIN_TASKS = {
    "stdlib-name": ("a function's source with its name masked -> the name", "exact_match",
                    ("exact_match", "subtoken_f1")),
    "stdlib-docstring": ("a function's source without its docstring -> the docstring's first line", "rougeL",
                         ("rougeL", "rouge1", "rouge2")),
}
"""Built-in task name -> (description, primary metric, every metric reported)."""

DEFAULT_METRIC = "exact_match"
"""Primary metric of text-to-text data when ``finetune.metric`` is 'auto'."""

_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                  "val": "validation", "dev": "validation", "test": "test"}
_FILE_SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class Example:
    """One text-to-text example.

    Attributes:
        id: where it comes from: ``path:Qualified.name`` for the built-in tasks, ``file#line`` (JSONL, CSV) or
            ``file#row`` (Parquet, datasets) for data files.
        input: the model's input text.
        target: the reference output text (metrics score against it, uncut).
    """

    id: str
    input: str
    target: str


@dataclass
class TaskData:
    """A task's examples by split, and how to score them.

    Attributes:
        name: the task (a built-in name, or the data's path / ``hf:`` name).
        description: one line saying what maps to what.
        metric: the primary metric (higher is better; the best checkpoint is chosen by it).
        metrics: every metric reported (the primary one first).
        splits: ``{"train": [...], "validation": [...], "test": [...]}`` (test may be empty).
        notes: how the data was read and split (dropped examples, hash splits).
    """

    name: str
    description: str
    metric: str
    metrics: tuple[str, ...]
    splits: dict[str, list[Example]]
    notes: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        """Examples per split."""
        return {s: len(self.splits.get(s, [])) for s in SPLITS}

    def summary(self) -> str:
        """One paragraph: the task, its sizes and metric, and the notes."""
        sizes = ", ".join(f"{n} {s}" for s, n in self.sizes().items())
        return "\n".join([f"task {self.name!r}: {self.description}; {sizes}; metric {self.metric}", *self.notes])


def unit_hash(key: str) -> float:
    """A deterministic number in [0, 1) from ``key`` (sha256; the same on every machine and Python version)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """The split of the example (or function) keyed ``key``: test when its hash is below ``test_fraction``,
    validation below ``test_fraction + val_fraction``, else train."""
    u = unit_hash(key)
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + val_fraction else "train"


# --------------------------------------------------------------------------------------------------------------
# The built-in tasks: functions of Python source files


@dataclass(frozen=True)
class FunctionSource:
    """A function or method extracted from a Python file.

    Attributes:
        location: ``relative/path.py:Class.name`` (the split key).
        name: the function's name.
        source: its source from the ``def`` line (decorators left out), dedented.
        without_docstring: ``source`` with the docstring's lines removed.
        docstring: the cleaned docstring (``inspect.cleandoc`` rules, as ``ast.get_docstring`` applies them).
    """

    location: str
    name: str
    source: str
    without_docstring: str
    docstring: str


def _is_trivial_body(body: list[ast.stmt]) -> bool:
    """True when the statements (docstring removed) do nothing: empty, ``pass``, ``...`` or ``raise
    NotImplementedError``."""
    for stmt in body:
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis:
            continue
        if isinstance(stmt, ast.Raise) and stmt.exc is not None:
            exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
            if isinstance(exc, ast.Name) and exc.id == "NotImplementedError":
                continue
        return False
    return True


def extract_functions(path: str, text: str) -> list[FunctionSource]:
    """Functions and methods of one Python file that have a docstring and a body that does something.

    Module-level functions and methods of (nested) classes are taken; functions defined inside functions, dunder
    methods (``__init__``...) and functions longer than ``MAX_SOURCE_CHARS`` are not. A file that does not parse
    (Python 2 examples, a file cut by ``max_bytes``) yields nothing.

    Args:
        path: the file's name relative to its corpus (the first part of every location).
        text: the file's source.
    """
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    out: list[FunctionSource] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                fn = _function(node, lines, f"{path}:{prefix}{node.name}")
                if fn is not None:
                    out.append(fn)
            elif isinstance(node, (ast.If, ast.Try)):  # `if sys.platform == ...: def f(): ...`
                for part in (node.body, node.orelse, getattr(node, "finalbody", [])):
                    visit(part, prefix)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body, prefix)

    visit(tree.body, "")
    return out


def _function(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], location: str) -> FunctionSource | None:
    name = node.name
    if name.startswith("__") and name.endswith("__"):
        return None
    docstring = ast.get_docstring(node, clean=True)
    if not docstring or not docstring.strip() or _is_trivial_body(node.body[1:]):
        return None
    first, last = node.lineno - 1, node.end_lineno  # the def line (decorators excluded) .. the last line
    source_lines = lines[first:last]
    if sum(len(s) for s in source_lines) > MAX_SOURCE_CHARS:
        return None
    doc = node.body[0]
    # the docstring's own lines; a docstring sharing its line with the def (`def f(): "doc"; ...`) cannot be cut out
    if doc.lineno - 1 <= first:
        return None
    kept = lines[first : doc.lineno - 1] + lines[doc.end_lineno : last]
    source = textwrap.dedent("".join(source_lines)).rstrip() + "\n"
    without = textwrap.dedent("".join(kept)).rstrip() + "\n"
    return FunctionSource(location, name, source, without, docstring)


def name_example(fn: FunctionSource) -> Example | None:
    """The ``stdlib-name`` example of ``fn``: every whole-word occurrence of the name (the def, recursive calls,
    mentions in the docstring) becomes ``NAME_MASK``; None when the name is longer than ``MAX_NAME_CHARS``."""
    if len(fn.name) > MAX_NAME_CHARS:
        return None
    masked = re.sub(rf"(?<![\w]){re.escape(fn.name)}(?![\w])", NAME_MASK, fn.source)
    return Example(fn.location, masked, fn.name)


def docstring_example(fn: FunctionSource) -> Example | None:
    """The ``stdlib-docstring`` example of ``fn``: its source without the docstring -> the docstring's first line;
    None when that line has fewer than 3 words or more than ``MAX_DOCSTRING_CHARS`` characters."""
    first_line = fn.docstring.strip().splitlines()[0].strip()
    if len(first_line.split()) < 3 or len(first_line) > MAX_DOCSTRING_CHARS:
        return None
    return Example(fn.location, fn.without_docstring, first_line)


_MAKERS = {"stdlib-name": name_example, "stdlib-docstring": docstring_example}


def _normalized(text: str) -> str:
    return " ".join(text.split())


def builtin_examples(task: str, files: Iterable[tuple[str, str]]) -> tuple[list[Example], int]:
    """Examples of built-in ``task`` from ``(path, source)`` pairs, in file order, duplicates removed.

    Returns:
        (examples, number of dropped duplicates). An example whose input (whitespace-normalised) equals an earlier
        one's is dropped, so the same function copied into two modules is one example in one split.
    """
    make = _MAKERS[task]
    seen: set[str] = set()
    out: list[Example] = []
    duplicates = 0
    for path, text in files:
        for fn in extract_functions(path, text):
            ex = make(fn)
            if ex is None:
                continue
            key = hashlib.sha256(_normalized(ex.input).encode("utf-8")).hexdigest()
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            out.append(ex)
    return out, duplicates


def _python_files(cfg: FinetuneConfig) -> tuple[list[tuple[str, str]], str]:
    """(path, source) of the .py documents of ``cfg.task_corpus`` sorted by path, and their fingerprint."""
    from switchformer.data.sources import load_corpus

    corpus = load_corpus(DataConfig(corpus=cfg.task_corpus, val_fraction=0.0))
    files = sorted((n, t) for n, t in zip(corpus.train_names + corpus.val_names,
                                          corpus.train_texts + corpus.val_texts, strict=True) if n.endswith(".py"))
    if cfg.max_bytes is not None:  # whole files in path order (a file cut in the middle would not parse)
        kept, total = [], 0
        for n, t in files:
            size = len(t.encode("utf-8"))
            if kept and total + size > cfg.max_bytes:
                break
            kept.append((n, t))
            total += size
        files = kept
    if not files:
        raise DataError(f"finetune.task_corpus {cfg.task_corpus!r} has no .py files; the built-in tasks are made "
                        "from Python source (use 'stdlib' or a directory of .py files)")
    h = hashlib.sha256(TASKS_VERSION.encode())
    for n, t in files:
        h.update(n.encode("utf-8") + b"\x00" + t.encode("utf-8") + b"\x00")
    return files, h.hexdigest()


def _load_builtin(cfg: FinetuneConfig, cache_dir: str | os.PathLike | None) -> TaskData:
    files, fingerprint = _python_files(cfg)
    cache = Path(cache_dir) / f"task-{cfg.task}-{fingerprint[:16]}.json" if cache_dir is not None else None
    examples = None
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            examples = [Example(*e) for e in data["examples"]]
            duplicates = int(data["duplicates"])
        except (OSError, ValueError, KeyError, TypeError):
            examples = None  # a damaged cache file is rebuilt
    if examples is None:
        examples, duplicates = builtin_examples(cfg.task, files)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": TASKS_VERSION, "duplicates": duplicates,
                                       "examples": [[e.id, e.input, e.target] for e in examples]}), encoding="utf-8")
            os.replace(tmp, cache)
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for ex in examples:
        splits[split_of(ex.id, cfg.val_fraction, cfg.test_fraction)].append(ex)
    description, metric, metrics = BUILTIN_TASKS[cfg.task]
    notes = [f"from {len(files)} Python files of {cfg.task_corpus!r} ({TASKS_VERSION}); {duplicates} duplicate "
             f"inputs dropped; split by a hash of the function's location (validation {cfg.val_fraction:g}, test "
             f"{cfg.test_fraction:g})"]
    return TaskData(cfg.task, description, metric, metrics, splits, notes)


# --------------------------------------------------------------------------------------------------------------
# Text-to-text data from files and datasets


def _field_error(where: str, fields: list[str], missing: str, which: str) -> DataError:
    return DataError(f"{where} has no field {missing!r} (it has {fields}); set finetune.{which}_field to the field "
                     f"that holds the {which}")


def _record_example(record: object, cfg: FinetuneConfig, where: str, ident: str) -> Example | None:
    """The example of one record; None for a record whose input or target is empty (null)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be an object with fields {cfg.input_field!r} and "
                        f"{cfg.target_field!r}, got {type(record).__name__}")
    for which, name in (("input", cfg.input_field), ("target", cfg.target_field)):
        if name not in record:
            raise _field_error(where, sorted(record), name, which)
    inp, tgt = record[cfg.input_field], record[cfg.target_field]
    if inp is None or tgt is None:
        return None
    if not isinstance(inp, str):
        raise DataError(f"{where}: field {cfg.input_field!r} is {type(inp).__name__}, not text")
    tgt = tgt if isinstance(tgt, str) else str(tgt)  # class labels (ints, bools) are scored as their text
    if not inp.strip() or not tgt.strip():
        return None
    return Example(ident, inp, tgt)


def _jsonl_records(path: Path) -> Iterator[tuple[str, str, object]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where} is not valid UTF-8 (byte {e.start}); convert the file") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg}); a .jsonl file holds one object per line") from e
            yield where, f"{path.name}#{lineno}", record


def _csv_records(path: Path) -> Iterator[tuple[str, str, object]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte {e.start}); convert the file") from e
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path} is empty; a .csv file needs a header row naming its fields")
    for row in reader:
        lineno = reader.line_num
        yield f"{path}:{lineno}", f"{path.name}#{lineno}", row


def _parquet_records(path: Path) -> Iterator[tuple[str, str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {path} needs the pyarrow package: pip install pyarrow (or pip install "
                        "'switchformer[data]')") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid on a file that is not Parquet
        raise DataError(f"{path} is not a readable Parquet file ({e})") from e
    for i, record in enumerate(table.to_pylist()):
        yield f"{path} row {i}", f"{path.name}#{i}", record


def _file_records(path: Path) -> Iterator[tuple[str, str, object]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_records(path)
    if suffix == ".csv":
        return _csv_records(path)
    if suffix == ".parquet":
        return _parquet_records(path)
    raise DataError(f"finetune.task {str(path)!r}: a data file must be .jsonl, .csv or .parquet")


def _examples(records: Iterable[tuple[str, str, object]], cfg: FinetuneConfig,
              what: str) -> tuple[list[Example], int]:
    out, empty = [], 0
    for where, ident, record in records:
        ex = _record_example(record, cfg, where, ident)
        if ex is None:
            empty += 1
        else:
            out.append(ex)
    if not out:
        raise DataError(f"{what} holds no example with a non-empty {cfg.input_field!r} and {cfg.target_field!r}")
    return out, empty


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{what} needs the datasets package: pip install datasets (or pip install "
                        "'switchformer[data]')") from e
    return datasets


def _dataset_splits(spec: str) -> dict[str, Iterable[tuple[str, str, object]]]:
    """Named splits of a ``datasets`` directory or ``hf:NAME[:CONFIG]``."""
    datasets = _import_datasets(f"finetune.task={spec}")
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise DataError(f"finetune.task {spec!r}: write hf:NAME or hf:NAME:CONFIG, e.g. hf:glue:sst2")
        try:
            ds = datasets.load_dataset(name, config or None)
        except Exception as e:  # offline, unknown name, gated: all end in the same advice
            raise DataError(f"could not load the Hugging Face dataset {name!r} (config {config or None!r}): "
                            f"{type(e).__name__}: {e}. Offline, run datasets.load_dataset(...).save_to_disk(DIR) on "
                            "a connected machine, copy DIR here and pass --task DIR") from e
    else:
        ds = datasets.load_from_disk(spec)
    if not isinstance(ds, datasets.DatasetDict):
        ds = {"train": ds}
    label = spec if spec.startswith("hf:") else Path(spec).name

    def rows(split_name: str, d) -> Iterator[tuple[str, str, object]]:
        for i, record in enumerate(d):
            yield f"{label}[{split_name}] row {i}", f"{label}/{split_name}#{i}", record

    out: dict[str, Iterable[tuple[str, str, object]]] = {}
    for split_name, d in ds.items():
        canonical = _SPLIT_ALIASES.get(split_name.lower())
        if canonical is not None and canonical not in out:
            out[canonical] = rows(split_name, d)
    return out


def _is_datasets_dir(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (
        (p / "state.json").is_file() and (p / "dataset_info.json").is_file()
    )


def _directory_splits(p: Path) -> dict[str, Iterable[tuple[str, str, object]]]:
    """``train.*`` / ``validation.*`` / ``test.*`` data files of a directory."""
    out: dict[str, Iterable[tuple[str, str, object]]] = {}
    for f in sorted(p.iterdir()):
        canonical = _SPLIT_ALIASES.get(f.stem.lower())
        if f.is_file() and f.suffix.lower() in _FILE_SUFFIXES and canonical is not None:
            if canonical in out:
                raise DataError(f"{p} holds two {canonical} files; keep one")
            out[canonical] = _file_records(f)
    if "train" not in out:
        raise DataError(f"finetune.task directory {str(p)!r} has no train file: name the files train.jsonl (.csv, "
                        ".parquet), validation.jsonl and test.jsonl")
    return out


def _load_data(cfg: FinetuneConfig) -> TaskData:
    spec = cfg.task.strip()
    p = Path(os.path.expanduser(spec))
    if spec.startswith("hf:") or (p.is_dir() and _is_datasets_dir(p)):
        named = _dataset_splits(spec if spec.startswith("hf:") else str(p))
    elif p.is_dir():
        named = _directory_splits(p)
    elif p.is_file():
        named = {"train": _file_records(p)}
    else:
        raise DataError(f"finetune.task {spec!r} is not a built-in task ({', '.join(BUILTIN_TASKS)}), a data file, a "
                        "directory or hf:NAME; pass --task stdlib-name, or the path of a .jsonl/.csv/.parquet file")
    if "train" not in named:
        raise DataError(f"finetune.task {spec!r} has no train split (it has {sorted(named)})")
    splits: dict[str, list[Example]] = {}
    notes: list[str] = []
    for s in SPLITS:
        if s in named:
            splits[s], empty = _examples(named[s], cfg, f"the {s} split of {spec!r}")
            if empty:
                notes.append(f"{empty} {s} records with an empty input or target skipped")
    missing = [s for s in ("validation", "test") if s not in splits]
    if missing:
        # held out from train by a hash of the input, so repeated inputs stay on one side
        val_fraction = cfg.val_fraction if "validation" in missing else 0.0
        test_fraction = cfg.test_fraction if "test" in missing else 0.0
        parts: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for ex in splits["train"]:
            parts[split_of(_normalized(ex.input), val_fraction, test_fraction)].append(ex)
        if not parts["train"]:
            raise DataError(f"finetune.task {spec!r}: every example went to the held-out splits; lower "
                            "finetune.val_fraction / finetune.test_fraction")
        splits["train"] = parts["train"]
        for s in missing:
            splits[s] = parts[s]
        notes.append(f"{' and '.join(missing)} held out from train by a hash of the input ("
                     + ", ".join(f"{s} {cfg.val_fraction if s == 'validation' else cfg.test_fraction:g}"
                                 for s in missing) + ")")
    metric = DEFAULT_METRIC if cfg.metric == "auto" else cfg.metric
    return TaskData(spec, f"{cfg.input_field!r} -> {cfg.target_field!r}", metric, (metric,), splits, notes)


def load_task(cfg: FinetuneConfig, cache_dir: str | os.PathLike | None = None) -> TaskData:
    """The examples of ``cfg.task`` by split, with its metrics (see the module docstring).

    Args:
        cfg: the fine-tuning config (``task``, fields, ``task_corpus``, ``max_bytes``, split fractions, metric).
        cache_dir: where the built-in tasks' extracted examples are cached (keyed by the source files); None
            extracts every time.

    Raises:
        DataError: an unknown task, a missing file or field, unreadable data, or a split left empty.
    """
    if cfg.task in BUILTIN_TASKS:
        data = _load_builtin(cfg, cache_dir)
        if cfg.metric != "auto" and cfg.metric != data.metric:
            data.metric = cfg.metric
            data.metrics = (cfg.metric, *[m for m in data.metrics if m != cfg.metric])
    else:
        data = _load_data(cfg)
    for s in ("train", "validation"):
        if not data.splits[s]:
            raise DataError(f"task {data.name!r} has no {s} examples ({data.sizes()}); use more data (for the "
                            "built-in tasks raise finetune.max_bytes) or raise finetune.val_fraction")
    return data
