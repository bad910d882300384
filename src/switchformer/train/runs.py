"""Working with finished run directories: load the model + tokenizer, evaluate, generate.

A run directory (``runs/<name>/``) holds ``config.toml``, ``tokenizer/spiece.model``, ``metrics.jsonl``,
``checkpoints/step_XXXXXX/`` and ``plots/``. ``RUN_DIR`` arguments may also name one checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from switchformer import checkpoint as ck
from switchformer.config import RunConfig, load_toml
from switchformer.errors import RunError


@dataclass
class LoadedRun:
    """A run's config, model (eval mode) and tokenizer, and the checkpoint they came from."""

    cfg: RunConfig
    model: torch.nn.Module
    tokenizer: Any
    run_dir: Path
    checkpoint: Path
    step: int


def _split_run_path(path: Path) -> tuple[Path, Path | None]:
    """(run_dir, checkpoint_dir or None) for a run directory or a checkpoint directory inside one."""
    if (path / ck.STATE_FILE).is_file() and path.parent.name == "checkpoints":
        return path.parent.parent, path
    return path, None


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedRun:
    """Load the newest usable checkpoint of a run directory (or the given checkpoint directory).

    The tokenizer is None when the run's ``tokenizer/spiece.model`` is missing.

    Raises:
        RunError: not a run directory.
        CheckpointError: no usable checkpoint.
    """
    from switchformer.data.tokenizer import Tokenizer
    from switchformer.models import build_model

    run_dir, ckpt = _split_run_path(Path(path))
    if not (run_dir / "config.toml").is_file():
        raise RunError(f"{run_dir} is not a run directory (no config.toml); pass runs/<name>")
    cfg = load_toml(run_dir / "config.toml")
    model = build_model(cfg.model, init=False)
    if ckpt is None:
        loaded = ck.load_latest(run_dir, model, restore_rng=False)
    else:
        loaded = ck.load_checkpoint(ckpt, model, restore_rng=False)
    tok_file = run_dir / "tokenizer" / "spiece.model"
    tok = Tokenizer.from_file(tok_file, num_sentinels=cfg.data.num_sentinels) if tok_file.is_file() else None
    model.to(device).eval()
    return LoadedRun(cfg, model, tok, run_dir, loaded.path, loaded.step)


def eval_run(path: str | os.PathLike, batches: int | None = None, device: str = "cpu") -> dict:
    """Validation metrics of a run's newest checkpoint on its own validation split (re-read from the corpus).

    Args:
        path: run directory or checkpoint directory.
        batches: validation batches (default: the run's ``train.eval_batches``).
        device: where to run.

    Returns:
        The ``evaluate`` record plus ``step`` and ``checkpoint``.
    """
    from switchformer.data import load_corpus, make_loader
    from switchformer.train.loop import evaluate

    run = load_run(path, device)
    if run.tokenizer is None:
        raise RunError(f"{run.run_dir / 'tokenizer' / 'spiece.model'} is missing: evaluating a run needs the "
                       "tokenizer it was trained with; restore that file (train saves it when a run starts)")
    data_cfg = dataclasses.replace(run.cfg.data, tokenizer=str(run.run_dir / "tokenizer" / "spiece.model"))
    corpus = load_corpus(data_cfg)
    loader = make_loader(data_cfg, run.tokenizer, corpus.val_texts, run.cfg.train.batch_size, "val",
                         run.cfg.model.arch, cache_dir=run.run_dir.parent / ".cache")
    vb = list(loader.epoch_batches(batches or run.cfg.train.eval_batches))
    rec = evaluate(run.model, vb, torch.device(device), run.cfg.train.precision)
    rec.update({"step": run.step, "checkpoint": str(run.checkpoint)})
    return rec


def generate_text(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 40,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_beams: int = 1,
    seed: int = 0,
) -> str:
    """Generate a continuation of ``prompt`` (decoder-only) or the decoder output for ``prompt`` as encoder input
    (encoder-decoder; a span-corruption model fills ``<extra_id_N>`` sentinels in the prompt).

    Decoding stops at the tokenizer's EOS, and the text is decoded as T5's vocabulary (seqio) decodes: up to the
    first EOS, with ids the model has but the tokenizer lacks (the embedding's padding rows, e.g. 32100..32127 of the
    released checkpoints) read as ``<unk>``."""
    ids = tokenizer.encode(prompt)
    enc_dec = model.config.arch == "encoder_decoder"
    if enc_dec:
        ids = ids + [tokenizer.eos_id]  # T5 inputs end with EOS
    if not ids:
        raise ValueError("prompt is empty after tokenization; pass some text with --prompt")
    input_ids = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    gen = torch.Generator(device=input_ids.device).manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                             top_k=top_k, top_p=top_p, num_beams=num_beams, generator=gen,
                             eos_token_id=tokenizer.eos_id)
    out = out[0].tolist()
    out = out[len(ids) :] if not enc_dec else out  # decoder-only returns prompt + continuation
    if tokenizer.eos_id in out:
        out = out[: out.index(tokenizer.eos_id)]
    return tokenizer.decode([i if i < tokenizer.vocab_size else tokenizer.unk_id for i in out])
