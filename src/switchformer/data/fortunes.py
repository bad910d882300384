"""Debian's fortune cookies as a corpus source: ``fortunes:LANG`` (``data.corpus`` or a ``data.languages`` source).

The ``fortunes`` (English), ``fortunes-de``, ``-es``, ``-it``, ``-ru``, ``-pl``, ``-cs`` and ``-zh`` packages hold
real short texts in eight languages and install with apt. Each fortune is one document; the ``%`` separator lines and
terminal colour codes are removed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from switchformer.errors import DataError

FORTUNES_DIR_ENV = "SWITCHFORMER_FORTUNES_DIR"
"""Environment variable naming the fortunes directory (default ``/usr/share/games/fortunes``)."""
DEFAULT_FORTUNES_DIR = "/usr/share/games/fortunes"
FORTUNES_PACKAGES = {
    "en": "fortunes",
    "de": "fortunes-de",
    "es": "fortunes-es",
    "it": "fortunes-it",
    "ru": "fortunes-ru",
    "pl": "fortunes-pl",
    "cs": "fortunes-cs",
    "zh": "fortunes-zh",
}
"""Language code -> the Debian package holding its fortunes."""
_FORTUNES_ZH_FILES = ("chinese", "song100", "tang300")  # fortunes-zh puts its files at the top level
_FORTUNES_SKIP_SUFFIXES = (".dat", ".u8")  # strfile indexes and UTF-8 aliases (symlinks) of the text files
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes in some fortunes (fortunes-zh)
def fortunes_root() -> Path:
    """The fortunes directory: ``$SWITCHFORMER_FORTUNES_DIR`` or ``/usr/share/games/fortunes``."""
    return Path(os.environ.get(FORTUNES_DIR_ENV) or DEFAULT_FORTUNES_DIR)


def split_fortunes(text: str) -> list[str]:
    """The fortunes of a fortune file: the text between lines holding only ``%``, colour codes removed, blank ones
    dropped, each ending with a newline."""
    out, current = [], []
    for line in text.splitlines():
        if line.rstrip("\r") == "%":
            out.append("".join(current))
            current = []
        else:
            current.append(_ANSI_ESCAPE.sub("", line.rstrip("\r")) + "\n")
    out.append("".join(current))
    return [f for f in out if f.strip()]


def fortune_files(lang: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The fortune text files of a language, sorted (``.dat`` indexes, ``.u8`` aliases, symlinks and the
    ``off/`` subfolders of offensive fortunes left out).

    Raises:
        DataError: an unknown language, or its package is not installed (the message says how to install it).
    """
    if lang not in FORTUNES_PACKAGES:
        raise DataError(f"fortunes:{lang}: no fortunes for language {lang!r}; choose one of "
                        f"{sorted(FORTUNES_PACKAGES)}")
    base = Path(root) if root is not None else fortunes_root()
    install = (f"install it with `apt-get install {FORTUNES_PACKAGES[lang]}` (Debian/Ubuntu), or point "
               f"{FORTUNES_DIR_ENV} at a copy of /usr/share/games/fortunes")

    def texts_in(d: Path, names: Sequence[str] | None = None) -> list[Path]:
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if p.is_file() and not p.is_symlink()
                      and not p.name.endswith(_FORTUNES_SKIP_SUFFIXES) and (names is None or p.name in names))

    if lang == "zh":
        files = texts_in(base, _FORTUNES_ZH_FILES)
    elif lang == "en":  # the English package's files are the top-level ones that no other package put there
        files = [p for p in texts_in(base) if p.name not in _FORTUNES_ZH_FILES]
    else:
        files = texts_in(base / lang)
    if not files:
        raise DataError(f"fortunes:{lang}: no fortune files for {lang!r} under {str(base)!r}: the "
                        f"{FORTUNES_PACKAGES[lang]} package is not installed; {install}")
    return files


def fortunes_available(lang: str, root: str | os.PathLike | None = None) -> bool:
    """True when the fortunes of ``lang`` are installed."""
    try:
        return bool(fortune_files(lang, root))
    except DataError:
        return False


def fortunes_documents(lang: str, notes: list[str] | None = None,
                       root: str | os.PathLike | None = None) -> Iterator[tuple[str, str]]:
    """``(name, text)`` of every fortune of a language, named ``fortunes/<lang>/<file>#<k>``; files that are not
    UTF-8 (a few old ones are in legacy encodings) are skipped and listed in ``notes``."""
    skipped = []
    for path in fortune_files(lang, root):
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            skipped.append(path.name)
            continue
        for k, fortune in enumerate(split_fortunes(text)):
            yield f"fortunes/{lang}/{path.name}#{k}", fortune
    if skipped and notes is not None:
        notes.append(f"fortunes:{lang}: skipped {len(skipped)} files that are not UTF-8 ({', '.join(skipped)})")


