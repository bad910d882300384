"""Multilingual corpora: languages tagged per source or per record, mixed with mT5's temperature sampling.

The paper's multilingual runs (§4.3, Figs. 7-8) pre-train mSwitch and mT5 on mC4's 101 languages, where mT5
samples a language with probability ``p_l ~ n_l ** alpha`` (alpha = 0.3), so small languages are seen more often
than their share of the data. Here:

- A corpus is tagged with languages in one of two ways: ``data.languages = {de = "fortunes:de", en = "en/*.txt"}``
  (one source per language, each any ``data.corpus`` form), or ``data.language_field = "lang"`` with JSONL files in
  ``data.corpus`` whose records name their language.
- Each language is split into train and validation documents on its own (the usual hash split), so every language
  has validation text.
- The training documents are resampled into a mixture of the same total size in which language ``l`` holds the
  fraction ``p_l = n_l ** (1/T) / sum_k n_k ** (1/T)`` of the characters, where ``n_l`` counts the language's training
  characters and ``T = data.language_temperature`` (mT5: alpha = 1/T = 0.3; mT5 counts examples; characters keep a
  language of few long documents from being undercounted). A language is read in a fresh random order on each
  pass, whole passes first when it is upsampled, and the mixture is shuffled: all of it a function of
  ``data.seed``. The SentencePiece tokenizer trains on this mixture, so small languages get pieces too.
- Validation keeps each language's own held-out documents; ``language_val_batches`` builds up to
  ``train.eval_batches`` batches per language, and evaluation reports the loss of each language beside the overall
  loss (the token-weighted mean over all of them).

``fortunes:LANG`` (``switchformer.data.fortunes``) reads Debian's fortune cookie packages, real short texts in eight
languages that install with apt. ``load_corpus`` (``switchformer.data.load_corpus``) reads any corpus, multilingual
or not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import switchformer.data.sources as sources
from switchformer.config import DataConfig
from switchformer.errors import DataError

_LANGUAGE_CODE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_MIX_SALT = 0x6D697874  # "mixt": the stream that shuffles the mixed documents


# ----------------------------------------------------------------------------------------------- sampling
def language_probabilities(sizes: dict[str, float], temperature: float) -> dict[str, float]:
    """mT5's language sampling distribution: ``p_l = n_l ** (1/T) / sum_k n_k ** (1/T)``.

    Args:
        sizes: ``n_l`` per language (here: training characters); every one positive.
        temperature: ``T`` > 0; 1 keeps the natural proportions, larger values flatten them (mT5: 1/0.3).
    """
    if not sizes:
        raise DataError("no languages to sample from")
    if not temperature > 0 or not np.isfinite(temperature):
        raise DataError(f"data.language_temperature must be a finite number > 0, got {temperature}")
    bad = [lang for lang, n in sizes.items() if not n > 0]
    if bad:
        raise DataError(f"languages {bad} have no training text; give them text or remove them")
    langs = sorted(sizes)
    logw = np.array([np.log(float(sizes[lang])) / temperature for lang in langs])
    w = np.exp(logw - logw.max())  # in log space: large corpora and small T do not overflow
    return {lang: float(x) for lang, x in zip(langs, w / w.sum(), strict=True)}


def _language_seed(seed: int, lang: str) -> list[int]:
    """Seed of one language's document stream: independent of which other languages are in the corpus."""
    return [int(seed), int.from_bytes(hashlib.sha256(lang.encode("utf-8")).digest()[:4], "big")]


def temperature_mixture(docs: dict[str, list[tuple[str, str]]], temperature: float,
                        seed: int) -> tuple[list[tuple[str, str, str]], dict[str, dict]]:
    """Resample each language's training documents into one mixture of the same total size (characters) in which
    language ``l`` holds about ``p_l`` of the characters (``language_probabilities``).

    Each language's documents are taken in a fresh random order per pass until its share is reached (nearest
    document boundary), so a downsampled language contributes distinct documents and an upsampled one whole
    passes first; the mixture is then shuffled. Deterministic in ``seed``.

    Returns:
        ``[(name, text, lang)]`` of the mixture (a repeated document's name gets ``@<pass>``), and per language
        ``{"documents", "characters", "probability", "sampled_characters", "sampled_documents", "passes"}``.
    """
    sizes = {lang: sum(len(t) for _, t in d) for lang, d in docs.items()}
    probs = language_probabilities(sizes, temperature)
    total = sum(sizes.values())
    mixture: list[tuple[str, str, str]] = []
    stats: dict[str, dict] = {}
    for lang in sorted(docs):
        items = docs[lang]
        lengths = np.array([len(t) for _, t in items], dtype=np.int64)
        target = probs[lang] * total
        rng = np.random.default_rng(_language_seed(seed, lang))
        taken, count, passes = 0, 0, 0
        while taken < target:
            order = rng.permutation(len(items))
            ends = taken + np.cumsum(lengths[order])  # characters taken after each document of this pass
            # stop at the document boundary nearest to the target
            stop = int(np.searchsorted(ends, target))
            if stop < len(order):
                before = ends[stop - 1] if stop > 0 else taken
                stop = stop + 1 if ends[stop] - target <= target - before else stop
            for i in order[:stop]:
                name, text = items[int(i)]
                mixture.append((name if passes == 0 else f"{name}@{passes}", text, lang))
            taken = int(ends[stop - 1]) if stop > 0 else taken
            count += stop
            passes += 1
            if stop < len(order):
                break
        stats[lang] = {"documents": len(items), "characters": int(sizes[lang]), "probability": probs[lang],
                       "sampled_characters": taken, "sampled_documents": count,
                       "passes": taken / max(sizes[lang], 1)}
    order = np.random.default_rng([int(seed), _MIX_SALT]).permutation(len(mixture))
    return [mixture[int(i)] for i in order], stats


# ------------------------------------------------------------------------------------------------- corpus
@dataclass
class MultilingualCorpus(sources.Corpus):
    """A :class:`~switchformer.data.sources.Corpus` whose documents carry a language.

    Attributes:
        train_langs: language of each training document (the temperature-sampled mixture).
        val_langs: language of each validation document (each language's own held-out documents).
        languages: per language: ``documents``/``characters`` of its training split before sampling, sampling
            ``probability``, ``sampled_characters``/``sampled_documents`` in the mixture, ``passes`` (sampled /
            natural characters), ``val_documents``, and ``source``.
        temperature: the sampling temperature used.
    """

    train_langs: list[str] = field(default_factory=list)
    val_langs: list[str] = field(default_factory=list)
    languages: dict[str, dict] = field(default_factory=dict)
    temperature: float = 1.0

    def summary(self) -> str:
        """The corpus summary plus one line per language (natural share, sampling probability, passes)."""
        total = sum(s["characters"] for s in self.languages.values()) or 1
        lines = [super().summary(), f"languages (temperature {self.temperature:.3g}: p_l ~ n_l^(1/T)):"]
        for lang, s in self.languages.items():
            lines.append(f"  {lang}: {s['documents']:,} train docs, {s['characters']:,} chars "
                         f"({s['characters'] / total:.1%} natural) -> p={s['probability']:.1%}, "
                         f"{s['passes']:.2f} passes; {s['val_documents']:,} val docs")
        return "\n".join(lines)


def _read_tagged_jsonl(path: Path, name: str, text_field: str, lang_field: str) -> Iterator[tuple[str, str, str]]:
    """``(name, text, language)`` of every record of a JSONL file whose text is not blank.

    Raises:
        DataError: malformed input (as for any JSONL corpus) or a record without a language.
    """
    import json  # noqa: PLC0415

    languages: dict[int, object] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                record = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue  # _jsonl_documents below reports it, naming the line
            languages[lineno] = record.get(lang_field) if isinstance(record, dict) else None
    for doc_name, text in sources._jsonl_documents(path, name, text_field):
        lineno = int(doc_name.rsplit("#", 1)[1])
        lang = languages.get(lineno)
        if not isinstance(lang, str) or not lang.strip():
            raise DataError(f"{path}:{lineno}: the record has no language in field {lang_field!r} (got {lang!r}); "
                            "every record needs one (or set data.language_field=none)")
        yield doc_name, text, lang.strip()


def _tagged_jsonl(cfg: DataConfig, notes: list[str]) -> tuple[dict[str, list[tuple[str, str]]], int, bool]:
    """Records of the JSONL files of ``data.corpus``, grouped by ``data.language_field`` (``data.max_bytes`` caps
    the whole, ``data.max_bytes_per_language`` each language)."""
    budget = sources._Budget(cfg.max_bytes)
    per_lang: dict[str, list[tuple[str, str]]] = {}
    lang_bytes: dict[str, int] = {}
    capped: set[str] = set()
    num_files = 0
    for part in (os.path.expanduser(p.strip()) for p in cfg.corpus.split(",") if p.strip()):
        for path, name in sources._expand(part):
            if path.suffix.lower() != ".jsonl":
                raise DataError(f"data.language_field reads the language of JSONL records, but {str(path)!r} is "
                                "not a .jsonl file; tag other files with data.languages = {LANG = \"PATH\"}")
            num_files += 1
            for doc_name, text, lang in _read_tagged_jsonl(path, name, cfg.text_field, cfg.language_field):
                limit = cfg.max_bytes_per_language
                if limit is not None and lang_bytes.get(lang, 0) + len(text.encode("utf-8")) > limit:
                    capped.add(lang)
                    continue
                kept = budget.take(text)
                if kept is None:
                    break
                lang_bytes[lang] = lang_bytes.get(lang, 0) + len(kept.encode("utf-8"))
                per_lang.setdefault(lang, []).append((doc_name, kept))
    bad = sorted(lang for lang in per_lang if not set(lang) <= _LANGUAGE_CODE_CHARS)
    if bad:
        raise DataError(f"data.language_field {cfg.language_field!r}: language codes {bad} must be letters, digits, "
                        "'_' or '-' (e.g. de, en, zh-Hans)")
    if capped:
        notes.append(f"data.max_bytes_per_language={cfg.max_bytes_per_language:,} left out records of "
                     f"{sorted(capped)}")
    return per_lang, num_files, budget.exhausted


def load_corpus(cfg: DataConfig) -> sources.Corpus:
    """Any corpus: a :class:`MultilingualCorpus` when ``data.languages`` or ``data.language_field`` is set, else
    ``switchformer.data.sources.load_corpus``'s."""
    if cfg.languages or cfg.language_field is not None:
        return load_multilingual_corpus(cfg)
    return sources.load_corpus(cfg)


def load_multilingual_corpus(cfg: DataConfig) -> MultilingualCorpus:
    """Read a corpus tagged with languages (``data.languages`` or ``data.language_field``), split each language into
    train and validation documents, and mix the training documents with temperature sampling (module docstring).

    Raises:
        DataError: a source that cannot be read, a record without a language, or a language without text.
    """
    notes: list[str] = []
    sources_of: dict[str, str] = {}
    split_docs: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {}
    num_files, truncated = 0, False
    if cfg.languages:
        for lang in sorted(cfg.languages):
            spec = cfg.languages[lang]
            sub = dataclasses.replace(cfg, corpus=spec, languages={}, language_field=None,
                                      max_bytes=cfg.max_bytes_per_language)
            try:
                c = sources.load_corpus(sub)
            except DataError as e:
                raise DataError(f"data.languages.{lang} = {spec!r}: {e}") from e
            num_files += c.num_files
            truncated = truncated or c.truncated
            notes.extend(f"{lang}: {n}" for n in c.notes)
            sources_of[lang] = spec
            split_docs[lang] = ([(f"{lang}:{n}", t) for n, t in zip(c.train_names, c.train_texts, strict=True)],
                                [(f"{lang}:{n}", t) for n, t in zip(c.val_names, c.val_texts, strict=True)])
    elif cfg.language_field is not None:
        per_lang, num_files, truncated = _tagged_jsonl(cfg, notes)
        if not per_lang:
            raise DataError(f"data.corpus {cfg.corpus!r} yielded no text")
        for lang in sorted(per_lang):
            lang_notes: list[str] = []
            split_docs[lang] = sources._split(per_lang[lang], cfg.val_fraction, lang_notes)
            notes.extend(f"{lang}: {n}" for n in lang_notes)
            sources_of[lang] = f"{cfg.corpus} [{cfg.language_field}={lang}]"
    else:
        raise DataError("load_multilingual_corpus needs data.languages or data.language_field")

    mixture, stats = temperature_mixture({lang: tr for lang, (tr, _) in split_docs.items()},
                                         cfg.language_temperature, cfg.seed)
    val = [(name, text, lang) for lang in sorted(split_docs) for name, text in split_docs[lang][1]]
    for lang in stats:
        stats[lang]["val_documents"] = len(split_docs[lang][1])
        stats[lang]["source"] = sources_of[lang]
    h = hashlib.sha256(f"multilingual|T={cfg.language_temperature!r}|seed={cfg.seed}".encode())
    for tag, part in (("train", mixture), ("val", val)):
        h.update(f"[{tag}:{len(part)}]".encode())
        for name, text, lang in part:
            h.update(lang.encode() + b"\x00" + name.encode("utf-8") + b"\x00" + text.encode("utf-8") + b"\x00")
    # bytes of the corpus as trained: the mixture's training documents plus the validation documents
    num_bytes = sum(len(t.encode("utf-8")) for part in (mixture, val) for _, t, _ in part)
    spec = cfg.corpus if not cfg.languages else ",".join(f"{k}={v}" for k, v in sorted(cfg.languages.items()))
    return MultilingualCorpus(
        train_texts=[t for _, t, _ in mixture], val_texts=[t for _, t, _ in val],
        train_names=[n for n, _, _ in mixture], val_names=[n for n, _, _ in val],
        source=spec, num_files=num_files, num_bytes=num_bytes, fingerprint=h.hexdigest(),
        truncated=truncated, notes=notes,
        train_langs=[lang for _, _, lang in mixture], val_langs=[lang for _, _, lang in val],
        languages=stats, temperature=cfg.language_temperature,
    )


def language_val_batches(cfg: DataConfig, tok, corpus: MultilingualCorpus, batch_size: int, model_arch: str,
                         *, cache_dir: str | os.PathLike | None = None,
                         max_batches: int | None = None) -> tuple[list[dict], list[str]]:
    """Fixed validation batches of every language (up to ``max_batches`` each) and the language of each batch.

    Each language is packed on its own, so every batch holds one language and the loss of a language is exact.
    """
    from switchformer.data.loader import make_loader  # noqa: PLC0415

    batches: list[dict] = []
    langs: list[str] = []
    for lang in sorted(set(corpus.val_langs)):
        texts = [t for t, lg in zip(corpus.val_texts, corpus.val_langs, strict=True) if lg == lang]
        try:
            loader = make_loader(cfg, tok, texts, batch_size, "val", model_arch, cache_dir=cache_dir)
        except DataError as e:
            raise DataError(f"validation text of language {lang!r}: {e}") from e
        lang_batches = list(loader.epoch_batches(max_batches))
        batches.extend(lang_batches)
        langs.extend([lang] * len(lang_batches))
    return batches, langs
