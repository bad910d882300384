"""The training loop: build everything from a RunConfig, then train, evaluate, checkpoint and log.

``train(cfg)`` is a short, flat loop over the named steps of a ``Trainer`` (no callbacks):

1. ``build_components``: corpus -> tokenizer (trained and cached under ``<out_dir>/.cache``) -> model (vocabulary
   from the tokenizer, rounded up to a multiple of 128) -> loaders; the ``Trainer`` adds the optimizer (Adafactor
   and the T5X rsqrt schedule by default, paper §3). ``--resume`` restores the newest usable checkpoint *before*
   anything is written, so a rejected resume leaves the run as it was;
2. ``Trainer.train_step``: ``grad_accum`` micro-batches (the model's ``out.loss`` = LM loss + alpha * aux, paper
   §2.2, Eq. 4), a finiteness check (a non-finite loss or gradient stops the run naming the step and the first
   module whose output is non-finite, or skips the step under ``train.skip_nonfinite``), gradient clipping, the
   scheduled learning rate, the update;
3. ``Trainer.log`` every ``log_every`` steps (and at each checkpoint); ``Trainer.evaluate`` every ``eval_every``
   steps: validation loss and negative log perplexity (nats, the paper's metric), per-layer tokens per expert,
   dropped fraction, router entropy; ``Trainer.save`` every ``checkpoint_every`` steps, an atomic checkpoint;
4. the run stops after ``train.steps`` steps or when this invocation has trained ``train.max_minutes``; the
   console says which (``Trainer.finish``).

Exact resume: the checkpoint holds weights, optimizer, RNG states and the data-loader position, and evaluation
runs under a forked RNG, so a run killed at any point and resumed from its last checkpoint logs the same numbers as
one that was never interrupted.

On several processes (``switchformer train --nproc N``, or torchrun) the same loop runs on every rank through the
hooks of a run layout (``switchformer.train.parallel``): each rank trains on its rows of every global batch, the
losses and gradients are those of the global batch, and rank 0 alone writes the run directory and the console.

Run it: ``switchformer train`` (configs/default.toml), or ``python -c "from switchformer.train.loop import train;
from switchformer.config import load_toml; train(load_toml('configs/tiny_test.toml'))"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from switchformer import checkpoint as ck
from switchformer.config import IGNORE_INDEX, ModelConfig, RunConfig, load_toml, round_vocab, to_toml
from switchformer.errors import CheckpointError, ConfigError, DataError, RunError, SwitchformerError
from switchformer.metrics import (
    MetricsLogger,
    RouterEntropyProbe,
    RouterStats,
    batch_tokens,
    read_metrics,
    truncate_metrics,
)
from switchformer.train.optim import lr_at, set_lr
from switchformer.train.parallel import SingleProcess, describe, setup

KILL_AFTER_STEP_ENV = "SWITCHFORMER_TEST_KILL_AFTER_STEP"
"""Test hook: set to N, the training process SIGKILLs itself after step N's log and eval records are written and
before its checkpoint is saved: the crash an exact resume must survive, at a step a test chooses."""
KILL_RANK_ENV = "SWITCHFORMER_TEST_KILL_RANK"
"""Test hook for runs on several processes: only this rank kills itself (default: every rank)."""

TRAIN_EXTRA = "pip install 'switchformer[train]'"


class NonFiniteLossError(SwitchformerError, FloatingPointError):
    """The loss (or gradient) became NaN/inf; the message names the step and the first offending module."""


@dataclass
class Components:
    """What a run is built from (``build_components``); tests may substitute small stand-ins."""

    model: torch.nn.Module
    model_cfg: ModelConfig
    tokenizer: Any
    train_loader: Any
    val_batches: list[dict[str, torch.Tensor]]
    corpus_summary: str = ""
    val_langs: list[str] | None = None
    """Language of each validation batch (a multilingual corpus), else None."""


@dataclass
class TrainResult:
    """Outcome of ``train``: the run directory, last step, final eval record, the eval history, the total training
    time (all invocations) and why the run stopped."""

    run_dir: Path
    step: int
    final_eval: dict
    evals: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    stop_reason: str = ""


@dataclass
class TrainState:
    """The counters a checkpoint carries from one invocation to the next."""

    step: int = 0
    """Optimizer steps done (skipped non-finite steps count)."""
    train_seconds: float = 0.0
    """Training wall time over every invocation (evaluation and checkpointing excluded)."""
    tokens_seen: int = 0
    """Real tokens processed (encoder plus decoder)."""
    skipped: int = 0
    """Steps skipped for a non-finite loss or gradient (``train.skip_nonfinite``)."""


@dataclass
class StepOutcome:
    """What one ``Trainer.train_step`` did."""

    loss: float
    """Training loss (with the auxiliary losses), mean over the micro-batches."""
    lm_loss: float
    """Language-model loss alone."""
    grad_norm: float
    """Global gradient norm before clipping (NaN when the loss was non-finite)."""
    seconds: float
    """Wall time of the step."""
    nonfinite: str | None = None
    """'loss' or 'gradient' when the update was skipped, else None."""


@dataclass
class LogWindow:
    """Training metrics accumulated between two 'train' records."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss: float = 0.0
    lm_loss: float = 0.0
    finite_steps: int = 0
    """Steps whose loss was finite: the ones ``loss`` and ``lm_loss`` sum over."""
    router: RouterStats = field(default_factory=RouterStats)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"train.device = {name!r} is not a device ({e}); use 'auto', 'cpu' or 'cuda[:N]'") from None


def build_components(cfg: RunConfig, device: torch.device) -> Components:
    """Corpus, tokenizer, model and loaders for ``cfg`` (the model is initialised from ``cfg.train.seed``)."""
    from switchformer.data import get_tokenizer, load_corpus, make_loader
    from switchformer.models import build_model

    corpus = load_corpus(cfg.data)
    cache = Path(cfg.out_dir) / ".cache"
    tok = get_tokenizer(cfg.data, corpus, cache)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=round_vocab(tok.vocab_size))
    torch.manual_seed(cfg.train.seed)
    model = build_model(model_cfg).to(device)
    bs, arch = cfg.train.batch_size, model_cfg.arch
    train_loader = make_loader(cfg.data, tok, corpus.train_texts, bs, "train", arch, cache_dir=cache)
    val_langs = None
    if getattr(corpus, "val_langs", None):  # multilingual: up to eval_batches batches of every language
        from switchformer.data.multilingual import language_val_batches

        val_batches, val_langs = language_val_batches(cfg.data, tok, corpus, bs, arch, cache_dir=cache,
                                                      max_batches=cfg.train.eval_batches)
    else:
        val_loader = make_loader(cfg.data, tok, corpus.val_texts, bs, "val", arch, cache_dir=cache)
        # the same fixed batches at every evaluation (the start of the validation split)
        val_batches = list(val_loader.epoch_batches(cfg.train.eval_batches))
    if not val_batches:
        raise DataError("the validation split produced no batch: raise data.val_fraction or use a larger corpus")
    summary = corpus.summary() if hasattr(corpus, "summary") else ""
    return Components(model, model_cfg, tok, train_loader, val_batches, summary, val_langs)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _autocast(device: torch.device, precision: str):
    if precision == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _iter_forever(loader) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``loader`` epoch after epoch (the loader's own state says where it is)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("the training loader produced no batch: the corpus is too small for one batch")


def _nonfinite(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_floating_point() and not bool(torch.isfinite(x).all())
    if isinstance(x, (list, tuple)):
        return any(_nonfinite(v) for v in x)
    if isinstance(x, dict):
        return any(_nonfinite(v) for v in x.values())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return any(_nonfinite(getattr(x, f.name)) for f in dataclasses.fields(x))
    return False


def first_nonfinite_module(model: torch.nn.Module, run: Callable[[], Any]) -> str | None:
    """Run ``run()`` with forward hooks on every submodule; return the name (and class) of the first module, in
    execution order, whose output holds a NaN/inf, or None when every module output is finite.

    A parent's hook fires after its children's, so the first hit is the innermost module where it appeared.
    """
    hits: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod, args, output, name=name):
            if not hits and _nonfinite(output):
                hits.append(f"{name} ({type(mod).__name__})")

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return hits[0] if hits else None


def routed_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Any, tuple[float, int]]:
    """``model(**batch)`` and its router entropy ``(sum, real-token rows)``: the one measurement that training
    logs and evaluation share (see ``switchformer.metrics``)."""
    with RouterEntropyProbe(model) as probe:
        out = model(**batch)
    return out, probe.sums()


def lm_nll(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token negative log-likelihood of ``batch``'s real labels (-100 ignored), in float32 or the
    logits' wider dtype (float64 verification runs stay exact)."""
    labels = batch["labels"]
    if "decoder_input_ids" not in batch:  # decoder-only: labels align with input_ids; position t predicts t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(dtype).reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def label_count(batch: dict[str, torch.Tensor]) -> int:
    """Real labels of ``batch`` that ``lm_nll`` counts."""
    labels = batch["labels"] if "decoder_input_ids" in batch else batch["labels"][:, 1:]
    return int((labels != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device, precision: str = "float32",
    layout: SingleProcess | None = None, langs: list[str] | None = None,
) -> dict:
    """Validation metrics over ``batches`` (eval mode: no jitter/dropout, eval capacity factor). On several
    processes (``layout``) each rank evaluates its rows of every batch and the sums are all-reduced.

    ``langs`` (the language of each batch, a multilingual corpus) adds the same loss per language; the overall
    val_loss stays the mean over every validation token, i.e. the token-weighted mean of the languages' losses.

    Returns:
        dict with val_loss (nats per target token), neg_log_perplexity (= -val_loss, paper §3, footnote 4),
        val_ppl, drop_fraction, router_entropy, load_entropy, tokens_per_expert {layer: [E]}; with ``langs``
        also val_loss_by_lang, neg_log_perplexity_by_lang and val_tokens_by_lang ({language: value}).
    """
    if langs is not None and len(langs) != len(batches):
        raise ValueError(f"evaluate: {len(langs)} languages for {len(batches)} batches")
    layout = layout or SingleProcess(device)
    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64)
    n_tokens = 0
    stats = RouterStats()
    lang_names = sorted(set(langs)) if langs is not None else []
    lang_nll, lang_tokens = [0.0] * len(lang_names), [0] * len(lang_names)
    # fork the RNG so evaluating never shifts the training random stream (exact resume)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, batch in enumerate(batches):
            batch = _to(layout.local(batch), device)
            with _autocast(device, precision):
                out, entropy = routed_forward(model, batch)
            nll = lm_nll(out.logits, batch).double().cpu()
            nll_sum += nll
            n_tokens += label_count(batch)
            if langs is not None:
                j = lang_names.index(langs[i])
                lang_nll[j] += float(nll)
                lang_tokens[j] += label_count(batch)
            stats.add(getattr(out, "router", None), entropy)
    model.train(was_training)
    nll_total, n_tokens, *per_lang = layout.sum([float(nll_sum), n_tokens, *lang_nll, *lang_tokens])
    n_tokens = int(n_tokens)
    stats = layout.reduce_router(stats)
    val_loss = nll_total / max(n_tokens, 1)
    rec = {"val_loss": val_loss, "neg_log_perplexity": -val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
    rec["val_tokens"] = n_tokens
    if lang_names:
        nlls, counts = per_lang[: len(lang_names)], per_lang[len(lang_names):]
        losses = {lg: nll / max(int(c), 1) for lg, nll, c in zip(lang_names, nlls, counts, strict=True)}
        rec["val_loss_by_lang"] = losses
        rec["neg_log_perplexity_by_lang"] = {lg: -v for lg, v in losses.items()}
        rec["val_tokens_by_lang"] = {lg: int(c) for lg, c in zip(lang_names, counts, strict=True)}
    rec.update(stats.summary())
    return rec


def _unique_run_dir(cfg: RunConfig) -> Path:
    """``out_dir/name``, or ``name-2``, ``name-3``... when that already holds a run (without --resume)."""
    base = Path(cfg.out_dir) / cfg.name
    if not (base / "metrics.jsonl").exists() and not (base / "checkpoints").exists():
        return base
    i = 2
    while (Path(cfg.out_dir) / f"{cfg.name}-{i}").exists():
        i += 1
    return Path(cfg.out_dir) / f"{cfg.name}-{i}"


def _progress_bar(total: int, initial: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ModuleNotFoundError(f"the progress bar needs tqdm: {TRAIN_EXTRA} (or train.progress=false)") from None
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


class Trainer:
    """One run's model, optimizer, data and counters, and the named steps of the training loop.

    ``train`` drives it on one process or on every rank of a distributed run (``layout``: the hooks that take a
    rank's rows, reduce gradients and metrics, and checkpoint; ``switchformer.train.parallel``). Nothing is written
    to the run directory before ``start``, and only by the main rank.
    """

    def __init__(self, cfg: RunConfig, comp: Components, run_dir: Path, device: torch.device,
                 print_fn: Callable[[str], None] = print, layout: SingleProcess | None = None) -> None:
        self.cfg, self.tc, self.comp = cfg, cfg.train, comp
        self.run_dir, self.device, self.print_fn = Path(run_dir), device, print_fn
        self.layout = layout or SingleProcess(device)
        self.model = comp.model
        self.optimizer = self.layout.build_optimizer(comp.model, cfg.optim)
        self.run_cfg = dataclasses.replace(cfg, model=comp.model_cfg)
        self.state = TrainState()
        self.evals: list[dict] = []
        self.window = LogWindow()
        self.session_seconds = 0.0  # training time of this invocation: what train.max_minutes limits
        self.grad_norm = float("nan")
        self.logger: MetricsLogger | _NullLogger | None = None
        self.bar = None
        self.resumed_from: Path | None = None
        self._batches = _iter_forever(comp.train_loader)

    @property
    def last_eval(self) -> dict:
        return self.evals[-1] if self.evals else {}

    def say(self, text: str) -> None:
        (self.bar.write if self.bar is not None else self.print_fn)(text)

    def restore(self) -> None:
        """Load the newest usable checkpoint: weights, optimizer, RNG states, data position and counters. Writes
        nothing, so a checkpoint that does not fit this config leaves the run untouched.

        Raises:
            RunError: no checkpoint fits the model of this config (the message names the model settings that
                differ from the run's).
        """
        changed = _model_changes(self.run_dir / "config.toml", self.comp.model_cfg)
        with warnings.catch_warnings(record=True) as skipped:  # checkpoints load_latest fell back from
            warnings.simplefilter("always")
            try:
                path, step, s = self.layout.load_checkpoint(self.run_dir, self.model, self.optimizer, self.tc.seed,
                                                            self.print_fn)
            except CheckpointError as e:
                if not ck.list_checkpoints(self.run_dir):
                    raise RunError(f"{self.run_dir} has no checkpoint to resume from; train it without "
                                   "--resume") from e
                if changed:
                    raise RunError(f"cannot resume {self.run_dir} with {', '.join(changed)}: its checkpoints hold "
                                   "the run's model; resume with the model settings of its config.toml") from e
                raise RunError(f"cannot resume {self.run_dir}: {e}") from e
        for w in skipped:
            self.print_fn(f"warning: {w.message}")
        self.state = TrainState(step=step, train_seconds=float(s.get("train_seconds", 0.0)),
                                tokens_seen=int(s.get("tokens_seen", 0)), skipped=int(s.get("skipped_steps", 0)))
        if s.get("data") is not None and hasattr(self.comp.train_loader, "load_state_dict"):
            self.comp.train_loader.load_state_dict(s["data"])
        self.resumed_from = path

    def start(self, setup_seconds: float = 0.0) -> None:
        """Write the run's config and tokenizer, clean up after a kill, and open the metrics log (the main rank;
        the others only log nothing)."""
        self.model.train()
        if not self.layout.is_main:
            self.logger = _NullLogger()
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        removed = ck.clean_incomplete(self.run_dir)
        if removed:
            self.print_fn(f"removed {len(removed)} incomplete checkpoint write(s) left by an interrupted run")
        ck.write_text_atomic(self.run_dir / "config.toml", to_toml(self.run_cfg))
        if self.comp.tokenizer is not None and hasattr(self.comp.tokenizer, "save"):
            self.comp.tokenizer.save(self.run_dir / "tokenizer")
        n_params = sum(p.numel() for p in self.model.parameters())
        mc = self.comp.model_cfg
        kind = f"Switch, {mc.moe.num_experts} experts" if mc.is_sparse else "dense"
        where = describe(self.layout)
        self.print_fn(f"run {self.run_dir}: {mc.arch} ({kind}), {n_params / 1e6:.2f}M parameters, vocab "
                      f"{mc.vocab_size}{'; ' + where if where else ''}; setup {setup_seconds:.0f}s")
        if self.resumed_from is not None:
            truncate_metrics(self.run_dir, self.state.step)  # records written after the checkpoint
            self.evals = read_metrics(self.run_dir, "eval")
            self.print_fn(f"resumed from {self.resumed_from} (step {self.state.step})")
        self.logger = MetricsLogger(self.run_dir, tensorboard=self.tc.tensorboard)
        if self.resumed_from is None:
            self.logger.log({"kind": "meta", "step": 0, "run": self.run_dir.name, "params": n_params,
                             "arch": mc.arch, "corpus": self.comp.corpus_summary})
        if self.tc.progress:
            self.bar = _progress_bar(self.tc.steps, self.state.step, self.run_dir.name)

    def next_batches(self) -> list[dict[str, torch.Tensor]]:
        """The ``grad_accum`` (global) micro-batches of the next step, on the device."""
        return [_to(next(self._batches), self.device) for _ in range(self.tc.grad_accum)]

    def batch_loss(self, out: Any, batch: dict[str, torch.Tensor],
                   global_batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(LM loss, training loss) of one micro-batch: the LM loss is the mean NLL over the global micro-batch's
        real labels (this rank's sum scaled by processes / global label tokens), the training loss adds the
        model's auxiliary losses. A subclass may change the objective (``switchformer.train.distill``)."""
        lm = lm_nll(out.logits, batch) * self.layout.shards / max(label_count(global_batch), 1)
        loss = lm + out.aux_loss if getattr(out, "aux_loss", None) is not None else lm
        return lm, loss

    def train_step(self, micro: list[dict[str, torch.Tensor]]) -> StepOutcome:
        """One optimizer step over ``micro``: forward and backward per micro-batch, finiteness check, gradient
        clipping, the scheduled learning rate and the update; advances the counters and the log window.

        Each micro-batch's loss is its LM loss (the mean over its real label tokens; on several processes, over
        the global micro-batch: this rank's NLL sum scaled by processes / global label tokens, so the averaged
        gradients are those of the global mean) plus the weighted auxiliary losses; the step's loss is the mean
        over micro-batches. Every rank runs every backward, even after a non-finite loss, so the collectives stay
        in step; the update is then skipped on all of them.

        Raises:
            NonFiniteLossError: a non-finite loss or gradient, unless ``train.skip_nonfinite`` (then the update is
                skipped; the step still counts, so the schedule and data order stay those of the run plan).
        """
        tc, step = self.tc, self.state.step
        t0 = time.perf_counter()
        rng_before = torch.get_rng_state()
        loss_sum, lm_sum, bad_losses = 0.0, 0.0, 0
        nonfinite = None
        for global_batch in micro:
            batch = self.layout.local(global_batch)
            with _autocast(self.device, tc.precision):
                out, entropy = routed_forward(self.model, batch)
            lm, loss = self.batch_loss(out, batch, global_batch)
            if not torch.isfinite(loss.detach()):
                bad_losses += 1
            else:
                loss_sum += float(loss.detach()) / tc.grad_accum
                lm_sum += float(lm.detach()) / tc.grad_accum
                self.window.router.add(getattr(out, "router", None), entropy)
            (loss / tc.grad_accum).backward()
            self.window.tokens += batch_tokens(global_batch)
        # mean over ranks = the global losses; the count makes the non-finite decision the same on every rank
        loss_sum, lm_sum, bad_losses = self.layout.sum([loss_sum, lm_sum, bad_losses])
        loss_sum, lm_sum = loss_sum / self.layout.shards, lm_sum / self.layout.shards
        self.grad_norm = float("nan")
        if bad_losses:
            nonfinite, loss_sum, lm_sum = "loss", float("nan"), float("nan")
        else:
            self.layout.finish_gradients(self.model)
            max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")  # inf: measure
            self.grad_norm = self.layout.clip_grad_norm(self.model, max_norm)
            if not math.isfinite(self.grad_norm):
                nonfinite = "gradient"
        if nonfinite is None:
            set_lr(self.optimizer, lr_at(step, self.cfg.optim, tc.steps))
            self.optimizer.step()
        else:
            self._nonfinite_step(micro, rng_before, nonfinite)
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        self.state.step += 1
        self.state.train_seconds += dt
        self.state.tokens_seen += sum(batch_tokens(b) for b in micro)
        self.session_seconds += dt
        w = self.window
        w.steps, w.seconds = w.steps + 1, w.seconds + dt
        if not bad_losses:  # a skipped non-finite step leaves the window's mean loss alone
            w.loss, w.lm_loss, w.finite_steps = w.loss + loss_sum, w.lm_loss + lm_sum, w.finite_steps + 1
        if self.bar is not None:
            self.bar.update(1)
        return StepOutcome(loss_sum, lm_sum, self.grad_norm, dt, nonfinite)

    def _nonfinite_step(self, micro: list[dict[str, torch.Tensor]], rng_before: torch.Tensor, what: str) -> None:
        step = self.state.step + 1
        local = [self.layout.local(b) for b in micro]
        where = self.layout.first(_locate_nonfinite(self.model, local, rng_before, self.device, self.tc.precision,
                                                    what)) or "the loss computation (all module outputs were finite)"
        if not self.tc.skip_nonfinite:
            self.logger.log({"kind": "error", "step": step, "error": f"non-finite {what}", "where": where})
            self.close()
            raise NonFiniteLossError(f"non-finite {what} at step {step}: first non-finite output in {where} "
                                     "(set train.skip_nonfinite=true to skip such steps)")
        self.state.skipped += 1
        self.say(f"step {step}: non-finite {what} ({where}); step skipped")
        self.logger.log({"kind": "skip", "step": step, "error": f"non-finite {what}", "where": where})

    def stop_reason(self) -> str | None:
        """Why the run stops after the current step, or None to go on."""
        if self.state.step >= self.tc.steps:
            return f"finished all {self.tc.steps} steps"
        if self.tc.max_minutes > 0 and self.session_seconds >= self.tc.max_minutes * 60:
            return (f"time budget: this invocation trained {self.session_seconds / 60:.1f} min "
                    f"(train.max_minutes={self.tc.max_minutes:g}); --resume continues the run")
        return None

    def log(self) -> dict:
        """Write the 'train' record of the steps since the last one, and start a new window."""
        w, step = self.window, self.state.step
        rs = self.layout.reduce_router(w.router).summary()
        n = w.finite_steps or float("nan")  # NaN: every step of the window was skipped as non-finite
        rec = {"kind": "train", "step": step, "loss": w.loss / n, "lm_loss": w.lm_loss / n,
               "lr": lr_at(step - 1, self.cfg.optim, self.tc.steps), "grad_norm": self.grad_norm,
               "tokens_per_s": w.tokens / max(w.seconds, 1e-9), "train_seconds": self.state.train_seconds,
               "tokens_seen": self.state.tokens_seen, "drop_fraction": rs.get("drop_fraction", 0.0),
               "load_balancing_loss": rs.get("load_balancing_loss", 0.0),
               "router_entropy": rs.get("router_entropy", 0.0)}
        self.logger.log(rec)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                 drop=f"{rec['drop_fraction']:.3f}", refresh=False)
        self.window = LogWindow()
        return rec

    def evaluate(self) -> dict:
        """Evaluate on the fixed validation batches, log the 'eval' record and print one line."""
        ev = evaluate(self.model, self.comp.val_batches, self.device, self.tc.precision, self.layout,
                      langs=getattr(self.comp, "val_langs", None))
        s = self.state
        ev.update({"kind": "eval", "step": s.step, "train_seconds": s.train_seconds, "tokens_seen": s.tokens_seen})
        self.logger.log(ev)
        self.evals.append(ev)
        drop = f", dropped {ev['drop_fraction']:.2%}" if "drop_fraction" in ev else ""
        self.say(f"step {s.step:>6}  val loss {ev['val_loss']:.4f}  neg log perplexity "
                 f"{ev['neg_log_perplexity']:.4f}{drop}  ({s.train_seconds:.0f}s)")
        if "val_loss_by_lang" in ev:
            self.say("        val loss by language: " + ", ".join(f"{lg} {v:.4f}"
                                                              for lg, v in ev["val_loss_by_lang"].items()))
        return ev

    def save(self) -> Path:
        """Write an atomic checkpoint of the current step (keeping the newest ``train.keep_checkpoints``)."""
        s, tc, loader = self.state, self.tc, self.comp.train_loader
        state = {"train_seconds": s.train_seconds, "tokens_seen": s.tokens_seen, "skipped_steps": s.skipped,
                 "lr": lr_at(s.step - 1, self.cfg.optim, tc.steps), "schedule": self.cfg.optim.schedule,
                 "data": loader.state_dict() if hasattr(loader, "state_dict") else None,
                 "last_eval": {k: v for k, v in self.last_eval.items() if k != "tokens_per_expert"}}
        return self.layout.save_checkpoint(self.run_dir, s.step, self.model, self.optimizer, state,
                                           to_toml(self.run_cfg), tc.keep_checkpoints)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.logger is not None:
            self.logger.close()

    def finish(self, reason: str) -> TrainResult:
        """Close the run: say why it stopped, write the 'end' record, and draw the plots."""
        s = self.state
        self.logger.log({"kind": "end", "step": s.step, "train_seconds": s.train_seconds, "stop": reason})
        self.close()
        self.print_fn(f"stopped at step {s.step}: {reason}")
        if self.tc.plots and self.layout.is_main:
            try:
                from switchformer.plot import plot_run

                plot_run(self.run_dir)
            except Exception as e:  # plotting must never lose a finished run
                self.print_fn(f"warning: plotting failed: {e}")
        return TrainResult(self.run_dir, s.step, self.last_eval, self.evals, s.train_seconds, reason)


class _NullLogger:
    """The metrics log of a rank that is not the main one: records go nowhere."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _model_changes(previous_toml: Path, model_cfg: ModelConfig) -> list[str]:
    """``model.KEY=NEW (the run has OLD)`` for each model setting that differs from the run's config.toml."""
    try:
        old = dataclasses.asdict(load_toml(previous_toml).model)
    except (OSError, ValueError):
        return []
    flat_old, flat_new = _flatten(old, "model"), _flatten(dataclasses.asdict(model_cfg), "model")
    return [f"{k}={flat_new[k]!r} (the run has {flat_old[k]!r})" for k in flat_new if flat_old.get(k) != flat_new[k]]


def _flatten(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}") if isinstance(v, dict) else {f"{prefix}.{k}": v})
    return out


def _kill_step(rank: int) -> int | None:
    value, only_rank = os.environ.get(KILL_AFTER_STEP_ENV), os.environ.get(KILL_RANK_ENV)
    if only_rank and int(only_rank) != rank:
        return None
    return int(value) if value else None


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    run_dir: str | Path | None = None,
    components: Components | None = None,
    print_fn: Callable[[str], None] = print,
    trainer_cls: type[Trainer] = Trainer,
) -> TrainResult:
    """Train ``cfg`` and return the result; see the module docstring for what happens each step.

    Under torchrun (``WORLD_SIZE`` > 1; ``switchformer train --nproc N``), or in a process group of several ranks,
    every rank calls this: the process group and the ("dp", "ep") mesh are set up from ``cfg.parallel``, every rank
    must pass an equal ``cfg``, ``components`` (if given) must hold the same model on every rank, and each rank
    trains on its rows of every global batch (``switchformer.train.parallel``). Every rank returns the result.

    Args:
        cfg: the run's configuration.
        resume: continue from the newest usable checkpoint of the run directory (exactly, including data order).
        run_dir: run directory; default ``cfg.out_dir/cfg.name`` (suffixed -2, -3... if it exists and not resume).
        components: pre-built model/tokenizer/loaders (tests); default ``build_components(cfg, device)``.
        print_fn: where progress lines go.
        trainer_cls: the ``Trainer`` (sub)class that runs the named steps; a subclass may evaluate differently
            (fine-tuning decodes and scores a task, ``switchformer.train.finetune``).

    Raises:
        NonFiniteLossError: a non-finite loss or gradient (unless ``cfg.train.skip_nonfinite``).
        RunError: ``resume`` and no checkpoint fits this config (nothing was written to the run then); on several
            processes, a collective failed because another process died or stalled.
        ConfigError: on several processes, ranks with different configs or a layout that cannot work.
    """
    tc = cfg.train
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    device = resolve_device(tc.device)
    layout = setup(cfg, device)  # one process, or this rank of a distributed run (checks the layout and config)
    try:
        if not layout.is_main:
            print_fn = _quiet
        return _train(cfg, layout, resume, run_dir, components, print_fn, trainer_cls)
    except RuntimeError as e:
        explained = layout.explain_failure(e)  # a peer's death, on several processes: one line naming the rank
        if explained is e:
            raise
        raise explained from e
    finally:
        layout.close()


def _quiet(text: str) -> None:
    """The console of a rank that is not the main one."""


def _train(cfg: RunConfig, layout: SingleProcess, resume: bool, run_dir: str | Path | None,
           components: Components | None, print_fn: Callable[[str], None],
           trainer_cls: type[Trainer]) -> TrainResult:
    tc, device = cfg.train, layout.device
    if run_dir is None:
        run_dir = layout.from_main(lambda: Path(cfg.out_dir) / cfg.name if resume else _unique_run_dir(cfg))
    run_dir = Path(run_dir)
    if resume and not (run_dir / "checkpoints").is_dir():
        raise RunError(f"{run_dir} has no checkpoints to resume from; train it without --resume")
    if tc.precision == "bfloat16" and device.type == "cpu":
        print_fn("warning: train.precision=bfloat16 on CPU; without native bf16 matmuls this is much slower")

    t_setup = time.perf_counter()
    # the main rank first trains and caches the tokenizer and token arrays; the others then read its caches
    comp = components or layout.main_first(lambda: build_components(cfg, device))
    comp.model = layout.parallelize(comp.model, cfg)  # the same init on every rank (train.seed)
    trainer = trainer_cls(cfg, comp, run_dir, device, print_fn, layout=layout)
    if resume:
        trainer.restore()
    else:
        # dropout and jitter stream; the init already used train.seed in build_components
        torch.manual_seed(layout.stream_seed(tc.seed))
    trainer.start(time.perf_counter() - t_setup)
    kill_at = _kill_step(layout.rank)

    stop = trainer.stop_reason()
    while stop is None:
        trainer.train_step(trainer.next_batches())
        stop = trainer.stop_reason()
        step = trainer.state.step
        checkpoint_due = stop is not None or (tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0)
        # a log window also closes at every checkpoint, so a resumed run's windows match the uninterrupted run's
        if step % tc.log_every == 0 or checkpoint_due:
            trainer.log()
        if step % tc.eval_every == 0 or stop is not None:
            trainer.evaluate()
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if checkpoint_due:
            trainer.save()
    return trainer.finish(stop)


def _locate_nonfinite(
    model: torch.nn.Module,
    micro: list[dict[str, torch.Tensor]],
    rng_before: torch.Tensor,
    device: torch.device,
    precision: str,
    what: str,
) -> str | None:
    """Name the first module whose output is non-finite, replaying the step's batches under the same RNG (None
    when this rank found nothing non-finite)."""
    rng_now = torch.get_rng_state()
    try:
        torch.set_rng_state(rng_before)
        found = None
        for batch in micro:  # every batch, even after a hit: on several processes each forward is collective
            with _autocast(device, precision):
                where = first_nonfinite_module(model, lambda b=batch: model(**b))
            found = found or where
    finally:
        torch.set_rng_state(rng_now)
    if found is not None:
        return found
    if what == "gradient":
        for name, p in model.named_parameters():
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # this rank's shard of a DTensor
            if grad is not None and not bool(torch.isfinite(grad).all()):
                return f"the gradient of {name} (all forward outputs were finite)"
    return None
