"""The switchformer command: --help everywhere, config errors, one-line user errors (--debug for the traceback),
--resume forms, and an end-to-end train -> eval -> generate -> plot on the tiny recipe."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from switchformer.cli import build_config, main, make_parser

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["train", "compare", "eval", "generate", "plot", "info"]


@pytest.mark.parametrize("cmd", [[], *[[c] for c in SUBCOMMANDS]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: switchformer")
    for c in SUBCOMMANDS if not cmd else []:
        assert c in out


@pytest.mark.parametrize("command", [["{bin}/switchformer"], ["{python}", "-m", "switchformer"]])
def test_console_script_help(command):
    command = [c.format(bin=Path(sys.executable).parent, python=sys.executable) for c in command]
    out = subprocess.run([*command, "train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--decoder-only" in out and "--resume" in out and "--debug" in out


def test_default_and_decoder_recipes():
    cfg = build_config(None, [])
    assert cfg.model.arch == "encoder_decoder" and cfg.data.objective == "span_corruption"
    assert cfg.model.moe.num_experts >= 8
    dec = build_config(None, ["train.steps=7"], decoder_only=True)
    assert dec.model.arch == "decoder_only" and dec.data.objective == "causal_lm" and dec.train.steps == 7


def test_bad_override_is_an_error_listing_keys(capsys):
    assert main(["train", "model.moe.num_expert=16"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'model.moe.num_expert'" in err and "model.moe.num_experts" in err
    assert main(["train", "train.steps=many"]) == 2
    assert "train.steps" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    names = capsys.readouterr().out.split()
    assert "switch-base-8" in names
    assert main(["info", "switch-base-8"]) == 0
    assert capsys.readouterr().out.strip()


def test_train_eval_generate_plot(tmp_path, capsys):
    tiny = str(ROOT / "configs" / "tiny_test.toml")
    assert main(["train", tiny, f"out_dir={tmp_path}", "name=cli", "train.steps=4", "train.num_threads=1"]) == 0
    run = tmp_path / "cli"
    assert "val loss" in capsys.readouterr().out
    assert main(["eval", str(run), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in last if r["kind"] == "eval"][-1]
    assert rec["step"] == 4 and rec["val_loss"] == pytest.approx(last_eval["val_loss"], rel=1e-6)
    assert main(["generate", str(run), "--prompt", "def f(x): <extra_id_0>", "--max-new-tokens", "5"]) == 0
    assert main(["plot", str(run), str(run), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "loss_by_step.png").stat().st_size > 1000
    # a second run with the same name does not overwrite the first
    assert main(["train", tiny, f"out_dir={tmp_path}", "name=cli", "train.steps=1", "train.num_threads=1"]) == 0
    assert (tmp_path / "cli-2" / "metrics.jsonl").is_file()


def test_parser_resume_forms():
    p = make_parser()
    assert p.parse_args(["train", "--resume"]).resume is True
    assert p.parse_args(["train", "--resume", "runs/x"]).resume == "runs/x"
    assert p.parse_args(["train"]).resume is False


def test_decoder_only_flag_with_overrides_after_it(tmp_path, capsys):
    tiny = str(ROOT / "configs" / "tiny_test.toml")
    assert main(["train", tiny, "--decoder-only", f"out_dir={tmp_path}", "name=dec", "train.steps=2",
                 "train.num_threads=1"]) == 0
    cfg_text = (tmp_path / "dec" / "config.toml").read_text()
    assert 'arch = "decoder_only"' in cfg_text and 'objective = "causal_lm"' in cfg_text
    assert main(["generate", str(tmp_path / "dec"), "--prompt", "import os", "--max-new-tokens", "3"]) == 0
    with pytest.raises(SystemExit):
        main(["train", "--no-such-flag"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step tiny run (its out_dir also caches the tokenizer for the other runs of this module)."""
    out = tmp_path_factory.mktemp("runs")
    tiny = str(ROOT / "configs" / "tiny_test.toml")
    assert main(["train", tiny, f"out_dir={out}", "name=base", "train.steps=2", "train.num_threads=1"]) == 0
    return out / "base"


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("switchformer ") and ": error: " in lines[0], err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["train", "train.log_every=0"], ["train.log_every = 0", "e.g. train.log_every=10"]),
        (["train", "model.num_heads=0"], ["model.num_heads"]),
        (["train", "--config", "no-such-recipe"], ["config 'no-such-recipe' not found"]),
        (["eval", "{tmp}/nowhere"], ["is not a run directory"]),
        (["generate", "--prompt", "x"], ["generate needs RUN_DIR, --model-dir or --preset"]),
        (["generate", "--preset", "tiny", "--prompt", "x", "--tokenizer", "{tmp}/none.model"],
         ["does not exist"]),
        (["train", "--resume", "{tmp}"], ["is not a run directory"]),
        (["plot", "{tmp}/nowhere"], ["nowhere"]),
        (["train", "{tmp}/bad.toml"], ["not valid TOML"]),
    ],
)
def test_user_errors_print_one_line_and_exit_2(argv, needles, tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("[train\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    _one_error_line(capsys, *needles)


def test_debug_shows_the_traceback(capsys):
    from switchformer.errors import ConfigError

    for argv in (["--debug", "train", "train.log_every=0"], ["train", "train.log_every=0", "--debug"]):
        with pytest.raises(ConfigError, match="train.log_every"):
            main(argv)
    assert main(["train", "train.log_every=0"]) == 2  # without the flag: one line
    _one_error_line(capsys, "train.log_every")


def test_dense_baseline_flag_is_gone():
    with pytest.raises(SystemExit):
        main(["train", "--dense-baseline"])


def test_resume_followed_by_an_override(trained, capsys):
    """``--resume train.steps=3`` resumes runs/<name> with the override; it is not taken as the run directory."""
    tiny = str(ROOT / "configs" / "tiny_test.toml")
    capsys.readouterr()
    argv = ["train", tiny, f"out_dir={trained.parent}", "name=base", "train.num_threads=1", "--resume"]
    assert main([*argv, "train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "stopped at step 3: finished all 3 steps" in out
    assert main(["train", "--resume", str(trained), "train.steps=4", "train.num_threads=1"]) == 0
    assert "stopped at step 4" in capsys.readouterr().out


def test_rejected_resume_keeps_the_run(trained, capsys):
    before = (trained / "config.toml").read_bytes()
    assert main(["train", "--resume", str(trained), "model.moe.num_experts=8", "train.num_threads=1"]) == 2
    _one_error_line(capsys, f"cannot resume {trained} with model.moe.num_experts=8 (the run has 4)")
    assert (trained / "config.toml").read_bytes() == before
    assert main(["eval", str(trained)]) == 0  # the run still works


def test_eval_without_the_tokenizer_is_a_clear_error(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "tokenizer")
    assert main(["eval", str(run)]) == 2
    _one_error_line(capsys, "tokenizer", "spiece.model is missing")
