"""safetensors file I/O for every checkpoint switchformer writes or reads: one atomic writer, one format version.

Used by :mod:`switchformer.interop.pretrained` (transformers-format and native model directories) and by
:mod:`switchformer.checkpoint` (training checkpoints). Nothing here pickles, and nothing here knows about models
or key names: tensors in, files out, and back.

- :func:`atomic_path` / :func:`write_text_atomic` / :func:`save_safetensors`: every file is written to a temporary
  sibling, fsync'ed, renamed over the target (atomic on POSIX) and the directory is fsync'ed, so a crash leaves either
  the old file or the new one, never half of one.
- :func:`write_sharded` / :func:`weight_files` / :class:`ShardReader`: one ``model.safetensors`` or transformers'
  sharded layout (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from switchformer.errors import CheckpointError

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "PICKLE_NAMES",
    "WEIGHTS_NAME",
    "ShardReader",
    "atomic_path",
    "fsync_dir",
    "parse_size",
    "read_index",
    "save_safetensors",
    "unique_tensors",
    "weight_files",
    "write_sharded",
    "write_text_atomic",
]

FORMAT_VERSION = 1
"""Version of switchformer's own layouts (training checkpoints, native model directories); bumped on any change."""
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
_SHARD_NAME = "model-{i:05d}-of-{n:05d}.safetensors"
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", flags=re.IGNORECASE)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so that a rename inside it survives a power loss (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - e.g. some network filesystems
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success fsync it and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def unique_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the later names of tensors that share storage (a tied ``lm_head``): safetensors stores each once.

    Loading re-ties them (``safetensors.torch.load_model`` and :func:`switchformer.interop.from_pretrained` both do).
    """
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    out = {}
    for k, t in tensors.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if ident in seen and t.numel() > 0:
            continue
        seen.add(ident)
        out[k] = t
    return out


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` to one safetensors file atomically; ``metadata`` always carries ``format: pt``.

    Tensors are moved to CPU and made contiguous; views of one storage (expert slices ``w[j]``) are cloned, since
    safetensors refuses tensors that share memory.
    """
    from safetensors.torch import save_file

    path = Path(path)
    shared: dict[int, int] = {}
    for t in tensors.values():
        ptr = t.untyped_storage().data_ptr()
        shared[ptr] = shared.get(ptr, 0) + 1
    chunk = {}
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        chunk[k] = t.clone() if shared[tensors[k].untyped_storage().data_ptr()] > 1 else t
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    with atomic_path(path) as tmp:
        save_file(chunk, str(tmp), metadata=meta)
    return path


def parse_size(size: int | str) -> int:
    """Bytes from an int or a size such as ``'5GB'`` (10**9), ``'500MB'`` or ``'2MiB'`` (2 * 2**20)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"max_shard_size must be >= 1 byte, got {size}")
        return size
    m = _SIZE_RE.fullmatch(str(size))
    if not m:
        raise ValueError(f"max_shard_size: {size!r} is not a size like 5GB, 500MB or an int number of bytes")
    unit = m[2].upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m[1]) * base**power)


def write_sharded(directory: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *,
                  max_shard_size: int | str, metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write tensors as ``model.safetensors``, or as shards plus an index when they exceed ``max_shard_size``.

    Shards follow transformers' naming; one shard is in memory at a time. Weight files of an earlier save in
    ``directory`` that the new one does not overwrite are removed last (they would be picked up next to the new
    index), so a crash midway leaves the earlier index and its shards readable where their names were not reused.

    Returns:
        The files written, in order.
    """
    directory = Path(directory)
    limit = parse_size(max_shard_size)
    stale = {*directory.glob("model-*-of-*.safetensors"), directory / WEIGHTS_NAME, directory / INDEX_NAME}
    groups: list[list[str]] = [[]]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    n = len(groups)
    names = [WEIGHTS_NAME] if n == 1 else [_SHARD_NAME.format(i=i + 1, n=n) for i in range(n)]
    for name, keys in zip(names, groups, strict=True):
        save_safetensors(directory / name, {k: tensors[k] for k in keys}, metadata=metadata)
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, keys in zip(names, groups, strict=True) for k in keys}}
        write_text_atomic(directory / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    written = [directory / name for name in names]
    for old in stale - set(written) - ({directory / INDEX_NAME} if n > 1 else set()):
        if old.is_file() or old.is_symlink():
            old.unlink()
    return written


def read_json_object(path: Path, fix: str) -> dict:
    """The JSON object in ``path``.

    Raises:
        CheckpointError: the file is not UTF-8 JSON or not an object; the message names the file and ``fix``.
    """
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(raw).__name__}; {fix}")
    return raw


def read_index(index: str | os.PathLike) -> dict[str, Path]:
    """The ``weight_map`` of a shard index as ``{tensor name: shard file}``, every file inside the index's directory.

    Shard names are checked as written (no absolute path, no ``..``), not after resolving symlinks: the Hugging Face
    cache stores every file of a snapshot as a symlink into its blob store.

    Raises:
        CheckpointError: the index is not JSON, has no ``weight_map`` object, or names a shard outside its directory;
            the message names the index and the entry.
    """
    index = Path(index)
    weight_map = read_json_object(
        index, "a shard index maps tensor names to shard files in a 'weight_map' object; re-download the checkpoint"
    ).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index} has no 'weight_map' (an object mapping each tensor name to its shard file); re-download the "
            f"checkpoint, or delete the index if the directory holds a single {WEIGHTS_NAME}")
    out: dict[str, Path] = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name.strip():
            raise CheckpointError(f"{index}: weight_map[{key!r}] is {name!r}, not a shard file name")
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or rel.drive:
            raise CheckpointError(
                f"{index}: weight_map[{key!r}] = {name!r} points outside the checkpoint directory {index.parent}; "
                "shard files must be named relative to it, without '..' (refusing to read it)")
        out[key] = index.parent / rel
    return out


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards its index names, or ``model.safetensors``.

    Raises:
        CheckpointError: a bad index (see :func:`read_index`), or the directory holds only pickled weights (this
            lists safetensors only; :func:`switchformer.interop.hub.resolve_weights` also finds pickles, which it
            reads with PyTorch's restricted unpickler).
        FileNotFoundError: no weights at all, or shards the index names are absent.
    """
    d = Path(directory)
    index = d / INDEX_NAME
    if index.is_file():
        files = list(dict.fromkeys(read_index(index).values()))
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not present: {absent}; download them too")
        return files
    if (d / WEIGHTS_NAME).is_file():
        return [d / WEIGHTS_NAME]
    pickles = [n for n in PICKLE_NAMES if (d / n).exists()]
    if pickles:
        raise CheckpointError(
            f"{d} holds only pickled weights ({', '.join(pickles)}), no safetensors; load it with "
            "switchformer.from_pretrained (which reads pickles with torch.load(weights_only=True), tensors only), or "
            "convert them to safetensors on a machine you trust, e.g. with "
            "transformers: SwitchTransformersForConditionalGeneration.from_pretrained(DIR)"
            ".save_pretrained(NEW_DIR), or download the repo's model.safetensors"
        )
    raise FileNotFoundError(f"{d}: no {WEIGHTS_NAME} or {INDEX_NAME} found")


class ShardReader:
    """Lazy access to the tensors of one or more safetensors files: headers first, data on demand.

    Args:
        files: the safetensors files (e.g. :func:`weight_files`).
        device: where loaded tensors go.
        rename: maps a stored name to the name callers use (e.g. transformers' T5 ``DenseReluDense`` -> ``mlp``).

    Raises:
        CheckpointError: a file is not a readable safetensors file (truncated or corrupted); the message names it.
    """

    def __init__(self, files: Iterable[Path], device: str = "cpu", *, rename: Callable[[str], str] | None = None):
        from safetensors import safe_open

        self._open = safe_open
        self.files = list(files)
        self.device = device
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.stored: dict[str, str] = {}  # name used by callers -> name in the file
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt", device="cpu") as h:
                    for k in h.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                        c = rename(k) if rename is not None else k
                        self.where[c], self.stored[c] = f, k
                        self.shapes[c] = tuple(h.get_slice(k).get_shape())
            except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError on bad files
                raise CheckpointError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e}); it is "
                                      "truncated or corrupted: re-download or re-save it") from None

    def alias(self, new: str, existing: str) -> None:
        """Make ``new`` read the tensor stored as ``existing``."""
        self.where[new], self.stored[new], self.shapes[new] = (
            self.where[existing], self.stored[existing], self.shapes[existing])

    def get(self, key: str) -> torch.Tensor:
        with self._open(str(self.where[key]), framework="pt", device=self.device) as h:
            return h.get_tensor(self.stored[key])

    def stream(self, keys: Iterable[str]) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        """Yield ``(name, loader)`` file by file, each file opened once (aliases come last)."""
        wanted = set(keys)
        for f in self.files:
            with self._open(str(f), framework="pt", device=self.device) as h:
                for c in self.shapes:  # insertion order: the file's order, aliases last
                    if c in wanted and self.where[c] == f:
                        yield c, (lambda k=self.stored[c], h=h: h.get_tensor(k))
