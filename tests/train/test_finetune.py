"""switchformer finetune: the metrics against hand computations and independent implementations; the batches
against the model's own teacher forcing; a tiny pretrained model fine-tuned on stdlib-name beats the untuned model
on held-out functions; the best checkpoint reloads to the same predictions; exact resume; the paper's defaults,
router freezing and the capacity factor; a transformers-format source; one-line CLI errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from switchformer.config import apply_overrides, load_toml
from switchformer.train import task_metrics as tm
from switchformer.train.finetune import (
    BEST_DIR,
    RESULTS_JSON,
    RESULTS_MD,
    EncodedSplit,
    TaskLoader,
    collate,
    finetune,
    predict,
)
from switchformer.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_test.toml"

# --------------------------------------------------------------------------------------------------------------
# metrics


def test_exact_match_and_subtoken_f1_by_hand():
    assert tm.exact_match(["a", " b ", "c"], ["a", "b", "C"]) == pytest.approx(200 / 3)
    assert tm.subtokens("parseHTTPHeader_v2") == ["parse", "http", "header", "v", "2"]
    assert tm.subtoken_f1(["get_name"], ["getName"]) == 100.0
    assert tm.subtoken_f1(["get_value"], ["get_name"]) == 50.0  # precision 1/2, recall 1/2
    assert tm.subtoken_f1(["read_all_lines"], ["read_lines"]) == pytest.approx(100 * 0.8)  # P 2/3, R 1, F 0.8
    assert tm.subtoken_f1(["x", "_"], ["y", "__"]) == 50.0  # no sub-token on either side counts as a match


def test_rouge_by_hand_and_by_the_library():
    pred, ref = "the cat sat on the mat", "the cat is on the mat"
    scores = tm.compute(["rougeL", "rouge1", "rouge2"], [pred], [ref])
    # LCS "the cat on the mat" = 5 of 6 tokens each side; unigrams 5/6; bigrams 3 of 5 (the cat, on the, the mat)
    assert scores == pytest.approx({"rougeL": 500 / 6, "rouge1": 500 / 6, "rouge2": 60.0})
    from rouge_score import rouge_scorer

    pairs = [("Returns the running jobs.", "Return the jobs that run"), ("abc", "xyz"),
             ("Read a file.", "Read a file")]
    got = tm.rouge([p for p, _ in pairs], [r for _, r in pairs], ["rougeL"])["rougeL"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert got == pytest.approx(100 * np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs]))
    assert tm.rouge(["Returns the running jobs."], ["Return the jobs that run"])["rougeL"] == pytest.approx(
        100 * 2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))  # stemmed: return the job (run), 3 of 4 and 3 of 5


def test_bleu_equals_an_independent_implementation():
    from nltk.translate.bleu_score import corpus_bleu

    preds = ["the cat sat on the mat today", "a quick brown fox jumps over the lazy dog"]
    refs = ["the cat is on the mat today", "the quick brown fox jumped over the lazy dog"]
    expected = 100 * corpus_bleu([[r.split()] for r in refs], [p.split() for p in preds])
    assert tm.bleu(preds, refs) == pytest.approx(expected, rel=1e-9)
    assert tm.bleu(refs, refs) == pytest.approx(100.0)


def test_missing_metric_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)
    with pytest.raises(ModuleNotFoundError, match=r"rouge-score.*pip install 'switchformer\[finetune\]'"):
        tm.compute(["rougeL"], ["a"], ["a"])
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        tm.require(["f1"])


# --------------------------------------------------------------------------------------------------------------
# batches and the loader


def _split(n: int, seed: int = 0) -> EncodedSplit:
    rng = np.random.default_rng(seed)
    inputs = [rng.integers(3, 60, rng.integers(2, 9)).astype(np.int64) for _ in range(n)]
    targets = [np.append(rng.integers(3, 60, rng.integers(1, 5)), 1).astype(np.int64) for _ in range(n)]
    return EncodedSplit(inputs, targets, ["" for _ in range(n)])


def test_collate_matches_the_models_teacher_forcing():
    from switchformer.models import build_model

    cfg = apply_overrides(load_toml(TINY), ["model.vocab_size=128"]).model
    model = build_model(cfg).eval()
    split = _split(5)
    batch = collate(split.inputs, split.targets, pad_id=0, decoder_start_id=cfg.decoder_start_token_id)
    assert (batch["labels"][batch["decoder_attention_mask"] == 0] == -100).all()
    with torch.no_grad():
        ours = model(**batch).lm_loss
        # the model shifts the labels itself when no decoder inputs are given
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).lm_loss
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_loader_resumes_exactly_and_visits_every_example_per_epoch():
    split = _split(10)
    a = TaskLoader(split, batch_size=4, seed=3, pad_id=0, decoder_start_id=0)
    first = [next(a) for _ in range(5)]  # 20 examples: two epochs
    seen = [tuple(r[r != 0].tolist()) for b in first[:3] for r in b["input_ids"]][:10]
    assert sorted(seen) == sorted(tuple(x.tolist()) for x in split.inputs)  # epoch 1 is a permutation
    b = TaskLoader(split, batch_size=4, seed=3, pad_id=0, decoder_start_id=0)
    next(b)
    state = json.loads(json.dumps(b.state_dict()))
    c = TaskLoader(split, batch_size=4, seed=3, pad_id=0, decoder_start_id=0)
    c.load_state_dict(state)
    for want in first[1:]:
        got = next(c)
        assert all(torch.equal(want[k], got[k]) for k in want)
    other = TaskLoader(_split(10, seed=1), batch_size=4, seed=3, pad_id=0, decoder_start_id=0)
    with pytest.raises(Exception, match="other task data"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------------------------------------------
# fine-tuning runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def pretrained(runs):
    """A tiny Switch model pretrained for 30 steps (span corruption on the stdlib corpus)."""
    cfg = apply_overrides(load_toml(TINY), [f"out_dir={runs}", "name=pre", "train.steps=30", "train.eval_every=30",
                                            "train.checkpoint_every=30", "train.num_threads=1"])
    return train(cfg, run_dir=runs / "pre", print_fn=lambda s: None).run_dir


FT = ["finetune.max_bytes=450000", "finetune.val_fraction=0.1", "finetune.input_length=64",
      "finetune.target_length=16", "finetune.eval_examples=16", "finetune.test_examples=16", "train.batch_size=16",
      "train.num_threads=1", "train.log_every=5", "optim.lr=0.01"]


@pytest.fixture(scope="module")
def tuned(pretrained, runs):
    return finetune(str(pretrained), "stdlib-name", [*FT, "train.steps=30", "train.eval_every=15",
                                                     "train.checkpoint_every=15"],
                    run_dir=runs / "tuned", print_fn=lambda s: None)


def test_finetuning_beats_the_untuned_model_on_held_out_functions(tuned):
    r = tuned.results
    untuned, last = r["untuned"], r["last"]
    assert untuned["step"] == 0 and last["step"] == 30 and [e["step"] for e in r["evals"]] == [0, 15, 30]
    # exact match stays 0 at this size; the held-out loss and the token-level accuracy must move clearly
    assert last["val_loss"] < untuned["val_loss"] - 0.5, (untuned, last)
    assert last["token_accuracy"] > untuned["token_accuracy"] + 3.0, (untuned, last)
    assert r["sizes"]["validation"] > 0 and r["eval_examples"] == 16 and r["test"]["examples"] == 16


def test_run_config_has_the_papers_finetuning_defaults(tuned, pretrained):
    cfg = load_toml(tuned.run_dir / "config.toml")
    assert cfg.model.dropout_rate == 0.1 and cfg.model.moe.expert_dropout == 0.4  # paper §4.1, §2.4
    assert cfg.optim.schedule == "constant" and cfg.optim.lr == 0.01  # the override wins over the 1e-3 default
    src = load_toml(pretrained / "config.toml")
    assert cfg.model.aux_loss_coef == src.model.aux_loss_coef  # load balancing as in pretraining
    assert cfg.finetune.source == str(pretrained) and cfg.finetune.task == "stdlib-name"


def test_best_checkpoint_reloads_to_its_predictions(tuned):
    from switchformer.data.tokenizer import load_checkpoint_tokenizer
    from switchformer.interop import from_pretrained

    r, best_dir = tuned.results, tuned.run_dir / BEST_DIR
    best = json.loads((best_dir / "best.json").read_text())
    evals = r["evals"]
    top = max((e["exact_match"], -e["val_loss"]) for e in evals)  # the metric, ties broken by the lower loss
    assert (best["exact_match"], -best["val_loss"]) == top and best["step"] > 0
    assert r["best"]["step"] == best["step"]
    model = from_pretrained(best_dir)
    tok = load_checkpoint_tokenizer(best_dir)
    saved = [json.loads(line) for line in (best_dir / "predictions_validation.jsonl").read_text().splitlines()]
    from switchformer.data.tasks import load_task

    cfg = load_toml(tuned.run_dir / "config.toml")
    examples = load_task(cfg.finetune).splits["validation"][:16]
    assert [s["id"] for s in saved] == [e.id for e in examples]
    from switchformer.train.finetune import encode_split

    split = encode_split(tok, examples, cfg.finetune.input_length, cfg.finetune.target_length)
    preds = predict(model, tok, split.inputs, batch_size=16, max_new_tokens=16, device=torch.device("cpu"))
    assert preds == [s["prediction"] for s in saved]
    table = (tuned.run_dir / RESULTS_MD).read_text()
    assert "| untuned (validation) | 0 |" in table and "best (test, 16 examples)" in table
    assert json.loads((tuned.run_dir / RESULTS_JSON).read_text()) == r


def test_resume_continues_exactly(tuned, pretrained, runs):
    common = [*FT, "train.eval_every=15", "train.checkpoint_every=15"]
    first = finetune(str(pretrained), "stdlib-name", [*common, "train.steps=15"], run_dir=runs / "resumed",
                     print_fn=lambda s: None)
    assert first.results["last"]["step"] == 15
    again = finetune(overrides=["train.steps=30"], resume=True, run_dir=runs / "resumed", print_fn=lambda s: None)
    def scores(results):
        return [{k: v for k, v in e.items() if k != "train_seconds"} for e in results["evals"]]

    assert scores(again.results) == scores(tuned.results)  # val loss, token accuracy and metrics at 0, 15, 30
    a = (tuned.run_dir / BEST_DIR / "model.safetensors").read_bytes()
    b = (runs / "resumed" / BEST_DIR / "model.safetensors").read_bytes()
    assert a == b


def test_freeze_router_and_capacity_factor(pretrained, runs):
    from switchformer.checkpoint import load_latest
    from switchformer.models import build_model

    res = finetune(str(pretrained), "stdlib-name",
                   [*FT, "train.steps=3", "finetune.eval_at_start=false", "finetune.freeze_router=true",
                    "model.moe.capacity_factor=2.0"], run_dir=runs / "frozen", print_fn=lambda s: None)
    cfg = load_toml(res.run_dir / "config.toml")
    assert cfg.model.moe.capacity_factor == 2.0 and cfg.finetune.freeze_router
    before = build_model(load_toml(pretrained / "config.toml").model, init=False)
    load_latest(pretrained, before, restore_rng=False)
    after = build_model(cfg.model, init=False)
    load_latest(res.run_dir, after, restore_rng=False)
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    routers = [n for n in a if n.endswith("router.weight")]
    assert routers and all(torch.equal(a[n], b[n]) for n in routers)
    assert not torch.equal(a["shared.weight"], b["shared.weight"])  # the rest trains
    assert after.encoder.block[1].layer[1].mlp.capacity_factor == 2.0


def test_finetune_from_a_transformers_format_directory(tuned, runs):
    """The best directory (save_pretrained + spiece.model) is itself a source, like a released checkpoint."""
    res = finetune(str(tuned.run_dir / BEST_DIR), "stdlib-name",
                   [*FT, "train.steps=2", "finetune.eval_at_start=false", f"out_dir={runs}"],
                   print_fn=lambda s: None)
    assert res.run_dir.name == "best-stdlib-name" and res.results["last"]["step"] == 2


# --------------------------------------------------------------------------------------------------------------
# command-line errors: one line, exit status 2


def _cli(argv, capsys):
    from switchformer.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("argv,needle", [
    (["finetune", "--task", "stdlib-name"], "finetune needs SOURCE"),
    (["finetune", "SRC"], "finetune needs --task"),
    (["finetune", "/no/such/run", "--task", "stdlib-name"], "/no/such/run"),
    (["finetune", "SRC", "--task", "no-such-task"], "not a built-in task"),
    (["finetune", "SRC", "--task", "DATA", "finetune.input_field=question"], "no field 'question'"),
    (["finetune", "SRC", "--task", "stdlib-name", "finetune.metric=f1"], "finetune.metric"),
])
def test_cli_errors_are_one_line(argv, needle, pretrained, runs, capsys):
    data = runs / "data.jsonl"
    data.write_text('{"input": "a", "target": "b"}\n')
    argv = [str(pretrained) if a == "SRC" else str(data) if a == "DATA" else a for a in argv]
    code, err = _cli([*argv, f"out_dir={runs}", "finetune.max_bytes=120000"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("switchformer finetune: error:"), err
    assert needle in err


def test_cli_missing_extra_fails_before_loading(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)
    code, err = _cli(["finetune", "/no/such/run", "--task", "stdlib-docstring"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'switchformer[finetune]'" in err


def test_cli_help(capsys):
    from switchformer.cli import main

    with pytest.raises(SystemExit) as e:
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: switchformer finetune")
    assert "--task" in out and "--resume" in out and "paper §2.4, §4.1" in out
