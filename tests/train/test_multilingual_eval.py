"""Per-language evaluation on a multilingual corpus: each language's loss equals evaluating its batches alone, the
token-weighted languages give back the overall val_loss, training logs them, and `compare` reports the
per-language step speedup (paper §4.3, Figs. 7-8) with its plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from switchformer.config import apply_overrides, load_toml
from switchformer.metrics import read_metrics
from switchformer.train.compare import compare, format_summary, language_speedups
from switchformer.train.loop import build_components, evaluate

ROOT = Path(__file__).resolve().parents[2]
_SYLLABLES = {
    "en": ["ba", "ke", "lo", "mu", "ti", "ra", "so", "ne", "di", "pa", "str", "gre"],
    "ru": ["ка", "ро", "ми", "ту", "ле", "за", "вы", "но", "пе", "ди", "сто", "гра"],
    "zh": list("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年"),
}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multilingual")
    rng = np.random.default_rng(0)
    with (tmp / "mixed.jsonl").open("w", encoding="utf-8") as f:
        for lang, n in (("en", 300), ("ru", 100), ("zh", 40)):
            words = ["".join(rng.choice(_SYLLABLES[lang], size=2)) for _ in range(150)]
            sep = "" if lang == "zh" else " "
            for _ in range(n):
                text = sep.join(rng.choice(words, size=int(rng.integers(20, 60))))
                f.write(json.dumps({"text": text, "lang": lang}, ensure_ascii=False) + "\n")
    return apply_overrides(load_toml(ROOT / "configs" / "tiny_test.toml"), [
        f"data.corpus={tmp / 'mixed.jsonl'}", "data.language_field=lang", "data.max_bytes=none",
        "data.vocab_size=400", "data.val_fraction=0.2", f"out_dir={tmp / 'runs'}", "train.eval_batches=2",
    ])


def test_per_language_losses_weigh_back_to_the_overall_loss(cfg):
    torch.manual_seed(0)
    comp = build_components(cfg, torch.device("cpu"))
    assert comp.val_langs is not None and sorted(set(comp.val_langs)) == ["en", "ru", "zh"]
    assert len(comp.val_langs) == len(comp.val_batches)
    dev = torch.device("cpu")
    rec = evaluate(comp.model, comp.val_batches, dev, langs=comp.val_langs)
    by_lang, tokens = rec["val_loss_by_lang"], rec["val_tokens_by_lang"]
    assert sum(tokens.values()) == rec["val_tokens"]
    weighted = sum(by_lang[lg] * tokens[lg] for lg in by_lang) / sum(tokens.values())
    assert weighted == pytest.approx(rec["val_loss"], rel=1e-6)
    assert rec["neg_log_perplexity_by_lang"] == {lg: -v for lg, v in by_lang.items()}
    # the overall loss means what it meant: the token mean over the same batches, with or without languages
    plain = evaluate(comp.model, comp.val_batches, dev)
    assert plain["val_loss"] == pytest.approx(rec["val_loss"], rel=1e-12) and "val_loss_by_lang" not in plain
    # each language's loss is that of its batches evaluated alone
    for lang in by_lang:
        alone = evaluate(comp.model, [b for b, lg in zip(comp.val_batches, comp.val_langs, strict=True)
                                      if lg == lang], dev)
        assert alone["val_loss"] == pytest.approx(by_lang[lang], rel=1e-6)
        assert alone["val_tokens"] == tokens[lang]
    with pytest.raises(ValueError, match="languages for"):
        evaluate(comp.model, comp.val_batches, dev, langs=comp.val_langs[:-1])


def test_language_speedups_interpolate_per_language():
    def rec(step, en, ru):
        return {"step": step, "val_loss": (en + ru) / 2, "val_loss_by_lang": {"en": en, "ru": ru}}

    dense = [rec(100, 5.0, 6.0), rec(200, 4.0, 5.0), rec(400, 3.0, 4.5)]
    switch = [rec(100, 4.0, 6.0), rec(200, 3.5, 5.5), rec(400, 2.5, 4.75)]
    out = language_speedups(switch, dense)
    # en: 3.0 reached between 200 (3.5) and 400 (2.5) -> step 300 -> 400/300; ru: never reaches 4.5
    assert out["en"]["switch_steps_to_dense_loss"] == pytest.approx(300.0)
    assert out["en"]["step_speedup"] == pytest.approx(4 / 3)
    assert out["ru"]["switch_steps_to_dense_loss"] is None and out["ru"]["step_speedup"] is None
    assert out["ru"]["dense_final_val_loss"] == 4.5 and out["ru"]["switch_final_val_loss"] == 4.75
    assert language_speedups(switch, [{"step": 1, "val_loss": 1.0}]) == {}


def test_train_and_compare_report_languages(cfg, tmp_path):
    torch.manual_seed(0)
    cfg = apply_overrides(cfg, [f"out_dir={tmp_path}", "train.steps=8", "train.eval_every=4", "name=ml"])
    lines: list[str] = []
    s = compare(cfg, out_dir=tmp_path / "cmp", print_fn=lines.append)
    evals = read_metrics(tmp_path / "cmp" / "ml", "eval")
    assert [r["step"] for r in evals] == [4, 8]
    assert all(sorted(r["val_loss_by_lang"]) == ["en", "ru", "zh"] for r in evals)
    assert sorted(s["by_language"]) == ["en", "ru", "zh"]
    dense_last = read_metrics(tmp_path / "cmp" / "ml-dense", "eval")[-1]["val_loss_by_lang"]
    assert {lg: v["dense_final_val_loss"] for lg, v in s["by_language"].items()} == dense_last
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["by_language"] == s["by_language"]
    text = format_summary(s)
    assert "per language" in text and all(f"  {lg}: dense" in text for lg in ("en", "ru", "zh"))
    assert any("per language" in line for line in lines)
    png = tmp_path / "cmp" / "compare_language_speedup.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
