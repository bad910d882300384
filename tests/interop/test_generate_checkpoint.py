"""``switchformer generate DIR_OR_HUB_ID`` on a transformers-format checkpoint, and ``load_checkpoint_tokenizer``.

The checkpoint is written here the way released ones are laid out: a tiny random transformers
SwitchTransformersForConditionalGeneration saved with ``save_pretrained`` (config.json, model.safetensors), a
SentencePiece model trained in the test with T5's special ids (pad 0, eos 1, unk 2, no bos) as ``spiece.model``, and
``tokenizer_config.json`` with ``extra_ids: 100``. The prompt's ids are rebuilt independently with sentencepiece and
T5's sentinel layout (``<extra_id_N>`` = pieces + 99 - N), and the generated text is compared with transformers'
own greedy generation from those ids.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import re
import shutil

import pytest
import torch
from interop_tiny import tiny_hf_model

spm = pytest.importorskip("sentencepiece", reason="the checkpoint tokenizer needs the [train] extra")

from switchformer.cli import main  # noqa: E402
from switchformer.data.tokenizer import load_checkpoint_tokenizer  # noqa: E402
from switchformer.errors import DataError  # noqa: E402
from switchformer.interop import hub  # noqa: E402
from switchformer.models import SwitchTransformer  # noqa: E402

PIECES = 200
VOCAB = 384  # PIECES + 100 sentinels, padded to a multiple of 128 as T5's 32100 -> 32128
PROMPT = "def parse(self, <extra_id_0>): return the <extra_id_1> value"
NEW_TOKENS = 6


def _train_spiece() -> bytes:
    """A unigram SentencePiece model with T5's special ids, trained on the source of a few stdlib modules."""
    lines = [ln for mod in (json.decoder, json.encoder, inspect) for ln in inspect.getsource(mod).splitlines()
             if ln.strip()][:1500]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, model_type="unigram",
                                   vocab_size=PIECES, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
                                   minloglevel=2)
    return out.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, transformers model) of a released-style checkpoint with its own spiece.model."""
    d = tmp_path_factory.mktemp("switch-tiny")
    hf = tiny_hf_model(0, vocab_size=VOCAB)
    hf.save_pretrained(d)
    (d / "spiece.model").write_bytes(_train_spiece())
    (d / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 100, "eos_token": "</s>", "pad_token": "<pad>",
                                                         "unk_token": "<unk>", "tokenizer_class": "T5Tokenizer"}))
    return d, hf


def _t5_ids(sp, text: str) -> list[int]:
    """T5's encoding, built from sentencepiece directly: pieces, <extra_id_N> -> PIECES + 99 - N, then EOS."""
    ids: list[int] = []
    for part in re.split(r"(<extra_id_\d+>)", text):
        m = re.fullmatch(r"<extra_id_(\d+)>", part)
        ids += [PIECES + 99 - int(m[1])] if m else sp.encode(part) if part else []
    return ids + [1]


def test_checkpoint_tokenizer_is_the_spiece_model_with_t5_sentinels(checkpoint):
    d, _ = checkpoint
    tok = load_checkpoint_tokenizer(d)
    sp = spm.SentencePieceProcessor(model_file=str(d / "spiece.model"))
    assert (tok.num_pieces, tok.num_sentinels, tok.vocab_size) == (PIECES, 100, PIECES + 100)
    assert tok.encode(PROMPT) + [tok.eos_id] == _t5_ids(sp, PROMPT)
    ids = tok.encode(PROMPT)
    assert tok.encode(tok.decode(ids)) == ids  # tokens round-trip, sentinels included
    plain = "def parse(self, text): return the value"
    assert tok.decode(tok.encode(plain)) == plain
    # T5's normalizer strips whitespace at segment edges, so the spaces beside a sentinel are not kept (as in
    # the released tokenizers); everything else comes back
    assert tok.decode(ids) == "def parse(self,<extra_id_0>): return the<extra_id_1>value"
    assert tok.sentinel_id(0) == PIECES + 99 and tok.decode([PIECES + 99]) == "<extra_id_0>"


def test_generate_from_a_checkpoint_directory(checkpoint, capsys, monkeypatch):
    """The CLI loads the weights with from_pretrained and the tokenizer from spiece.model; what it feeds the model
    is T5's encoding of the prompt, and what it prints is transformers' greedy continuation of the same ids."""
    d, hf = checkpoint
    seen = []
    real_generate = SwitchTransformer.generate

    def spy(self, input_ids, *args, **kwargs):
        seen.append(input_ids.tolist())
        return real_generate(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(SwitchTransformer, "generate", spy)
    assert main(["generate", str(d), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    printed = capsys.readouterr().out.rstrip("\n")

    sp = spm.SentencePieceProcessor(model_file=str(d / "spiece.model"))
    ids = _t5_ids(sp, PROMPT)
    assert seen == [[ids]]
    with torch.no_grad():  # transformers' greedy decoding, stopping at the generation config's EOS
        reference = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, 1:].tolist()
    reference = reference[: reference.index(1)] if 1 in reference else reference
    assert reference and printed == load_checkpoint_tokenizer(d).decode(reference)


def test_generate_from_a_hub_id_with_only_pickled_weights(checkpoint, tmp_path, capsys, monkeypatch, caplog):
    """A Hub id resolves (offline, through a stand-in for HfApi) to a snapshot holding config.json, spiece.model
    and only pytorch_model.bin: the pickle is read with the restricted loader, which the log says."""
    d, hf = checkpoint
    snap = tmp_path / "snapshot"
    shutil.copytree(d, snap)
    (snap / "model.safetensors").unlink()
    torch.save(hf.state_dict(), snap / "pytorch_model.bin")

    class OneRepo:  # the two HfApi calls a repo without conversion PRs needs
        def list_repo_files(self, repo_id, *, revision=None):
            return sorted(p.name for p in snap.iterdir())

        def get_repo_discussions(self, repo_id, *, author=None, discussion_type=None):
            return iter(())

        def snapshot_download(self, repo_id, *, revision=None, cache_dir=None, allow_patterns=None,
                              local_files_only=False):
            assert "pytorch_model*.bin" in allow_patterns
            return str(snap)

    monkeypatch.setattr(hub, "hub_api", OneRepo)
    with caplog.at_level(logging.WARNING, logger="switchformer.interop.hub"):
        assert main(["generate", "google/switch-tiny", "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    from_hub = capsys.readouterr().out
    assert "torch.load(weights_only=True" in caplog.text and "google/switch-tiny" in caplog.text
    assert main(["generate", str(d), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    assert from_hub == capsys.readouterr().out  # same weights, same tokenizer, same text


def test_generate_refuses_a_hostile_pickle_in_one_line(checkpoint, tmp_path, capsys):
    d, _ = checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    (bad / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (shutil.copy, (str(d / "config.json"), str(marker)))

    torch.save({"shared.weight": torch.zeros(2), "x": Payload()}, bad / "pytorch_model.bin")
    assert main(["generate", str(bad), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0] and "pytorch_model.bin" in err[0] and "shutil.copy" in err[0]
    assert not marker.exists()


def test_generate_names_what_is_missing(checkpoint, tmp_path, capsys):
    d, _ = checkpoint
    no_tok = tmp_path / "no-tok"
    shutil.copytree(d, no_tok)
    (no_tok / "spiece.model").unlink()
    assert main(["generate", str(no_tok), "--prompt", "x"]) == 2
    assert "has no spiece.model" in capsys.readouterr().err
    # an explicit --tokenizer stands in for the missing one
    assert main(["generate", str(no_tok), "--prompt", "x", "--tokenizer", str(d / "spiece.model"),
                 "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    (tmp_path / "runs").mkdir()
    assert main(["generate", str(tmp_path / "runs" / "typo"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("files, count", [
    ({}, 100),
    ({"tokenizer_config.json": {"extra_ids": 8}}, 8),
    ({"special_tokens_map.json": {"additional_special_tokens": [f"<extra_id_{i}>" for i in range(12)]}}, 12),
    ({"tokenizer_config.json": {"extra_special_tokens": ["<extra_id_0>", "<extra_id_4>"]}}, 5),
    ({"added_tokens.json": {f"<extra_id_{i}>": PIECES + 9 - i for i in range(10)}}, 10),
    ({"tokenizer.json": {"added_tokens": [{"id": PIECES + 2 - i, "content": f"<extra_id_{i}>"} for i in range(3)]}},
     3),
])
def test_sentinel_count_comes_from_the_tokenizer_files(checkpoint, tmp_path, files, count):
    d, _ = checkpoint
    (tmp_path / "spiece.model").write_bytes((d / "spiece.model").read_bytes())
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    tok = load_checkpoint_tokenizer(tmp_path)
    assert tok.num_sentinels == count and tok.vocab_size == PIECES + count


@pytest.mark.parametrize("files, needle", [
    ({"added_tokens.json": {"<extra_id_0>": PIECES, "<extra_id_1>": PIECES + 1}}, "do not match this spiece.model"),
    ({"config.json": {"vocab_size": PIECES + 50}}, "does not belong to this model"),
    ({"tokenizer_config.json": "{not json"}, "is not valid JSON"),
])
def test_inconsistent_tokenizer_files_are_named(checkpoint, tmp_path, files, needle):
    d, _ = checkpoint
    (tmp_path / "spiece.model").write_bytes((d / "spiece.model").read_bytes())
    for name, content in files.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError, match=needle):
        load_checkpoint_tokenizer(tmp_path)
