"""Where a checkpoint's weights come from: a local directory or a Hugging Face Hub repo, and which weight file.

:func:`resolve_weights` answers, for a local directory or a Hub id and revision, which weight files to read and how
they were found; :func:`open_weights` opens them with one interface (``shapes``, ``get``, ``stream``, ``alias``) for
safetensors and pickles alike. The order is the one transformers users expect:

1. **safetensors** (``model.safetensors`` or a sharded ``model.safetensors.index.json``) on the requested revision;
2. else, for a Hub repo, the **safetensors conversion pull request**: the Hub's conversion bot (``SFconvertbot``)
   opens a PR titled "Adding `safetensors` variant of this model" that adds the converted files beside the pickles
   and changes nothing else. Its ``refs/pr/N`` is used only when the pickled files on it are the very files of the
   requested revision (same git blob ids), so its safetensors hold the requested weights. Several released Switch
   checkpoints (``google/switch-base-8`` ... ``-256``) keep their safetensors only there;
3. else the **pickled** ``pytorch_model.bin`` (or a sharded ``pytorch_model.bin.index.json``), read with
   ``torch.load(f, map_location="cpu", weights_only=True, mmap=True)``: PyTorch's restricted unpickler, which
   rebuilds tensors and plain containers and refuses every other global, so a pickle that asks to call a function
   (a ``__reduce__`` returning ``os.system``, say) raises :class:`~switchformer.errors.CheckpointError` and nothing
   in it runs. ``mmap`` maps the tensor data instead of reading it (zip-format files; legacy files are read whole).

The choice is logged (``switchformer.interop.hub``: INFO for safetensors, WARNING for the two fallbacks, so a
default logging setup prints them) and returned as a :class:`ResolvedWeights`, which
:func:`switchformer.interop.from_pretrained` also leaves on the model as ``model.weights_source``.

Every Hub call goes through :func:`hub_api` (a ``huggingface_hub.HfApi``), so offline tests replace that one
function.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from switchformer.errors import CheckpointError
from switchformer.interop.files import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, ShardReader, read_index, weight_files

__all__ = [
    "CONVERSION_BOT",
    "CONVERSION_PR_TITLE",
    "PICKLE_INDEX_NAME",
    "PICKLE_WEIGHTS_NAME",
    "PickleReader",
    "ResolvedWeights",
    "find_conversion_pr",
    "hub_api",
    "load_pickle_weights",
    "open_weights",
    "resolve_weights",
]

log = logging.getLogger(__name__)

PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
CONVERSION_BOT = "SFconvertbot"
"""The Hub account whose pull requests add safetensors conversions; PRs by anyone else are never used."""
CONVERSION_PR_TITLE = "Adding `safetensors` variant of this model"
META_PATTERNS = ["config.json", "generation_config.json", "spiece.model", "tokenizer*", "special_tokens_map.json",
                 "added_tokens.json"]
"""Non-weight files downloaded with the weights: config, generation config and the tokenizer."""
SAFETENSORS_PATTERNS = ["*.safetensors", INDEX_NAME]
PICKLE_PATTERNS = ["pytorch_model*.bin", PICKLE_INDEX_NAME]
_OTHER_FRAMEWORKS = ("tf_model.h5", "flax_model.msgpack")
_HUB_ID_RE = re.compile(r"[\w.-]+(/[\w.-]+)?")
_PICKLE_FILE_RE = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?")

WeightsKind = Literal["safetensors", "conversion_pr", "pickle"]


@dataclass(frozen=True)
class ResolvedWeights:
    """Which weight files a checkpoint resolved to, and how they were found.

    Attributes:
        directory: local directory holding ``config.json`` and the tokenizer (``spiece.model``) of the requested
            revision.
        kind: ``'safetensors'`` (on the requested revision or in the local directory), ``'conversion_pr'`` (the
            Hub's safetensors conversion PR, see :data:`revision`) or ``'pickle'`` (``pytorch_model.bin`` through
            ``torch.load(weights_only=True)``).
        files: the weight files in load order (shards of an index, or the single file); for ``'conversion_pr'``
            they lie in the PR's snapshot, not in ``directory``.
        repo_id: the Hub id, or None for a local directory.
        revision: the Hub revision the weight files came from (``refs/pr/N`` for a conversion PR; the requested
            revision or None = the default branch otherwise); None for a local directory.
    """

    directory: Path
    kind: WeightsKind
    files: tuple[Path, ...]
    repo_id: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        """One line: which files were used and why (the text that is logged)."""
        names = ", ".join(sorted({f.name for f in self.files})) if len(self.files) <= 3 else (
            f"{len(self.files)} shards")
        where = (str(self.directory) if self.repo_id is None else self.repo_id if self.kind == "conversion_pr"
                 else f"{self.repo_id}@{self.revision or 'main'}")
        if self.kind == "safetensors":
            return f"{where}: weights from safetensors ({names})"
        if self.kind == "conversion_pr":
            return (f"{where}: no safetensors on the requested revision; weights from the Hub's safetensors "
                    f"conversion pull request {self.revision} ({names}), converted from the same pickled files")
        return (f"{where}: no safetensors found; weights from the pickle ({names}) through torch.load("
                "weights_only=True, mmap=True), which rebuilds tensors and containers only")


def hub_api() -> Any:
    """A ``huggingface_hub.HfApi`` (the one door to the Hub; tests replace this function to serve files offline).

    Raises:
        FileNotFoundError: huggingface_hub is not installed.
    """
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise FileNotFoundError(
            "huggingface_hub is not installed, so Hub ids cannot be downloaded. Install it (`pip install "
            "'switchformer[hf]'`) or pass a local directory holding config.json and the weights") from e
    return HfApi()


def _local_weights(d: Path) -> tuple[WeightsKind, tuple[Path, ...]]:
    """(kind, files) of a local directory: safetensors first, else pickled PyTorch weights."""
    if (d / INDEX_NAME).is_file() or (d / WEIGHTS_NAME).is_file():
        return "safetensors", tuple(weight_files(d))
    if (d / PICKLE_INDEX_NAME).is_file():
        files = list(dict.fromkeys(read_index(d / PICKLE_INDEX_NAME).values()))
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{d / PICKLE_INDEX_NAME} lists shards that are not present: {absent}; download "
                                    "them too")
        return "pickle", tuple(files)
    if (d / PICKLE_WEIGHTS_NAME).is_file():
        return "pickle", (d / PICKLE_WEIGHTS_NAME,)
    others = [n for n in _OTHER_FRAMEWORKS if (d / n).exists()]
    if others:
        raise CheckpointError(f"{d} holds only {', '.join(others)} (TensorFlow/Flax weights); switchformer reads "
                              f"PyTorch weights: {WEIGHTS_NAME} (or {PICKLE_WEIGHTS_NAME}). Convert them with "
                              "transformers, e.g. SwitchTransformersForConditionalGeneration.from_pretrained(DIR, "
                              "from_flax=True).save_pretrained(NEW_DIR)")
    raise FileNotFoundError(f"{d}: no weights found (looked for {WEIGHTS_NAME}, {INDEX_NAME}, {PICKLE_WEIGHTS_NAME} "
                            f"and {PICKLE_INDEX_NAME}); pass the directory that holds config.json and the weights")


def _is_safetensors(name: str) -> bool:
    return name.endswith(".safetensors") or name == INDEX_NAME


def _blob_ids(api: Any, repo_id: str, paths: list[str], revision: str | None) -> dict[str, str]:
    return {f.path: f.blob_id for f in api.get_paths_info(repo_id, paths, revision=revision)
            if getattr(f, "blob_id", None) is not None}


def find_conversion_pr(api: Any, repo_id: str, revision: str | None, pickle_files: list[str]) -> str | None:
    """The ``refs/pr/N`` of the open safetensors conversion PR whose pickles are ``revision``'s, or None.

    Only open pull requests by :data:`CONVERSION_BOT` with :data:`CONVERSION_PR_TITLE` count, newest first. The
    conversion commit adds safetensors files and leaves the pickles as they were, so equal git blob ids of every
    pickled file on the PR and on ``revision`` mean the PR's safetensors were converted from the requested weights; a
    PR opened before the pickles changed is skipped (logged).

    Args:
        api: a ``huggingface_hub.HfApi``.
        repo_id: the Hub id.
        revision: the requested revision (None = the default branch).
        pickle_files: the pickled weight files on ``revision`` (``pytorch_model*.bin`` and their index).
    """
    prs = [d for d in api.get_repo_discussions(repo_id, author=CONVERSION_BOT, discussion_type="pull_request")
           if d.is_pull_request and d.author == CONVERSION_BOT and d.title == CONVERSION_PR_TITLE
           and d.status == "open"]
    if not prs:
        return None
    wanted = _blob_ids(api, repo_id, pickle_files, revision)
    for pr in sorted(prs, key=lambda d: d.num, reverse=True):
        ref = pr.git_reference
        if not any(_is_safetensors(f) for f in api.list_repo_files(repo_id, revision=ref)):
            continue
        if _blob_ids(api, repo_id, pickle_files, ref) == wanted and len(wanted) == len(pickle_files):
            return ref
        log.info("%s: conversion PR %s was made from other pickled weights than %s; not used", repo_id, ref,
                 revision or "main")
    return None


def _hub_error(name: str, e: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"could not download {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). If this machine is "
        f"offline, download it elsewhere, e.g. `hf download {name} --local-dir DIR` (config.json, the weights and "
        "spiece.model are what switchformer reads), copy DIR here and pass that local directory")


def _resolve_hub(name: str, *, revision: str | None, cache_dir: str | os.PathLike | None,
                 local_files_only: bool) -> ResolvedWeights:
    api = hub_api()

    def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # offline, unknown repo, gated repo, proxy: all end in the same advice
            raise _hub_error(name, e) from e

    def download(patterns: list[str], rev: str | None, offline: bool = local_files_only) -> Path:
        return Path(call(api.snapshot_download, name, revision=rev, cache_dir=cache_dir, allow_patterns=patterns,
                         local_files_only=offline))

    def cached() -> ResolvedWeights:  # no listing offline: what the cache holds for the revision decides
        d = download(META_PATTERNS + SAFETENSORS_PATTERNS + PICKLE_PATTERNS, revision, offline=True)
        try:
            kind, files = _local_weights(d)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{e}. This is the cached snapshot of {name}@{revision or 'main'}; if its weights came from a "
                "conversion pull request, pass that revision (e.g. revision='refs/pr/3', as logged when it was "
                "downloaded)") from None
        return ResolvedWeights(d, kind, files, name, revision)

    if local_files_only:
        return cached()
    try:
        listing = api.list_repo_files(name, revision=revision)
    except Exception as e:  # unreachable: a cached snapshot still serves, as snapshot_download's own fallback does
        try:
            resolved = cached()
        except FileNotFoundError:
            raise _hub_error(name, e) from e
        log.warning("%s: the Hub is unreachable (%s); using the cached snapshot", name, type(e).__name__)
        return resolved
    if any(_is_safetensors(f) for f in listing):
        d = download(META_PATTERNS + SAFETENSORS_PATTERNS, revision)
        return ResolvedWeights(d, "safetensors", tuple(weight_files(d)), name, revision)
    pickles = sorted(f for f in listing if _PICKLE_FILE_RE.fullmatch(f))
    if not pickles:
        raise CheckpointError(
            f"{name}@{revision or 'main'} has no PyTorch weights ({WEIGHTS_NAME}, {INDEX_NAME}, {PICKLE_WEIGHTS_NAME}"
            f" or {PICKLE_INDEX_NAME}); its files: {sorted(listing)[:20]}")
    try:
        pr = find_conversion_pr(api, name, revision, pickles)
    except Exception as e:  # discussions disabled or unreadable: the pickle still serves
        log.info("%s: could not look up safetensors conversion pull requests (%s: %s)", name, type(e).__name__, e)
        pr = None
    if pr is not None:
        d = download(META_PATTERNS, revision)
        # the PR's snapshot gets its config and tokenizer too, so that revision=PR works offline later
        w = download(META_PATTERNS + SAFETENSORS_PATTERNS, pr)
        return ResolvedWeights(d, "conversion_pr", tuple(weight_files(w)), name, pr)
    d = download(META_PATTERNS + PICKLE_PATTERNS, revision)
    kind, files = _local_weights(d)
    return ResolvedWeights(d, kind, files, name, revision)


def resolve_weights(path_or_id: str | os.PathLike, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, *, local_files_only: bool = False) -> ResolvedWeights:
    """Find the weight files of a local checkpoint directory or a Hub repo (see the module docstring for the order).

    Args:
        path_or_id: a local directory, or a Hub repo id like ``google/switch-base-8``.
        revision: Hub branch, tag, commit or ``refs/pr/N`` (None: the default branch). Ignored for directories.
        cache_dir: Hub cache directory (default: huggingface_hub's).
        local_files_only: use only the local Hub cache (no listing, so no conversion-PR lookup: the cached snapshot
            of ``revision`` decides).

    Returns:
        A :class:`ResolvedWeights` (``.directory``, ``.kind``, ``.files``, ``.repo_id``, ``.revision``).

    Raises:
        CheckpointError: the directory holds only TensorFlow/Flax weights, or a shard index is bad.
        FileNotFoundError: no such directory, no weights, or the Hub is unreachable (the message says how to
            download elsewhere).
    """
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        kind, files = _local_weights(p)
        resolved = ResolvedWeights(p, kind, files)
    elif p.is_file():
        raise CheckpointError(f"path_or_id: {p} is a file; pass the directory that holds {CONFIG_NAME} and the "
                              "weights")
    else:
        name = str(path_or_id)
        if not _HUB_ID_RE.fullmatch(name) or name.startswith((".", "/")):
            raise FileNotFoundError(f"path_or_id: {name!r} is not a directory and not a Hub repo id like "
                                    "'google/switch-base-8'")
        resolved = _resolve_hub(name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    log.log(logging.INFO if resolved.kind == "safetensors" else logging.WARNING, "%s", resolved.describe())
    return resolved


def _refusal(path: Path, e: Exception) -> CheckpointError:
    """The error for a pickle torch.load(weights_only=True) rejected: refused (it names a callable or an object the
    restricted unpickler does not build) or unreadable (garbage, truncated, an opcode outside the restricted set)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    refused = [ln for ln in lines if "GLOBAL" in ln or ln.startswith("Can only")]
    fix = ("Convert it to safetensors on a machine you trust (e.g. transformers: "
           "SwitchTransformersForConditionalGeneration.from_pretrained(DIR).save_pretrained(NEW_DIR)) or download "
           f"the repo's {WEIGHTS_NAME}")
    if refused:
        return CheckpointError(
            f"{path} is a pickle that needs more than tensors and containers ({refused[0]}); it was refused and "
            f"nothing in it was run (torch.load weights_only=True). {fix}")
    detail = next((ln for ln in lines if "Unsupported" in ln or "persistent" in ln), lines[-1] if lines else "")
    return CheckpointError(
        f"{path} is not a readable PyTorch weights file ({type(e).__name__}: {detail}); it is truncated or "
        f"corrupted, or not a state dict saved by torch.save. Nothing in it was run. Re-download it, or: {fix}")


def load_pickle_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` of a ``pytorch_model.bin``, through PyTorch's restricted unpickler only.

    ``torch.load(path, map_location="cpu", weights_only=True, mmap=True)`` (``mmap`` for zip-format files, the format
    of every ``torch.save`` since PyTorch 1.6; a legacy file is read whole). Tensors of a mapped file share its pages
    copy-on-write: nothing is read until used.

    Raises:
        CheckpointError: the pickle needs anything but tensors and containers (e.g. a ``__reduce__`` calling a
            function: refused, never run), is not a PyTorch file, or is not a flat ``{str: tensor}`` dict.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # the restricted unpickler warns about protocols it reads fine
            warnings.filterwarnings("ignore", message=r".*pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # UnpicklingError (refused global, garbage), RuntimeError, EOFError (truncated)
        raise _refusal(path, e) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        what = type(obj).__name__ if not isinstance(obj, dict) else "a dict with non-tensor values or non-str keys"
        raise CheckpointError(f"{path} holds {what}; a transformers {PICKLE_WEIGHTS_NAME} is a flat dict of "
                              "parameter name -> tensor (a state dict)")
    return obj


class PickleReader:
    """:class:`~switchformer.interop.files.ShardReader`'s interface over pickled weight files (see
    :func:`load_pickle_weights`): every file is mapped at construction, tensors are moved to ``device`` on demand.

    Raises:
        CheckpointError: see :func:`load_pickle_weights`.
    """

    def __init__(self, files: Iterable[Path], device: str = "cpu", *, rename: Callable[[str], str] | None = None):
        self.files = list(files)
        self.device = device
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.stored: dict[str, str] = {}
        self._tensors: dict[Path, dict[str, torch.Tensor]] = {}
        for f in self.files:
            self._tensors[f] = load_pickle_weights(f)
            for k, t in self._tensors[f].items():
                c = rename(k) if rename is not None else k
                self.where[c], self.stored[c], self.shapes[c] = f, k, tuple(t.shape)

    def alias(self, new: str, existing: str) -> None:
        """Make ``new`` read the tensor stored as ``existing``."""
        self.where[new], self.stored[new], self.shapes[new] = (
            self.where[existing], self.stored[existing], self.shapes[existing])

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[self.where[key]][self.stored[key]].to(self.device)

    def stream(self, keys: Iterable[str]) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        """Yield ``(name, loader)`` file by file (aliases last), as :meth:`ShardReader.stream` does."""
        wanted = set(keys)
        for f in self.files:
            for c in self.shapes:
                if c in wanted and self.where[c] == f:
                    yield c, (lambda c=c: self.get(c))


def open_weights(resolved: ResolvedWeights, device: str = "cpu", *,
                 rename: Callable[[str], str] | None = None) -> ShardReader | PickleReader:
    """A reader of ``resolved.files``: safetensors through ``safe_open``, pickles through :class:`PickleReader`."""
    cls = PickleReader if resolved.kind == "pickle" else ShardReader
    return cls(resolved.files, device=device, rename=rename)
