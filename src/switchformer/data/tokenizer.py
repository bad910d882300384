"""SentencePiece tokenizer with T5's id layout (paper §3, "Vocabulary").

Layout, as in T5 / Switch (``cc_all.32000.100extra``)::

    0 = <pad>, 1 = </s> (EOS), 2 = <unk>, 3 .. P-1 = pieces, P .. P+S-1 = sentinels, with
    <extra_id_0> = P+S-1 (the LAST id), <extra_id_1> = P+S-2, ...

P is the SentencePiece model's piece count and S the number of sentinels (100), so ``vocab_size = P + S``; loading
T5's ``spiece.model`` gives 32000 + 100 = 32100 (the model's embedding table pads that to 32128).

:func:`get_tokenizer` trains a unigram model on the training texts when ``DataConfig.tokenizer`` is None, and
caches it in ``cache_dir`` keyed by the corpus fingerprint and the vocabulary size. The training options suit
source code: no whitespace folding, byte fallback for rare characters, ``\\n`` and ``\\t`` as pieces, whitespace
runs as pieces, so ``decode(encode(text)) == text`` for any UTF-8 text without NUL bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from switchformer.config import DataConfig
from switchformer.errors import DataError

try:
    import sentencepiece as spm
except ImportError:  # an optional dependency: the core install (layer, models, checkpoints) does without it
    raise ModuleNotFoundError("the tokenizer needs sentencepiece: pip install 'switchformer[train]'") from None

log = logging.getLogger(__name__)

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")
# Bump when the trainer options below change, so cached models trained with old options are not reused.
_TRAINER_VERSION = "spm-unigram-code-v3"
# Lines fed to the trainer: ~100k lines of code train an 8k vocabulary in ~10 s on 2 cores and give the same
# tokens/byte (within 0.2%) as 300k lines (measured on the CPython 3.11 standard library).
_INPUT_SENTENCE_SIZE = 100_000
_SEED_SENTENCEPIECE_SIZE = 200_000
_MAX_SENTENCE_LENGTH = 4096  # bytes; the trainer skips longer sentences, so longer lines are fed in pieces


class Tokenizer:
    """A SentencePiece model plus ``num_sentinels`` T5 sentinel ids above its pieces.

    Attributes:
        sp: the ``sentencepiece.SentencePieceProcessor``.
        num_pieces: pieces of the SentencePiece model (P).
        num_sentinels: sentinel ids appended above the pieces (S).
        vocab_size: P + S, every id this tokenizer can produce.
        pad_id, eos_id, unk_id: 0, 1, 2.
        fingerprint: sha256 of the serialized model and the sentinel count (cache key for token arrays).
    """

    pad_id: int = PAD_ID
    eos_id: int = EOS_ID
    unk_id: int = UNK_ID

    def __init__(self, model_proto: bytes, num_sentinels: int = 100, source: str = "<memory>") -> None:
        """Wrap a serialized SentencePiece model.

        Args:
            model_proto: bytes of a ``spiece.model`` file.
            num_sentinels: sentinel ids to append (T5: 100).
            source: where the model came from, for error messages.
        """
        if num_sentinels < 0:
            raise DataError(f"num_sentinels must be >= 0, got {num_sentinels}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError on garbage
            raise DataError(f"{source} is not a SentencePiece model ({e}); pass a spiece.model file") from e
        got = (sp.pad_id(), sp.eos_id(), sp.unk_id())
        if got != (PAD_ID, EOS_ID, UNK_ID):
            raise DataError(
                f"{source} has (pad, eos, unk) ids {got}; switchformer needs T5's layout (0, 1, 2). Retrain it with "
                "pad_id=0 eos_id=1 unk_id=2 bos_id=-1, or set data.tokenizer to nothing to train one on the corpus"
            )
        self.sp = sp
        self._proto = bytes(model_proto)
        self.num_pieces = sp.get_piece_size()
        self.num_sentinels = num_sentinels
        self.vocab_size = self.num_pieces + num_sentinels
        self.source = source
        h = hashlib.sha256(self._proto)
        h.update(f"sentinels={num_sentinels}".encode())
        self.fingerprint = h.hexdigest()

    @classmethod
    def from_file(cls, path: str | os.PathLike, num_sentinels: int = 100) -> Tokenizer:
        """Load ``spiece.model`` (a file, or a directory containing one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "spiece.model"
        if not p.is_file():
            raise DataError(f"tokenizer file {str(p)!r} does not exist; give the path of a spiece.model file")
        return cls(p.read_bytes(), num_sentinels=num_sentinels, source=str(p))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``spiece.model`` into ``directory`` (created if needed) and return its path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        out = d / "spiece.model"
        _atomic_write(out, self._proto)
        return out

    def sentinel_id(self, i: int) -> int:
        """Id of ``<extra_id_i>``: ``vocab_size - 1 - i`` (T5: sentinel 0 is the last id)."""
        if not 0 <= i < self.num_sentinels:
            raise DataError(
                f"sentinel index {i} out of range [0, {self.num_sentinels}); a sequence needs one sentinel per "
                "noise span: raise data.num_sentinels or lower data.input_length"
            )
        return self.vocab_size - 1 - i

    def is_sentinel(self, ids: np.ndarray) -> np.ndarray:
        """Bool array, True where ``ids`` are sentinel ids."""
        return np.asarray(ids) >= self.num_pieces

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOS appended). ``<extra_id_N>`` in the text becomes sentinel N."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if "<extra_id_" not in text:
            return self.sp.encode(text)
        ids: list[int] = []
        pos = 0
        for m in _SENTINEL_RE.finditer(text):
            if m.start() > pos:
                ids.extend(self.sp.encode(text[pos : m.start()]))
            ids.append(self.sentinel_id(int(m.group(1))))
            pos = m.end()
        if pos < len(text):
            ids.extend(self.sp.encode(text[pos:]))
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Token ids of many texts at once (sentencepiece's threaded batch encode; sentinel strings not parsed)."""
        if not texts:
            return []
        threads = num_threads if num_threads is not None else min(4, os.cpu_count() or 1)
        return self.sp.encode(list(texts), num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; sentinels show as ``<extra_id_N>``, pad and EOS as nothing."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(
                f"ids {bad[:5]} are outside [0, {self.vocab_size}); drop label padding (-100) before decoding"
            )
        parts: list[str] = []
        run: list[int] = []
        for i in ids:  # loop over a user's ids for display, not a hot path
            if i >= self.num_pieces:
                if run:
                    parts.append(self.sp.decode(run))
                    run = []
                parts.append(f"<extra_id_{self.vocab_size - 1 - i}>")
            else:
                run.append(i)
        if run:
            parts.append(self.sp.decode(run))
        return "".join(parts)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(pieces={self.num_pieces}, sentinels={self.num_sentinels}, vocab_size={self.vocab_size}, "
            f"source={self.source!r})"
        )


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a concurrent reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _line_pieces(line: str, max_bytes: int = _MAX_SENTENCE_LENGTH) -> Iterator[str]:
    """``line`` in consecutive pieces of at most ``max_bytes`` UTF-8 bytes, cut after whitespace where possible
    (``"".join`` gives the line back). The trainer skips longer sentences, so without this a corpus of very long
    lines (minified code, one-line dumps) would leave it nothing to train on."""
    if len(line) * 4 <= max_bytes or len(line.encode("utf-8")) <= max_bytes:
        yield line
        return
    width = max_bytes // 4  # characters; a UTF-8 character has at most 4 bytes
    start = 0
    while start < len(line):
        end = min(start + width, len(line))
        if end < len(line):
            cut = max(line.rfind(" ", start + width // 2, end), line.rfind("\t", start + width // 2, end))
            if cut > start:
                end = cut + 1
        yield line[start:end]
        start = end


def _training_lines(texts: Sequence[str], max_lines: int = _INPUT_SENTENCE_SIZE) -> Iterator[str]:
    """Non-blank lines of the texts (overlong ones in pieces), every k-th one so that at most ``max_lines`` are
    yielded.

    SentencePiece trains on 'sentences' (newlines are separate pieces). We sample lines ourselves, by stride,
    instead of with SentencePiece's random sampler, so the trained model is the same on every run.
    """

    def lines() -> Iterator[str]:
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield from _line_pieces(line)

    total = sum(1 for _ in lines())
    stride = max(1, -(-total // max_lines))
    for n, line in enumerate(lines()):
        if n % stride == 0:
            yield line


def train_tokenizer(
    texts: Sequence[str], vocab_size: int, num_sentinels: int = 100, num_threads: int = 2
) -> Tokenizer:
    """Train a SentencePiece unigram model on ``texts`` with T5's special ids.

    Args:
        texts: training documents.
        vocab_size: pieces of the model (before sentinels), including pad/eos/unk, the 256 byte pieces and the
            ``\\n``/``\\t`` pieces, so it must be at least ~300.
        num_sentinels: sentinels appended above the pieces.
        num_threads: trainer threads. The model depends on it: keep the default for reproducible models.

    Returns:
        The trained :class:`Tokenizer`.
    """
    if vocab_size < 300:
        raise DataError(f"data.vocab_size must be >= 300 (256 byte pieces + specials + a few), got {vocab_size}")
    if not any(t.strip() for t in texts):
        raise DataError("cannot train a tokenizer on empty texts; check data.corpus")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts),
            model_writer=model,
            model_type="unigram",
            vocab_size=vocab_size,
            # T5's special ids; no BOS.
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            # Code: keep every whitespace character, so decode(encode(x)) == x.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n", "\t"],
            byte_fallback=True,
            character_coverage=0.9995,
            split_digits=True,
            # Speed: a sample of lines is plenty for a vocabulary of a few thousand pieces (sampled above).
            input_sentence_size=0,
            shuffle_input_sentence=False,
            seed_sentencepiece_size=_SEED_SENTENCEPIECE_SIZE,
            max_sentence_length=_MAX_SENTENCE_LENGTH,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high (8000). Please set it to a value <= 1234."
        advice = "set data.vocab_size accordingly" if "ocabulary size" in str(e) else "check data.corpus"
        raise DataError(f"SentencePiece training failed: {e} ({advice})") from e
    return Tokenizer(model.getvalue(), num_sentinels=num_sentinels, source=f"trained(vocab_size={vocab_size})")


def get_tokenizer(cfg: DataConfig, corpus, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Load ``cfg.tokenizer``, or train one on ``corpus.train_texts`` (cached by corpus fingerprint + vocab size).

    Args:
        cfg: data config (``tokenizer``, ``vocab_size``, ``num_sentinels``).
        corpus: a :class:`~switchformer.data.sources.Corpus` (only needed when training).
        cache_dir: where trained models are cached; None trains without caching.

    Returns:
        The tokenizer; ``tok.vocab_size`` = pieces + ``cfg.num_sentinels``.
    """
    if cfg.tokenizer:
        return Tokenizer.from_file(cfg.tokenizer, num_sentinels=cfg.num_sentinels)
    if corpus is None:
        raise DataError("get_tokenizer needs a corpus to train on when data.tokenizer is not set")
    key = hashlib.sha256(f"{corpus.fingerprint}|{cfg.vocab_size}|{_TRAINER_VERSION}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"spm_{key}_v{cfg.vocab_size}.model" if cache_dir is not None else None
    if path is not None and path.is_file():
        log.info("tokenizer: using cached %s", path)
        return Tokenizer(path.read_bytes(), num_sentinels=cfg.num_sentinels, source=str(path))
    t0 = time.perf_counter()
    tok = train_tokenizer(corpus.train_texts, cfg.vocab_size, cfg.num_sentinels)
    log.info("tokenizer: trained %d pieces in %.1f s", tok.num_pieces, time.perf_counter() - t0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, tok._proto)
        tok.source = str(path)
    return tok


SPIECE_NAME = "spiece.model"
DEFAULT_NUM_SENTINELS = 100
"""T5's sentinel count (``<extra_id_0>`` ... ``<extra_id_99>``), the released tokenizers' ``extra_ids``."""


def _as_list(value) -> list:
    return value if isinstance(value, list) else []


def _checkpoint_sentinels(d: Path) -> tuple[int | None, dict[int, int]]:
    """(``extra_ids`` if a tokenizer file states it, {sentinel index: id} the tokenizer files assign) of a
    transformers-format directory; names listed without ids only raise the count."""
    count: int | None = None
    ids: dict[int, int] = {}
    named = -1
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json"):
        path = d / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not valid JSON ({e}); re-download the checkpoint's tokenizer files") from None
        if not isinstance(raw, dict):
            continue
        extra = raw.get("extra_ids")
        if isinstance(extra, int) and not isinstance(extra, bool) and extra > 0:
            count = extra
        if name == "added_tokens.json":  # {content: id}
            tokens: list = [{"content": k, "id": v} for k, v in raw.items()]
        elif name == "tokenizer.json":  # added_tokens: [{"id": .., "content": ..}]
            tokens = _as_list(raw.get("added_tokens"))
        else:  # names only (transformers 4.x: additional_special_tokens; 5.x: extra_special_tokens)
            tokens = _as_list(raw.get("additional_special_tokens")) + _as_list(raw.get("extra_special_tokens"))
        for tok in tokens:
            content = tok.get("content") if isinstance(tok, dict) else tok
            m = _SENTINEL_RE.fullmatch(content) if isinstance(content, str) else None
            if m is None:
                continue
            named = max(named, int(m.group(1)))
            if isinstance(tok, dict) and isinstance(tok.get("id"), int):
                ids[int(m.group(1))] = tok["id"]
    if count is None and named >= 0:
        count = named + 1
    return count, ids


def load_checkpoint_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer a transformers-format checkpoint directory ships: its ``spiece.model`` plus T5's sentinels.

    This is the tokenizer of the released T5 / Switch checkpoints (paper §3, "Vocabulary"): 32000 pieces and 100
    sentinels, ``<extra_id_0>`` = 32099, in an embedding of 32128 rows. The sentinel count is the tokenizer files'
    ``extra_ids`` (``tokenizer_config.json``), else one more than the highest ``<extra_id_N>`` they name, else 100;
    ids the files assign to sentinels must be the ones this layout gives them.

    Args:
        directory: a checkpoint directory holding ``spiece.model`` (and usually config.json).

    Raises:
        DataError: no ``spiece.model``, a model without T5's special ids, sentinel ids that disagree with T5's layout,
            or pieces + sentinels that exceed config.json's ``vocab_size`` (ids the model has no embedding for).
    """
    d = Path(directory)
    path = d / SPIECE_NAME
    if not path.is_file():
        raise DataError(
            f"{d} has no {SPIECE_NAME}; a checkpoint's SentencePiece tokenizer lives there (download it with the "
            "weights, e.g. `hf download REPO spiece.model --local-dir DIR`), or pass a tokenizer file explicitly")
    count, ids = _checkpoint_sentinels(d)
    tok = Tokenizer(path.read_bytes(), num_sentinels=DEFAULT_NUM_SENTINELS if count is None else count,
                    source=str(path))
    wrong = {f"<extra_id_{i}>": j for i, j in ids.items() if i >= tok.num_sentinels or tok.sentinel_id(i) != j}
    if wrong:
        raise DataError(
            f"{d}: the tokenizer files give sentinels ids {dict(list(wrong.items())[:3])}, but T5's layout with "
            f"{tok.num_pieces} pieces and {tok.num_sentinels} sentinels puts <extra_id_N> at "
            f"{tok.vocab_size - 1} - N; the tokenizer files do not match this spiece.model")
    config = d / "config.json"
    vocab = None
    if config.is_file():
        try:
            vocab = json.loads(config.read_text(encoding="utf-8")).get("vocab_size")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            vocab = None  # config.json errors are the model loader's to report
    if isinstance(vocab, int) and not isinstance(vocab, bool) and tok.vocab_size > vocab:
        raise DataError(
            f"{path}: {tok.num_pieces} pieces + {tok.num_sentinels} sentinels = {tok.vocab_size} ids, but "
            f"{config} has vocab_size {vocab}: the tokenizer does not belong to this model (or state the sentinel "
            "count as 'extra_ids' in tokenizer_config.json)")
    return tok
