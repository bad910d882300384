"""Multilingual corpora: mT5 temperature sampling (p_l ~ n_l^(1/T)) checked against the formula computed here,
determinism in data.seed, language tagging by source and by JSONL field, the tokenizer trained on the mixture,
fortune-file parsing, and config validation errors."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from switchformer.config import DataConfig, RunConfig, apply_overrides
from switchformer.data import load_corpus, train_tokenizer
from switchformer.data.fortunes import (
    FORTUNES_DIR_ENV,
    fortune_files,
    fortunes_available,
    fortunes_documents,
    split_fortunes,
)
from switchformer.data.multilingual import MultilingualCorpus, language_probabilities, temperature_mixture
from switchformer.errors import ConfigError, DataError

_WORDS = {
    "en": "the of and to in is was that for it with as his on be at by had are but from".split(),
    "ru": "и в не на я быть он с что а по это она этот к но они мы как из у".split(),
    "zh": list("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年"),
}


def _docs(lang: str, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """n documents of 5..80 random words of a language (varied lengths, so proportions are not counts)."""
    words = _WORDS[lang]
    sep = "" if lang == "zh" else " "
    return [(f"{lang}/{i}", sep.join(rng.choice(words, size=int(rng.integers(5, 80)))) + "\n") for i in range(n)]


@pytest.fixture(scope="module")
def docs() -> dict[str, list[tuple[str, str]]]:
    rng = np.random.default_rng(0)
    return {"en": _docs("en", 600, rng), "ru": _docs("ru", 120, rng), "zh": _docs("zh", 20, rng)}


def _char_shares(mixture) -> dict[str, float]:
    chars = Counter()
    for _, text, lang in mixture:
        chars[lang] += len(text)
    total = sum(chars.values())
    return {lang: c / total for lang, c in chars.items()}


def test_language_probabilities_formula():
    sizes = {"a": 1_000_000.0, "b": 10_000.0, "c": 100.0}
    n = np.array([1_000_000.0, 10_000.0, 100.0])
    for temperature in (1.0, 2.0, 1 / 0.3, 10.0):
        expected = n ** (1 / temperature) / (n ** (1 / temperature)).sum()
        p = language_probabilities(sizes, temperature)
        assert list(p) == ["a", "b", "c"]
        np.testing.assert_allclose([p["a"], p["b"], p["c"]], expected, rtol=1e-12)
    # T = 1 is the natural mixture; large T approaches uniform; alpha = 0.3 of 10^6 : 10^4 : 10^2
    assert language_probabilities(sizes, 1.0)["c"] == pytest.approx(100 / 1_010_100)
    assert max(language_probabilities(sizes, 1e6).values()) == pytest.approx(1 / 3, abs=1e-4)
    p = language_probabilities(sizes, 1 / 0.3)
    assert p["a"] / p["b"] == pytest.approx(100 ** 0.3) and p["b"] / p["c"] == pytest.approx(100 ** 0.3)
    with pytest.raises(DataError, match="no training text"):
        language_probabilities({"a": 10.0, "b": 0.0}, 2.0)
    with pytest.raises(DataError, match="temperature"):
        language_probabilities(sizes, 0.0)


@pytest.mark.parametrize("temperature", [1.0, 1 / 0.3, 20.0])
def test_mixture_matches_temperature_probabilities(docs, temperature):
    mixture, stats = temperature_mixture(docs, temperature, seed=3)
    sizes = {lang: sum(len(t) for _, t in d) for lang, d in docs.items()}
    n = np.array([sizes[lang] for lang in sorted(sizes)], dtype=float)
    expected = dict(zip(sorted(sizes), n ** (1 / temperature) / (n ** (1 / temperature)).sum(), strict=True))
    shares = _char_shares(mixture)
    total = sum(sizes.values())
    longest = max(len(t) for d in docs.values() for _, t in d)
    for lang, p in expected.items():
        # the mixture stops at the document boundary nearest to each language's share: off by < one document
        assert abs(shares[lang] * sum(len(t) for _, t, _ in mixture) - p * total) <= longest, lang
        assert stats[lang]["probability"] == pytest.approx(p)
    assert sum(len(t) for _, t, _ in mixture) == pytest.approx(total, abs=3 * longest)  # same total size
    # every mixture document is one of its language's documents
    originals = {lang: {t for _, t in d} for lang, d in docs.items()}
    assert all(text in originals[lang] for _, text, lang in mixture)


def test_mixture_up_and_downsampling(docs):
    mixture, stats = temperature_mixture(docs, 1 / 0.3, seed=0)
    by_lang = {lang: [n for n, _, lg in mixture if lg == lang] for lang in docs}
    assert stats["en"]["passes"] < 1 < stats["zh"]["passes"]
    # downsampled: distinct documents; upsampled: every document at least floor(passes) times
    assert len(set(by_lang["en"])) == len(by_lang["en"])
    base = Counter(n.split("@")[0] for n in by_lang["zh"])
    assert set(base) == {n for n, _ in docs["zh"]}
    assert min(base.values()) >= int(stats["zh"]["passes"])
    # languages are interleaved, not in blocks
    first_half = {lg for _, _, lg in mixture[: len(mixture) // 2]}
    assert first_half == set(docs)


def test_mixture_is_deterministic_in_the_seed(docs):
    a, _ = temperature_mixture(docs, 1 / 0.3, seed=5)
    b, _ = temperature_mixture(docs, 1 / 0.3, seed=5)
    c, _ = temperature_mixture(docs, 1 / 0.3, seed=6)
    assert a == b
    assert [n for n, _, _ in a] != [n for n, _, _ in c]


def _write_jsonl(path: Path, docs: dict[str, list[tuple[str, str]]], field: str = "lang") -> Path:
    with path.open("w", encoding="utf-8") as f:
        for lang, items in docs.items():
            for _, text in items:
                f.write(json.dumps({"text": text, field: lang}, ensure_ascii=False) + "\n")
    return path


def test_jsonl_language_field_corpus(tmp_path, docs):
    path = _write_jsonl(tmp_path / "mixed.jsonl", docs)
    cfg = DataConfig(corpus=str(path), language_field="lang", val_fraction=0.1, seed=1)
    corpus = load_corpus(cfg)
    assert isinstance(corpus, MultilingualCorpus)
    assert len(corpus.train_langs) == len(corpus.train_texts) and len(corpus.val_langs) == len(corpus.val_texts)
    assert set(corpus.val_langs) == set(docs)  # every language has validation text, even the 20-document one
    # validation keeps each language's own documents, none of them in training
    assert not set(corpus.val_texts) & {t for t, _ in zip(corpus.train_texts, corpus.train_langs, strict=True)}
    train_chars = Counter()
    for text, lang in zip(corpus.train_texts, corpus.train_langs, strict=True):
        train_chars[lang] += len(text)
    total = sum(train_chars.values())
    for lang, s in corpus.languages.items():
        assert train_chars[lang] / total == pytest.approx(s["probability"], abs=0.02)
    assert "temperature 3.33" in corpus.summary()
    assert load_corpus(cfg).fingerprint == corpus.fingerprint
    other = load_corpus(DataConfig(corpus=str(path), language_field="lang", val_fraction=0.1, seed=2))
    assert other.fingerprint != corpus.fingerprint and other.val_texts == corpus.val_texts


def test_tokenizer_on_the_mixture_gives_the_small_language_pieces(tmp_path):
    rng = np.random.default_rng(1)

    def words(syllables, n):
        return ["".join(rng.choice(syllables, size=3)) for _ in range(n)]

    # two languages of many distinct words competing for a small vocabulary; Russian is 1% of the text
    ru_words = words(["ка", "ро", "ми", "ту", "ле", "за", "вы", "но", "пе", "ди", "сто", "гра"], 300)
    en_words = words(["ba", "ke", "lo", "mu", "ti", "ra", "so", "ne", "di", "pa", "str", "gre"], 300)
    ru = [(f"ru/{i}", " ".join(rng.choice(ru_words, size=40)) + "\n") for i in range(30)]
    en = [(f"en/{i}", " ".join(rng.choice(en_words, size=40)) + "\n") for i in range(3000)]
    natural = [t for _, t in en + ru]
    mixed = [t for _, t, _ in temperature_mixture({"en": en, "ru": ru}, 1 / 0.3, seed=0)[0]]
    held_out = " ".join(rng.choice(ru_words, size=2000))
    natural_tokens = len(train_tokenizer(natural, vocab_size=400, num_sentinels=0).encode(held_out))
    mixed_tokens = len(train_tokenizer(mixed, vocab_size=400, num_sentinels=0).encode(held_out))
    # the tokenizer trained on the temperature-sampled mixture has more Russian pieces: fewer tokens for Russian
    assert mixed_tokens < 0.7 * natural_tokens, (mixed_tokens, natural_tokens)


def test_languages_one_source_each(tmp_path):
    for lang in ("en", "ru"):
        d = tmp_path / lang
        d.mkdir()
        for i in range(4):
            (d / f"{i}.txt").write_text(" ".join(_WORDS[lang] * (i + 2)) + "\n", encoding="utf-8")
    cfg = DataConfig(languages={"en": str(tmp_path / "en"), "ru": f"{tmp_path / 'ru'}/*.txt"}, val_fraction=0.25)
    corpus = load_corpus(cfg)
    assert sorted(corpus.languages) == ["en", "ru"]
    assert set(corpus.val_langs) == {"en", "ru"}
    assert all(n.startswith(f"{lang}:") for n, lang in zip(corpus.train_names, corpus.train_langs, strict=True))
    with pytest.raises(DataError, match=r"data.languages.de = .*does not exist"):
        load_corpus(DataConfig(languages={"de": str(tmp_path / "missing")}))


def test_jsonl_language_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello", "lang": "en"}\n{"text": "hallo"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: the record has no language in field 'lang'"):
        load_corpus(DataConfig(corpus=str(bad), language_field="lang"))
    txt = tmp_path / "a.txt"
    txt.write_text("plain text\n", encoding="utf-8")
    with pytest.raises(DataError, match="not a .jsonl file"):
        load_corpus(DataConfig(corpus=str(txt), language_field="lang"))
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"text": "x y", "lang": "e n"}\n{"text": "z", "lang": "fr"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="language codes"):
        load_corpus(DataConfig(corpus=str(odd), language_field="lang"))


@pytest.mark.parametrize(("overrides", "message"), [
    (['data.languages={"d e"="x"}'], "language code"),
    (['data.languages={de=""}'], "data.languages.de"),
    (["data.languages=3"], "expected a table"),
    (["data.language_temperature=0"], "data.language_temperature"),
    (["data.language_temperature=-1"], "data.language_temperature"),
    (['data.languages={de="x"}', "data.language_field=lang"], "set one of them"),
    (['data.languages={de="x"}', "data.max_bytes=1000"], "max_bytes_per_language"),
    (["data.max_bytes_per_language=0"], "data.max_bytes_per_language"),
    (['data.language_field=" "'], "data.language_field is empty"),
])
def test_config_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), overrides)


def test_config_round_trip():
    from switchformer.config import run_config_from_dict, to_toml

    tomllib = pytest.importorskip("tomllib")
    cfg = apply_overrides(RunConfig(), ['data.languages={de="fortunes:de", en="en/*.txt"}',
                                        "data.language_temperature=2", "data.max_bytes_per_language=1000"])
    assert cfg.data.languages == {"de": "fortunes:de", "en": "en/*.txt"}
    assert run_config_from_dict(tomllib.loads(to_toml(cfg))) == cfg
    assert run_config_from_dict(tomllib.loads(to_toml(RunConfig()))) == RunConfig()


# ---------------------------------------------------------------------------------------------- fortunes
def test_split_fortunes():
    text = "First one.\n  -- Someone\n%\nSecond\r\nline two\r\n%\n%\n\x1b[33mcoloured\x1b[m text\n%\n\n"
    assert split_fortunes(text) == ["First one.\n  -- Someone\n", "Second\nline two\n", "coloured text\n"]
    assert split_fortunes("no separator at all\n") == ["no separator at all\n"]
    assert split_fortunes("%\n%\n") == []


@pytest.fixture()
def fake_fortunes(tmp_path, monkeypatch) -> Path:
    """A directory laid out like /usr/share/games/fortunes: English and Chinese files at the top, other languages
    in subfolders, strfile .dat indexes, .u8 symlinks, an off/ folder and an Italian symlink at the top."""
    root = tmp_path / "fortunes"
    (root / "de" / "off").mkdir(parents=True)
    (root / "it").mkdir()
    (root / "fortunes").write_text("An English fortune.\n%\nAnother one.\n", encoding="utf-8")
    (root / "fortunes.dat").write_bytes(b"\x00\x01binary index")
    (root / "fortunes.u8").symlink_to("fortunes")
    (root / "tang300").write_text("床前明月光\n%\n疑是地上霜\n", encoding="utf-8")
    (root / "de" / "witze").write_text("Ein Witz über Bäume.\n%\nNoch einer.\n%\n", encoding="utf-8")
    (root / "de" / "witze.dat").write_bytes(b"\x00index")
    (root / "de" / "legacy").write_bytes("Sch\xf6n\n%\n".encode("latin-1"))
    (root / "de" / "off" / "rude").write_text("not read\n", encoding="utf-8")
    (root / "it" / "adams").write_text("Una fortuna.\n", encoding="utf-8")
    (root / "adams").symlink_to("it/adams")
    monkeypatch.setenv(FORTUNES_DIR_ENV, str(root))
    return root


def test_fortune_files_layout(fake_fortunes):
    assert [p.name for p in fortune_files("en")] == ["fortunes"]
    assert [p.name for p in fortune_files("zh")] == ["tang300"]
    assert [p.name for p in fortune_files("de")] == ["legacy", "witze"]
    notes: list[str] = []
    docs = list(fortunes_documents("de", notes))
    assert docs == [("fortunes/de/witze#0", "Ein Witz über Bäume.\n"), ("fortunes/de/witze#1", "Noch einer.\n")]
    assert notes and "legacy" in notes[0]
    assert fortunes_available("it") and not fortunes_available("pl")
    with pytest.raises(DataError, match=r"fortunes-pl package is not installed.*apt-get install fortunes-pl"):
        fortune_files("pl")
    with pytest.raises(DataError, match="no fortunes for language 'xx'"):
        fortune_files("xx")
    corpus = load_corpus(DataConfig(languages={"de": "fortunes:de", "en": "fortunes:en", "zh": "fortunes:zh"},
                                    val_fraction=0.3))
    assert sorted(corpus.languages) == ["de", "en", "zh"]
    assert not any(t.strip() == "%" or "%\n" in t for t in corpus.train_texts + corpus.val_texts)


_REAL = [lang for lang in ("en", "de", "es", "it", "ru", "pl", "cs", "zh") if fortunes_available(lang)]
_REAL_SKIP = ("Debian fortunes packages not installed: apt-get install fortunes fortunes-de fortunes-es fortunes-it "
              "fortunes-ru fortunes-pl fortunes-cs fortunes-zh")


@pytest.mark.skipif(len(_REAL) < 8 or bool(os.environ.get(FORTUNES_DIR_ENV)), reason=_REAL_SKIP)
def test_real_fortunes_corpus():
    scripts = {"ru": ("\u0400", "\u04ff"), "zh": ("\u4e00", "\u9fff")}
    words = {"en": " the ", "de": " und ", "es": " que ", "it": " che ", "pl": " nie ", "cs": " je "}
    for lang in _REAL:
        texts = [t for _, t in fortunes_documents(lang)]
        assert len(texts) > 1000, lang
        assert not any(line == "%" for t in texts[:500] for line in t.splitlines()), lang
        sample = "".join(texts[:2000])
        if lang in scripts:
            lo, hi = scripts[lang]
            assert sum(lo <= ch <= hi for ch in sample) > 0.2 * len(sample.replace(" ", "")), lang
        if lang in words:  # the language's most common word is common
            assert sample.count(words[lang]) > 100, lang
    corpus = load_corpus(DataConfig(languages={lang: f"fortunes:{lang}" for lang in _REAL},
                                    max_bytes_per_language=50_000))
    assert sorted(set(corpus.val_langs)) == sorted(_REAL)
