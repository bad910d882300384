"""Corpus sources: the stdlib default, text globs and directories, JSONL, Parquet, datasets; splits; bad inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from switchformer.config import DataConfig
from switchformer.data import load_corpus
from switchformer.data.sources import _unit_hash


def test_stdlib_default_is_deterministic_and_truncated():
    cfg = DataConfig(max_bytes=300_000)
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert a.fingerprint == b.fingerprint and a.train_names == b.train_names
    assert a.truncated and 0 < a.num_bytes <= 300_000
    names = a.train_names + a.val_names
    assert all(n.endswith((".py", ".txt", ".rst")) for n in names)
    assert not any(part in {"test", "tests", "idlelib", "site-packages"} for n in names for part in n.split("/"))
    assert a.train_names == sorted(a.train_names) and a.val_names == sorted(a.val_names)
    assert f"{a.num_files} files" in a.summary()
    # max_bytes keeps a prefix of the sorted file list (the last file cut at a line boundary).
    smaller = load_corpus(DataConfig(max_bytes=100_000))
    all_a, all_s = sorted(names), sorted(smaller.train_names + smaller.val_names)
    assert all_a[: len(all_s)] == all_s and len(all_s) < len(all_a)


def test_split_by_file_hash(text_dir: Path):
    cfg = DataConfig(corpus=str(text_dir), val_fraction=0.3)
    c = load_corpus(cfg)
    names = c.train_names + c.val_names
    assert set(c.train_names).isdisjoint(c.val_names)
    assert sorted(names) == sorted(p.relative_to(text_dir).as_posix() for p in text_dir.rglob("*.txt"))
    expected = [n for n in sorted(names) if _unit_hash(n) < 0.3]
    assert c.val_names == (expected or [min(names, key=_unit_hash)])  # tiny corpora still get one val document
    # Same files elsewhere on disk (relative names) -> same split and fingerprint.
    moved = text_dir.parent / "moved"
    text_dir.rename(moved)
    c2 = load_corpus(DataConfig(corpus=str(moved), val_fraction=0.3))
    assert (c2.train_names, c2.val_names, c2.fingerprint) == (c.train_names, c.val_names, c.fingerprint)
    # The fingerprint follows the content.
    (moved / "doc1.txt").write_text("changed\n", encoding="utf-8")
    assert load_corpus(DataConfig(corpus=str(moved), val_fraction=0.3)).fingerprint != c.fingerprint


def test_glob_and_comma_list(text_dir: Path):
    c = load_corpus(DataConfig(corpus=f"{text_dir}/*.txt,{text_dir}/sub/doc0.txt", val_fraction=0.0))
    top = sorted(p.name for p in text_dir.glob("*.txt"))
    assert c.train_names == [*top, "doc0.txt"] and c.val_texts == []
    rec = load_corpus(DataConfig(corpus=f"{text_dir}/**/*.txt", val_fraction=0.0))
    assert len(rec.train_names) == len(list(text_dir.rglob("*.txt"))) and "sub/doc0.txt" in rec.train_names


def test_single_document_is_split_by_lines(tmp_path: Path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(100)), encoding="utf-8")
    c = load_corpus(DataConfig(corpus=str(f), val_fraction=0.1))
    assert c.train_texts[0] + c.val_texts[0] == f.read_text()
    assert c.val_texts[0].count("\n") == 10


def test_jsonl(tmp_path: Path):
    f = tmp_path / "d.jsonl"
    rows = [{"text": f"document {i}\nbody {i}", "id": i} for i in range(200)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    c = load_corpus(DataConfig(corpus=str(f), val_fraction=0.2))
    assert sorted(c.train_texts + c.val_texts) == sorted(r["text"] for r in rows)
    assert 20 <= len(c.val_texts) <= 60  # hash split per record, ~20%
    assert all(n.startswith("d.jsonl#") for n in c.val_names)
    other = tmp_path / "o.jsonl"
    other.write_text("\n".join(json.dumps({"content": r["text"]}) for r in rows), encoding="utf-8")
    c2 = load_corpus(DataConfig(corpus=str(other), text_field="content", val_fraction=0.0))
    assert c2.train_texts == [r["text"] for r in rows]
    with pytest.raises(ValueError, match=r"o.jsonl:1.*no field 'text'.*content.*data.text_field"):
        load_corpus(DataConfig(corpus=str(other)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*invalid JSON"):
        load_corpus(DataConfig(corpus=str(bad)))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        (b"", "empty"),
        (b"  \n\n", "empty"),
        (b"text\x00\x01\x02binary", "binary"),
        (b"caf\xe9 latin-1", "not valid UTF-8"),
    ],
)
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_bad_inputs_name_the_file(tmp_path: Path, content: bytes | None, match: str, suffix: str):
    f = tmp_path / f"input{suffix}"
    if content is not None:
        if suffix == ".jsonl" and content.strip():
            content = b'{"text": "' + content + b'"}\n'
        f.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        load_corpus(DataConfig(corpus=str(f)))
    assert "input" in str(info.value)


def test_empty_glob_and_dir(tmp_path: Path):
    with pytest.raises(ValueError, match="matches no file"):
        load_corpus(DataConfig(corpus=str(tmp_path / "*.txt")))
    (tmp_path / "x.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="holds no text files"):
        load_corpus(DataConfig(corpus=str(tmp_path)))
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(DataConfig(val_fraction=1.0))


def test_datasets_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError, installed or not
    with pytest.raises(ValueError, match="pip install datasets"):
        load_corpus(DataConfig(corpus="hf:allenai/c4:en"))
    d = tmp_path / "saved"
    d.mkdir()
    (d / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(ValueError, match="saved.*pip install datasets"):
        load_corpus(DataConfig(corpus=str(d)))


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    f = tmp_path / "d.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match="d.parquet.*pip install pyarrow"):
        load_corpus(DataConfig(corpus=str(f)))


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has("pyarrow"), reason="pyarrow not installed (optional: pip install pyarrow)")
def test_parquet(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i}\nvalue {i * i}" for i in range(50)]
    pq.write_table(pa.table({"content": texts, "n": list(range(50))}), tmp_path / "d.parquet")
    c = load_corpus(DataConfig(corpus=str(tmp_path / "d.parquet"), text_field="content", val_fraction=0.0))
    assert c.train_texts == texts
    with pytest.raises(ValueError, match="no column 'text'"):
        load_corpus(DataConfig(corpus=str(tmp_path / "d.parquet")))


@pytest.mark.skipif(not _has("datasets"), reason="datasets not installed (optional: pip install datasets)")
def test_datasets_save_to_disk(tmp_path: Path):
    import datasets

    texts = [f"example {i}\n" for i in range(30)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    c = load_corpus(DataConfig(corpus=str(tmp_path / "ds"), val_fraction=0.0))
    assert c.train_texts == texts


class _FakeDataset(list):
    """Stands in for datasets.Dataset: a list of dict rows."""


class _FakeDatasetDict(dict):
    pass


def _fake_datasets_module(online: bool):
    import types

    mod = types.ModuleType("datasets")
    mod.Dataset = _FakeDataset
    mod.DatasetDict = _FakeDatasetDict

    def load_dataset(name, config=None, split=None, streaming=False):
        assert (split, streaming) == ("train", True)
        if not online:
            raise ConnectionError("Couldn't reach the Hub")
        return iter({"text": f"{name}/{config} doc {i}\n" * 20, "meta": i} for i in range(10_000_000))

    def load_from_disk(path):
        return _FakeDatasetDict(
            validation=_FakeDataset([{"text": "v"}]), train=_FakeDataset([{"text": f"row {i}"} for i in range(40)])
        )

    mod.load_dataset, mod.load_from_disk = load_dataset, load_from_disk
    return mod


def test_hub_streaming_with_fake_datasets(monkeypatch: pytest.MonkeyPatch):
    # The real `datasets` may be absent (and the Hub is unreachable here): check our side of the contract.
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets_module(online=True))
    c = load_corpus(DataConfig(corpus="hf:org/name:cfg", max_bytes=20_000))
    assert c.train_texts[0].startswith("org/name/cfg doc 0") and c.truncated and c.num_bytes <= 20_000
    assert all(n.startswith("hf:org/name#") for n in c.train_names + c.val_names)
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets_module(online=False))
    with pytest.raises(ValueError, match="could not open.*org/name.*save_to_disk"):
        load_corpus(DataConfig(corpus="hf:org/name"))


def test_save_to_disk_dir_with_fake_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets_module(online=False))
    d = tmp_path / "saved"
    d.mkdir()
    (d / "dataset_dict.json").write_text('{"splits": ["train", "validation"]}')
    c = load_corpus(DataConfig(corpus=str(d), val_fraction=0.0))
    assert c.train_texts == [f"row {i}" for i in range(40)]  # the train split of a DatasetDict


def test_single_one_line_document_is_split_at_a_space(tmp_path: Path):
    """A one-line corpus still gets a validation split: its tail, cut after a space."""
    f = tmp_path / "one.txt"
    text = " ".join(f"word{i}" for i in range(10_000))
    f.write_text(text)
    c = load_corpus(DataConfig(corpus=str(f), val_fraction=0.1))
    (train,), (val,) = c.train_texts, c.val_texts
    assert train + val == text and train.endswith(" ")
    assert 0.09 < len(val) / len(text) < 0.11
    f.write_text("x")  # too short to split: everything is training text
    c = load_corpus(DataConfig(corpus=str(f), val_fraction=0.1))
    assert c.train_texts == ["x"] and c.val_texts == []
