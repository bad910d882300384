"""Which weight file a Hub id resolves to, tested offline against a fake Hub.

The fake replaces the ``huggingface_hub.HfApi`` methods switchformer calls (``list_repo_files``,
``get_repo_discussions``, ``get_paths_info``, ``snapshot_download``) with ones serving repo revisions from temporary
directories, and every call is bound against the real method's signature first, so a call the real API would reject
fails here too. Listings, discussions and file infos are huggingface_hub's own ``Discussion`` and ``RepoFile``
objects; blob ids are real git blob ids of the files' bytes.

Order under test: safetensors on the requested revision; else the open conversion PR by SFconvertbot whose pickles are
the revision's; else ``pytorch_model.bin`` through the restricted loader.
"""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from interop_tiny import tiny_hf_model

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import Discussion, HfApi  # noqa: E402
from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: E402
from huggingface_hub.hf_api import RepoFile  # noqa: E402

import switchformer  # noqa: E402
from switchformer.errors import CheckpointError  # noqa: E402
from switchformer.interop import hub  # noqa: E402

REPO = "google/switch-tiny-8"
BOT = hub.CONVERSION_BOT
TITLE = hub.CONVERSION_PR_TITLE


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Revisions of one repo as directories; open PRs and discussions as huggingface_hub ``Discussion`` objects."""

    def __init__(self, root: Path):
        self.root = root
        self.revisions: dict[str, Path] = {}
        self.discussions: list[Discussion] = []
        self.downloads: list[tuple[str, tuple[str, ...]]] = []  # (revision, files copied)
        self.offline = False

    def add_revision(self, name: str, files: dict[str, bytes]) -> None:
        d = self.root / "repo" / name.replace("/", "_")
        d.mkdir(parents=True)
        for rel, data in files.items():
            (d / rel).write_bytes(data)
        self.revisions[name] = d

    def add_pr(self, num: int, files: dict[str, bytes], author: str = BOT, title: str = TITLE,
               status: str = "open") -> None:
        self.add_revision(f"refs/pr/{num}", files)
        self.discussions.append(Discussion(title=title, status=status, num=num, repo_id=REPO, repo_type="model",
                                           author=author, is_pull_request=True,
                                           created_at=datetime(2023, 1, num, tzinfo=timezone.utc),
                                           endpoint="https://huggingface.co"))

    def _rev(self, revision: str | None) -> Path:
        if self.offline:
            raise OSError("[Errno -2] Name or service not known")
        try:
            return self.revisions[revision or "main"]
        except KeyError:
            raise huggingface_hub.errors.RevisionNotFoundError(f"no revision {revision}") from None

    # The HfApi methods (bound against the real signatures by ``install``).
    def list_repo_files(self, repo_id, *, revision=None, **_):
        return sorted(p.name for p in self._rev(revision).iterdir())

    def get_repo_discussions(self, repo_id, *, author=None, discussion_type=None, **_):
        if self.offline:
            raise OSError("offline")
        for d in self.discussions:  # the server filters by author and type
            if (author is None or d.author == author) and (discussion_type != "pull_request" or d.is_pull_request):
                yield d

    def get_paths_info(self, repo_id, paths, *, revision=None, **_):
        d = self._rev(revision)
        return [RepoFile(path=p, size=(d / p).stat().st_size, oid=_git_blob_id((d / p).read_bytes()))
                for p in ([paths] if isinstance(paths, str) else paths) if (d / p).is_file()]

    def snapshot_download(self, repo_id, *, revision=None, cache_dir=None, allow_patterns=None,
                          local_files_only=False, **_):
        snap = Path(cache_dir) / "snapshots" / (revision or "main").replace("/", "_")
        if local_files_only:
            if not snap.is_dir():
                raise LocalEntryNotFoundError("not in the local cache")
            return str(snap)
        src = self._rev(revision)
        snap.mkdir(parents=True, exist_ok=True)
        copied = []
        for f in sorted(src.iterdir()):
            if allow_patterns is None or any(fnmatch.fnmatch(f.name, pat) for pat in allow_patterns):
                shutil.copy(f, snap / f.name)
                copied.append(f.name)
        self.downloads.append((revision or "main", tuple(copied)))
        return str(snap)

    def install(self, monkeypatch) -> None:
        for name in ("list_repo_files", "get_repo_discussions", "get_paths_info", "snapshot_download"):
            real, fake = getattr(HfApi, name), getattr(self, name)

            def method(api, *args, _real=real, _fake=fake, **kwargs):
                inspect.signature(_real).bind(api, *args, **kwargs)  # a call the real API would reject fails here
                return _fake(*args, **kwargs)

            monkeypatch.setattr(HfApi, name, method)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The bytes of a tiny Switch checkpoint's files: config, safetensors, pickle (same weights), tokenizer stand-in,
    plus a pickle of different weights; and the switchformer model loaded from the safetensors."""
    d = tmp_path_factory.mktemp("ckpt")
    hf = tiny_hf_model(0)
    hf.save_pretrained(d)
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    torch.save(tiny_hf_model(1).state_dict(), d / "other.bin")
    out = {n: (d / n).read_bytes() for n in ("config.json", "model.safetensors", "pytorch_model.bin", "other.bin")}
    out["spiece.model"] = b"tokenizer of main"
    return out, switchformer.from_pretrained(d)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    h = FakeHub(tmp_path)
    h.install(monkeypatch)
    return h


def _main(files, **extra):
    f, _ = files
    return {"config.json": f["config.json"], "spiece.model": f["spiece.model"], **extra}


def _same_weights(a, b) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def _downloaded(fake) -> set[str]:
    return {name for _, names in fake.downloads for name in names}


def test_safetensors_on_the_revision_are_used_and_no_pickle_is_downloaded(files, fake, tmp_path, caplog):
    f, expected = files
    fake.add_revision("main", _main(files, **{"model.safetensors": f["model.safetensors"],
                                              "pytorch_model.bin": f["pytorch_model.bin"]}))
    with caplog.at_level(logging.INFO, logger="switchformer.interop.hub"):
        model = switchformer.from_pretrained(REPO, cache_dir=tmp_path / "cache")
    src = model.weights_source
    assert (src.kind, src.repo_id, src.revision) == ("safetensors", REPO, None)
    assert _same_weights(model, expected) and "pytorch_model.bin" not in _downloaded(fake)
    assert [r.levelno for r in caplog.records] == [logging.INFO] and "safetensors" in caplog.records[0].getMessage()


def test_conversion_pr_of_the_same_pickles_is_used(files, fake, tmp_path, caplog):
    """The released-checkpoint case: main keeps only the pickle; the bot's PR adds model.safetensors beside it."""
    f, expected = files
    fake.add_revision("main", _main(files, **{"pytorch_model.bin": f["pytorch_model.bin"]}))
    fake.add_pr(3, _main(files, **{"pytorch_model.bin": f["pytorch_model.bin"],
                                   "model.safetensors": f["model.safetensors"]}))
    with caplog.at_level(logging.INFO, logger="switchformer.interop.hub"):
        model = switchformer.from_pretrained(REPO, cache_dir=tmp_path / "cache")
    src = model.weights_source
    assert (src.kind, src.revision) == ("conversion_pr", "refs/pr/3") and _same_weights(model, expected)
    assert all(p.name == "model.safetensors" and "refs_pr_3" in str(p) for p in src.files)
    assert (src.directory / "spiece.model").read_bytes() == f["spiece.model"]  # config + tokenizer of main
    assert "pytorch_model.bin" not in _downloaded(fake)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and "refs/pr/3" in msgs[0] and "conversion pull request" in msgs[0]


@pytest.mark.parametrize("case", ["not-the-bot", "closed", "other-title", "other-pickles", "no-safetensors"])
def test_conversion_prs_that_do_not_qualify_are_skipped_for_the_pickle(files, fake, tmp_path, case):
    f, expected = files
    fake.add_revision("main", _main(files, **{"pytorch_model.bin": f["pytorch_model.bin"]}))
    pr_files = _main(files, **{"pytorch_model.bin": f["other.bin" if case == "other-pickles" else
                                                      "pytorch_model.bin"]})
    if case != "no-safetensors":
        pr_files["model.safetensors"] = f["model.safetensors"]
    fake.add_pr(5, pr_files, author="someone" if case == "not-the-bot" else BOT,
                title="Add safetensors" if case == "other-title" else TITLE,
                status="closed" if case == "closed" else "open")
    model = switchformer.from_pretrained(REPO, cache_dir=tmp_path / "cache")
    src = model.weights_source
    assert (src.kind, src.revision) == ("pickle", None) and src.files[0].name == "pytorch_model.bin"
    assert _same_weights(model, expected) and "model.safetensors" not in _downloaded(fake)


def test_the_newest_qualifying_conversion_pr_wins(files, fake, tmp_path):
    """PR 7 was converted from older pickles (main changed since); PR 4 is older but matches; PR 9 is a user's."""
    f, expected = files
    fake.add_revision("main", _main(files, **{"pytorch_model.bin": f["pytorch_model.bin"]}))
    fake.add_pr(4, _main(files, **{"pytorch_model.bin": f["pytorch_model.bin"],
                                   "model.safetensors": f["model.safetensors"]}))
    fake.add_pr(7, _main(files, **{"pytorch_model.bin": f["other.bin"], "model.safetensors": b"stale"}))
    fake.add_pr(9, _main(files, **{"pytorch_model.bin": f["pytorch_model.bin"], "model.safetensors": b"x"}),
                author="someone")
    resolved = hub.resolve_weights(REPO, cache_dir=tmp_path / "cache")
    assert (resolved.kind, resolved.revision) == ("conversion_pr", "refs/pr/4")
    assert _same_weights(switchformer.from_pretrained(resolved), expected)


def test_requested_revision_is_used_for_listing_and_download(files, fake, tmp_path):
    f, expected = files
    fake.add_revision("main", _main(files, **{"pytorch_model.bin": f["other.bin"]}))
    fake.add_revision("v1.0", _main(files, **{"model.safetensors": f["model.safetensors"]}))
    model = switchformer.from_pretrained(REPO, revision="v1.0", cache_dir=tmp_path / "cache")
    assert (model.weights_source.kind, model.weights_source.revision) == ("safetensors", "v1.0")
    assert _same_weights(model, expected) and {r for r, _ in fake.downloads} == {"v1.0"}


def test_sharded_pickle_on_the_hub(files, fake, tmp_path):
    f, expected = files
    import io
    import json

    sd = torch.load(io.BytesIO(f["pytorch_model.bin"]), weights_only=True)
    keys = list(sd)
    shards = {}
    for i in range(2):
        buf = io.BytesIO()
        torch.save({k: sd[k] for k in keys[i::2]}, buf)
        shards[f"pytorch_model-{i + 1:05d}-of-00002.bin"] = buf.getvalue()
    index = {"weight_map": {k: f"pytorch_model-{i % 2 + 1:05d}-of-00002.bin" for i, k in enumerate(keys)}}
    fake.add_revision("main", _main(files, **shards, **{"pytorch_model.bin.index.json": json.dumps(index).encode()}))
    model = switchformer.from_pretrained(REPO, cache_dir=tmp_path / "cache")
    assert model.weights_source.kind == "pickle" and len(model.weights_source.files) == 2
    assert _same_weights(model, expected)


def test_repo_without_pytorch_weights_is_named(files, fake, tmp_path):
    fake.add_revision("main", _main(files, **{"flax_model.msgpack": b"x"}))
    with pytest.raises(CheckpointError, match=r"google/switch-tiny-8@main has no PyTorch weights.*flax_model"):
        hub.resolve_weights(REPO, cache_dir=tmp_path / "cache")


def test_unreachable_hub_uses_the_cached_snapshot_or_says_how_to_download(files, fake, tmp_path, caplog):
    f, expected = files
    fake.add_revision("main", _main(files, **{"model.safetensors": f["model.safetensors"]}))
    fake.offline = True
    with pytest.raises(FileNotFoundError, match=r"could not download 'google/switch-tiny-8'.*hf download"):
        hub.resolve_weights(REPO, cache_dir=tmp_path / "cache")
    fake.offline = False
    hub.resolve_weights(REPO, cache_dir=tmp_path / "cache")  # fills the cache
    fake.offline = True
    with caplog.at_level(logging.WARNING, logger="switchformer.interop.hub"):
        resolved = hub.resolve_weights(REPO, cache_dir=tmp_path / "cache")
    assert resolved.kind == "safetensors" and "using the cached snapshot" in caplog.text
    assert _same_weights(switchformer.from_pretrained(resolved), expected)
    only_cache = hub.resolve_weights(REPO, cache_dir=tmp_path / "cache", local_files_only=True)
    assert only_cache.files == resolved.files


def test_hub_api_is_the_real_client():
    assert isinstance(hub.hub_api(), HfApi)


def test_conversion_pr_snapshot_serves_offline_by_its_revision(files, fake, tmp_path):
    f, expected = files
    fake.add_revision("main", _main(files, **{"pytorch_model.bin": f["pytorch_model.bin"]}))
    fake.add_pr(3, _main(files, **{"pytorch_model.bin": f["pytorch_model.bin"],
                                   "model.safetensors": f["model.safetensors"]}))
    cache = tmp_path / "cache"
    assert hub.resolve_weights(REPO, cache_dir=cache).revision == "refs/pr/3"
    with pytest.raises(FileNotFoundError, match=r"pass that revision \(e\.g\. revision='refs/pr/3'"):
        hub.resolve_weights(REPO, cache_dir=cache, local_files_only=True)  # main's snapshot: config, no weights
    model = switchformer.from_pretrained(REPO, revision="refs/pr/3", cache_dir=cache, local_files_only=True)
    assert model.weights_source.kind == "safetensors" and _same_weights(model, expected)


def test_unreadable_discussions_fall_back_to_the_pickle(files, fake, tmp_path, monkeypatch):
    f, expected = files
    fake.add_revision("main", _main(files, **{"pytorch_model.bin": f["pytorch_model.bin"]}))

    def disabled(*args, **kwargs):
        raise huggingface_hub.errors.HfHubHTTPError("403 Forbidden: discussions are disabled for this repo")

    monkeypatch.setattr(fake, "get_repo_discussions", disabled)
    fake.install(monkeypatch)
    model = switchformer.from_pretrained(REPO, cache_dir=tmp_path / "cache")
    assert model.weights_source.kind == "pickle" and _same_weights(model, expected)
