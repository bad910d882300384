"""Where pretraining text comes from: ``load_corpus(DataConfig) -> Corpus`` (paper §3; the paper used C4).

``DataConfig.corpus`` is one of:

- ``"stdlib"`` (default): the ``.py`` sources (and the few ``.txt``/``.rst`` docs) of the running Python's standard
  library, without tests, ``idlelib``, ``site-packages`` and generated files. About 11 MB of code, present on every
  machine, so a pretraining run needs no download.
- comma-separated paths, directories or globs (``data/*.txt,extra/**/*.md``). ``*.jsonl`` files hold one JSON object
  per line with the text in ``DataConfig.text_field``; ``*.parquet`` files (needs ``pyarrow``) hold it in that
  column; a directory written by ``datasets``' ``save_to_disk`` is read with ``datasets``; any other file is UTF-8
  text and one document.
- ``hf:NAME[:CONFIG]``: the train split of a Hugging Face dataset, streamed (needs ``datasets`` and network).
- ``fortunes:LANG``: the fortunes of Debian's ``fortunes``/``fortunes-LANG`` packages, one document per fortune
  (``switchformer.data.fortunes``).

With ``data.languages`` or ``data.language_field`` the corpus is multilingual: ``switchformer.data.load_corpus``
reads it with ``switchformer.data.multilingual``, which splits each language on its own and mixes the training
documents with mT5's temperature sampling.

Documents go to validation when a hash of their name (path relative to the corpus root, plus ``#line`` for JSONL
records) falls below ``val_fraction``: deterministic, independent of the seed and of the other files. A corpus of
a single document is split at a line boundary instead (its last ``val_fraction`` of lines).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from switchformer.config import DataConfig
from switchformer.errors import DataError

# Directory names left out of the "stdlib" corpus: tests (mostly data and generated cases), IDLE, third-party
# packages, caches, demo scripts and bundled wheels.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "turtledemo",
        "ensurepip",
        "pydoc_data",  # one generated 700 kB file of help topics
        "encodings",  # generated charmap tables
    }
)
_STDLIB_SUFFIXES = (".py", ".txt", ".rst")
# Directory inputs: file suffixes read as text (others in the directory are ignored).
_TEXT_SUFFIXES = frozenset(
    {
        ".txt",
        ".md",
        ".rst",
        ".py",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".js",
        ".ts",
        ".rs",
        ".go",
        ".java",
        ".json",
        ".toml",
        ".yaml",
        ".yml",
        ".html",
        ".tex",
        ".jsonl",
        ".parquet",
    }
)
_HF_STREAM_DEFAULT_MAX_BYTES = 256 * 2**20  # a streamed Hub dataset can be terabytes; cap unless told otherwise


@dataclass
class Corpus:
    """Texts of a pretraining corpus, split into train and validation documents.

    Attributes:
        train_texts: training documents.
        val_texts: validation documents.
        train_names: names of the training documents (relative paths, ``path#line`` for records).
        val_names: names of the validation documents.
        source: the ``DataConfig.corpus`` string it came from.
        num_files: input files (or datasets) read.
        num_bytes: UTF-8 bytes of all documents.
        fingerprint: sha256 of names, texts and split; keys the tokenizer and token caches.
        truncated: True when ``max_bytes`` cut the corpus.
        notes: remarks for the summary (skipped files, fallbacks).
        num_tokens: filled by ``make_loader`` when given the corpus: ``{"train": n, "val": m}``.
    """

    train_texts: list[str]
    val_texts: list[str]
    train_names: list[str]
    val_names: list[str]
    source: str
    num_files: int
    num_bytes: int
    fingerprint: str
    truncated: bool = False
    notes: list[str] = field(default_factory=list)
    num_tokens: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One paragraph: files, documents, bytes and (when known) tokens per split."""
        tb = sum(len(t.encode("utf-8")) for t in self.train_texts)
        num_docs = len(self.train_texts) + len(self.val_texts)
        lines = [
            f"corpus {self.source!r}: {self.num_files} files, {num_docs} documents "
            f"({len(self.train_texts)} train / {len(self.val_texts)} val), {self.num_bytes:,} bytes "
            f"({tb:,} train / {self.num_bytes - tb:,} val){' [truncated by max_bytes]' if self.truncated else ''}",
        ]
        if self.num_tokens:
            lines.append("tokens: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.num_tokens.items())))
        lines.extend(self.notes)
        lines.append(f"fingerprint {self.fingerprint[:16]}")
        return "\n".join(lines)


class _Budget:
    """Byte budget of ``max_bytes``: documents are taken in order; the one that overflows is cut at a line boundary
    and ends the corpus (deterministic, as the document order is)."""

    def __init__(self, max_bytes: int | None) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise DataError(f"data.max_bytes must be positive or None, got {max_bytes}")
        self.left = max_bytes
        self.exhausted = False

    def take(self, text: str) -> str | None:
        """Return the text to keep (cut at a line boundary when it overflows), or None when the budget is spent."""
        if self.left is None:
            return text
        if self.exhausted:
            return None
        n = len(text.encode("utf-8"))
        if n <= self.left:
            self.left -= n
            return text
        self.exhausted = True
        # Cut the overflowing document at the last newline that fits, so a small budget still yields data.
        cut = text.encode("utf-8")[: self.left].decode("utf-8", errors="ignore")
        cut = cut[: cut.rfind("\n") + 1] if "\n" in cut else ""
        self.left = 0
        return cut if cut.strip() else None


def _check_bytes(data: bytes, where: str) -> str:
    """Decode a file's bytes as UTF-8, rejecting empty, binary and mis-encoded input with a clear error."""
    if not data.strip():
        raise DataError(f"input file {where!r} is empty; remove it from data.corpus")
    if b"\x00" in data:
        raise DataError(f"input file {where!r} looks binary (contains NUL bytes); data.corpus takes text files")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"input file {where!r} is not valid UTF-8 (byte {e.start}: {e.reason}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8`"
        ) from e


def _stdlib_documents(budget: _Budget, notes: list[str]) -> Iterator[tuple[str, str]]:
    """(relative path, text) of the standard library's sources, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS and not d.startswith("config-")]
        for f in filenames:
            if f.endswith(_STDLIB_SUFFIXES) and not f.startswith("_sysconfigdata"):
                paths.append(Path(dirpath, f))
    skipped = 0
    for p in sorted(paths, key=lambda q: q.relative_to(root).as_posix()):
        try:
            data = p.read_bytes()
            text = _check_bytes(data, str(p))
        except (OSError, ValueError):
            skipped += 1  # empty __init__.py files, the odd non-UTF-8 file: not errors for the built-in corpus
            continue
        kept = budget.take(text)
        if kept is None:
            break
        yield p.relative_to(root).as_posix(), kept
    if skipped:
        notes.append(f"skipped {skipped} empty or non-UTF-8 standard-library files")
    notes.append(f"standard library of Python at {root}")


def _glob_base(pattern: str) -> Path:
    """The directory part of a glob before its first wildcard (names are made relative to it)."""
    parts = Path(pattern).parts
    base = []
    for part in parts:
        if glob.has_magic(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


def _expand(part: str) -> list[tuple[Path, str]]:
    """Files (with their document-name prefix) named by one comma-separated element of ``data.corpus``."""
    if glob.has_magic(part):
        matches = sorted(p for p in glob.glob(part, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"data.corpus pattern {part!r} matches no file")
        base = _glob_base(part)
        return [(Path(m), Path(os.path.relpath(m, base)).as_posix()) for m in matches]
    p = Path(part)
    if p.is_dir():
        if _is_datasets_dir(p):
            return [(p, p.name)]
        files = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in _TEXT_SUFFIXES)
        if not files:
            raise DataError(
                f"data.corpus directory {part!r} holds no text files (suffixes {sorted(_TEXT_SUFFIXES)})"
            )
        return [(q, q.relative_to(p).as_posix()) for q in files]
    if not p.exists():
        raise DataError(f"data.corpus input {part!r} does not exist (give files, directories, globs or hf:NAME)")
    return [(p, p.name)]


def _is_datasets_dir(p: Path) -> bool:
    """True for a directory written by ``datasets``' ``save_to_disk`` (Dataset or DatasetDict)."""
    return (p / "dataset_dict.json").is_file() or (
        (p / "state.json").is_file() and (p / "dataset_info.json").is_file()
    )


def _import_datasets(what: str):
    try:
        import datasets  # noqa: PLC0415  (optional dependency, imported only when used)
    except ImportError as e:
        raise DataError(
            f"{what} needs the `datasets` package, which is not installed: pip install datasets "
            "(or pip install 'switchformer[data]')"
        ) from e
    return datasets


def _text_of(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where} has no field {text_field!r} (has {fields}); set data.text_field")
    text = record[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _jsonl_documents(path: Path, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    """One document per JSON line (blank lines and empty texts skipped)."""
    if path.stat().st_size == 0:
        raise DataError(f"input file {str(path)!r} is empty; remove it from data.corpus")
    found = False
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if b"\x00" in raw:
                raise DataError(f"input file {str(path)!r} looks binary (NUL byte on line {lineno})")
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"input file {where!r} is not valid UTF-8 (byte {e.start}); convert it") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg}); a .jsonl file needs one object per line") from e
            text = _text_of(record, text_field, where)
            found = True
            if text.strip():
                yield f"{name}#{lineno}", text
    if not found:
        raise DataError(f"input file {str(path)!r} is empty (no JSON records); remove it from data.corpus")


def _parquet_documents(path: Path, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    """One document per row of column ``text_field``."""
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415  (optional dependency)
    except ImportError as e:
        raise DataError(
            f"reading {str(path)!r} needs the `pyarrow` package, which is not installed: pip install pyarrow"
        ) from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid on non-parquet bytes
        raise DataError(f"input file {str(path)!r} is not a readable Parquet file ({e})") from e
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise DataError(
            f"input file {str(path)!r} has no column {text_field!r} (has {columns}); set data.text_field"
        )
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield f"{name}#{row}", text
            row += 1
    if row == 0:
        raise DataError(f"input file {str(path)!r} is empty (no rows); remove it from data.corpus")


def _datasets_documents(ds, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    for i, record in enumerate(ds):
        text = _text_of(record, text_field, f"{name} row {i}")
        if text.strip():
            yield f"{name}#{i}", text


def _load_from_disk(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    datasets = _import_datasets(f"the datasets directory {str(path)!r}")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        ds = ds[split]
    if len(ds) == 0:
        raise DataError(f"the datasets directory {str(path)!r} is empty")
    return _datasets_documents(ds, path.name, text_field)


def _hub_documents(spec: str, text_field: str) -> Iterator[tuple[str, str]]:
    """``hf:NAME[:CONFIG]``: the streamed train split of a Hub dataset."""
    name, _, config = spec[len("hf:") :].partition(":")
    if not name:
        raise DataError(f"data.corpus {spec!r}: write hf:NAME or hf:NAME:CONFIG, e.g. hf:allenai/c4:en")
    datasets = _import_datasets(f"data.corpus={spec}")
    try:
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except Exception as e:  # offline, unknown name, gated dataset: all surface here
        raise DataError(
            f"could not open Hugging Face dataset {name!r} (config {config or None!r}): {type(e).__name__}: {e}. "
            "Streaming needs the Hub; offline, run `datasets.load_dataset(...).save_to_disk(DIR)` on a connected "
            "machine, copy DIR here and set data.corpus=DIR"
        ) from e
    return _datasets_documents(ds, f"hf:{name}", text_field)


def _unit_hash(name: str) -> float:
    """Deterministic uniform number in [0, 1) from a document name (stable across machines and runs)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def _one_line_split_point(text: str, val_fraction: float) -> int | None:
    """Where to cut a one-line document so that about ``val_fraction`` of it is held out: after the first
    whitespace at or past the cut (else at the cut itself); None when either side would be empty."""
    cut = int(len(text) * (1 - val_fraction))
    m = re.compile(r"\s").search(text, cut)
    if m is not None:
        cut = m.end()
    return cut if 0 < cut < len(text) else None


def _split(
    docs: list[tuple[str, str]], val_fraction: float, notes: list[str]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Hash split by document name; guarantees a non-empty train split and, when possible, a non-empty val split."""
    if val_fraction == 0:
        return docs, []
    if len(docs) == 1:
        name, text = docs[0]
        lines = text.splitlines(keepends=True)
        if len(lines) < 2:  # one long line (minified code, a dump): split it at a space near the fraction
            cut = _one_line_split_point(text, val_fraction)
            if cut is None:
                notes.append("single one-line document: no validation split")
                return docs, []
            notes.append(f"single one-line document: its last {len(text) - cut} characters are the validation split")
            return [(name, text[:cut])], [(f"{name}[val]", text[cut:])]
        k = min(len(lines) - 1, max(1, round(len(lines) * val_fraction)))
        notes.append(f"single document: its last {k} of {len(lines)} lines are the validation split")
        return [(name, "".join(lines[:-k]))], [(f"{name}[val]", "".join(lines[-k:]))]
    hashes = [_unit_hash(n) for n, _ in docs]
    is_val = [h < val_fraction for h in hashes]
    if not any(is_val):  # tiny corpus: hold out the document with the smallest hash
        is_val[min(range(len(docs)), key=hashes.__getitem__)] = True
        notes.append("few documents: held out 1 for validation")
    if all(is_val):
        is_val[max(range(len(docs)), key=hashes.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    return train, val


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read ``cfg.corpus`` into a :class:`Corpus` split into train and validation documents.

    Args:
        cfg: data config (``corpus``, ``text_field``, ``val_fraction``, ``max_bytes``).

    Returns:
        The corpus. Bad inputs (missing, empty, binary, not UTF-8, missing JSON field) raise ValueError naming
        the file.
    """
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.languages or cfg.language_field is not None:
        raise DataError("data.languages / data.language_field make a multilingual corpus: read it with "
                        "switchformer.data.load_corpus (switchformer.data.multilingual), which builds on this module")
    spec = cfg.corpus.strip()
    if not spec:
        raise DataError("data.corpus is empty; use 'stdlib', paths/globs, or hf:NAME")
    budget = _Budget(cfg.max_bytes)
    notes: list[str] = []
    docs: list[tuple[str, str]] = []
    num_files = 0

    def take_all(it: Iterator[tuple[str, str]]) -> None:
        for name, text in it:
            kept = budget.take(text)
            if kept is None:
                break
            docs.append((name, kept))

    if spec == "stdlib":
        for name, text in _stdlib_documents(budget, notes):
            docs.append((name, text))
        num_files = len(docs)
    else:
        # expanduser: the shell leaves "~" alone in "data.corpus=~/x".
        parts = [os.path.expanduser(p.strip()) for p in spec.split(",") if p.strip()]
        for part in parts:
            if budget.exhausted:
                break
            if part.startswith("hf:"):
                if cfg.max_bytes is None and budget.left is None:
                    budget.left = _HF_STREAM_DEFAULT_MAX_BYTES
                    notes.append(
                        f"streamed {part}: capped at {_HF_STREAM_DEFAULT_MAX_BYTES:,} bytes "
                        "(set data.max_bytes to change)"
                    )
                take_all(_hub_documents(part, cfg.text_field))
                num_files += 1
                continue
            if part.startswith("fortunes:"):
                from switchformer.data.fortunes import fortunes_documents  # noqa: PLC0415

                take_all(fortunes_documents(part[len("fortunes:") :].strip(), notes))
                num_files += 1
                continue
            for path, name in _expand(part):
                if budget.exhausted:
                    break
                num_files += 1
                suffix = path.suffix.lower()
                if path.is_dir():
                    take_all(_load_from_disk(path, cfg.text_field))
                elif suffix == ".jsonl":
                    take_all(_jsonl_documents(path, name, cfg.text_field))
                elif suffix == ".parquet":
                    take_all(_parquet_documents(path, name, cfg.text_field))
                else:
                    if not path.is_file():
                        raise DataError(f"data.corpus input {str(path)!r} is not a regular file")
                    take_all(iter([(name, _check_bytes(path.read_bytes(), str(path)))]))
    if not docs:
        raise DataError(f"data.corpus {spec!r} yielded no text (max_bytes={cfg.max_bytes})")

    train, val = _split(docs, cfg.val_fraction, notes)
    h = hashlib.sha256()
    for tag, part in (("train", train), ("val", val)):
        h.update(f"[{tag}:{len(part)}]".encode())
        for name, text in part:
            h.update(name.encode("utf-8") + b"\x00" + text.encode("utf-8") + b"\x00")
    return Corpus(
        train_texts=[t for _, t in train],
        val_texts=[t for _, t in val],
        train_names=[n for n, _ in train],
        val_names=[n for n, _ in val],
        source=spec,
        num_files=num_files,
        num_bytes=sum(len(t.encode("utf-8")) for _, t in docs),
        fingerprint=h.hexdigest(),
        truncated=budget.exhausted,
        notes=notes,
    )
