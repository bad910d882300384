"""The single training loop (STYLE.md rule 8): build everything from a RunConfig, train, evaluate, checkpoint.

Flat control flow, no callbacks. One call ``train(cfg)``:

1. corpus -> tokenizer (trained and cached under ``<out_dir>/.cache``) -> model (vocab from the tokenizer, rounded
   up to a multiple of 128) -> optimizer (Adafactor + T5X rsqrt schedule by default, paper.md §3) -> loaders;
2. for each step: ``grad_accum`` micro-batches (the model's ``out.loss`` = LM loss + alpha * aux, §2.2), a
   finiteness check (a non-finite loss or gradient stops the run naming the step and the first module whose output
   is non-finite, or skips the step under ``train.skip_nonfinite``), gradient clipping, the scheduled LR, the update;
3. every ``eval_every`` steps: validation loss and negative log perplexity (nats, the paper's metric), per-layer
   tokens per expert, dropped fraction, router entropy; every ``checkpoint_every`` steps an atomic checkpoint.

Exact resume: the checkpoint holds weights, optimizer, RNG states and the data-loader position; evaluation runs
under a forked RNG, so a run killed at any point and resumed from its last checkpoint logs the same numbers as one
that was never interrupted.

Run it: ``switchformer train`` (configs/default.toml), or ``python -c "from switchformer.train.loop import train;
from switchformer.config import load_toml; train(load_toml('configs/tiny_test.toml'))"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from switchformer import checkpoint as ck
from switchformer.config import ModelConfig, RunConfig, to_toml
from switchformer.metrics import (
    MetricsLogger,
    RouterEntropyProbe,
    RouterStats,
    batch_tokens,
    read_metrics,
    truncate_metrics,
)
from switchformer.train.losses import token_nll
from switchformer.train.optim import build_optimizer, lr_at, set_lr


class NonFiniteLossError(FloatingPointError):
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


@dataclass
class TrainResult:
    """Outcome of ``train``: the run directory, last step, final eval record and the eval history."""

    run_dir: Path
    step: int
    final_eval: dict
    evals: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0


def round_vocab(n: int, multiple: int = 128) -> int:
    """Embedding rows for a tokenizer of ``n`` ids: rounded up to a multiple of 128 (as T5's 32128)."""
    return ((n + multiple - 1) // multiple) * multiple


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    val_loader = make_loader(cfg.data, tok, corpus.val_texts, bs, "val", arch, cache_dir=cache)
    # the same fixed batches at every evaluation (the start of the validation split)
    val_batches = list(val_loader.epoch_batches(cfg.train.eval_batches))
    if not val_batches:
        raise ValueError("the validation split produced no batch: raise data.val_fraction or use a larger corpus")
    summary = corpus.summary() if hasattr(corpus, "summary") else ""
    return Components(model, model_cfg, tok, train_loader, val_batches, summary)


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
            raise ValueError("the training loader produced no batch: the corpus is too small for one batch")


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


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device, precision: str = "float32"
) -> dict:
    """Validation metrics over ``batches`` (eval mode: no jitter/dropout, eval capacity factor).

    Returns:
        dict with val_loss (nats per target token), neg_log_perplexity (= -val_loss, paper.md §3 footnote 4),
        val_ppl, drop_fraction, router_entropy, load_entropy, tokens_per_expert {layer: [E]}.
    """
    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64)
    n_tokens = 0
    stats = RouterStats()
    # fork the RNG so evaluating never shifts the training random stream (exact resume)
    probe = RouterEntropyProbe(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), probe:
        for batch in batches:
            batch = _to(batch, device)
            with _autocast(device, precision):
                out = model(**batch)
            if "decoder_input_ids" in batch:  # encoder-decoder: labels align with the decoder's logits
                nll, n = token_nll(out.logits, batch["labels"])
            else:  # decoder-only: labels align with input_ids; position t predicts label t + 1
                nll, n = token_nll(out.logits[:, :-1], batch["labels"][:, 1:])
            nll_sum += nll.double().cpu()
            n_tokens += int(n)
            stats.add(getattr(out, "router", None))
    model.train(was_training)
    val_loss = float(nll_sum) / max(n_tokens, 1)
    rec = {"val_loss": val_loss, "neg_log_perplexity": -val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
    rec["val_tokens"] = n_tokens
    rec.update(stats.summary())
    if probe.mean() is not None:
        rec["router_entropy"] = probe.mean()
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


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    run_dir: str | Path | None = None,
    components: Components | None = None,
    print_fn: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``cfg`` and return the result; see the module docstring for what happens each step.

    Args:
        cfg: the run's configuration.
        resume: continue from the newest usable checkpoint of the run directory (exactly, including data order).
        run_dir: run directory; default ``cfg.out_dir/cfg.name`` (suffixed -2, -3... if it exists and not resume).
        components: pre-built model/tokenizer/loaders (tests); default ``build_components(cfg, device)``.
        print_fn: where progress lines go.

    Raises:
        NonFiniteLossError: a non-finite loss or gradient (unless ``cfg.train.skip_nonfinite``).
        CheckpointError: ``resume`` and no usable checkpoint.
    """
    tc = cfg.train
    if tc.steps < 1 or tc.batch_size < 1 or tc.grad_accum < 1:
        raise ValueError("train.steps, train.batch_size and train.grad_accum must be >= 1")
    if run_dir is None:
        run_dir = Path(cfg.out_dir) / cfg.name if resume else _unique_run_dir(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    device = resolve_device(tc.device)
    if tc.precision == "bfloat16" and device.type == "cpu":
        print_fn("warning: train.precision=bfloat16 on CPU; without native bf16 matmuls this is much slower")

    t_setup = time.perf_counter()
    comp = components or build_components(cfg, device)
    model, optimizer = comp.model, build_optimizer(comp.model, cfg.optim)
    run_cfg = dataclasses.replace(cfg, model=comp.model_cfg)
    (run_dir / "config.toml").write_text(to_toml(run_cfg))
    if comp.tokenizer is not None and hasattr(comp.tokenizer, "save"):
        comp.tokenizer.save(run_dir / "tokenizer")
    n_params = sum(p.numel() for p in model.parameters())
    mc = comp.model_cfg
    kind = f"Switch, {mc.moe.num_experts} experts" if mc.is_sparse else "dense"
    print_fn(f"run {run_dir}: {mc.arch} ({kind}), {n_params / 1e6:.2f}M parameters, vocab {mc.vocab_size}; "
             f"setup {time.perf_counter() - t_setup:.0f}s")

    step, train_seconds, tokens_seen = 0, 0.0, 0
    if resume:
        loaded = ck.load_latest(run_dir, model, optimizer)
        step = loaded.step
        train_seconds = float(loaded.state.get("train_seconds", 0.0))
        tokens_seen = int(loaded.state.get("tokens_seen", 0))
        if loaded.state.get("data") is not None and hasattr(comp.train_loader, "load_state_dict"):
            comp.train_loader.load_state_dict(loaded.state["data"])
        truncate_metrics(run_dir, step)
        print_fn(f"resumed from {loaded.path} (step {step})")
    else:
        torch.manual_seed(tc.seed)  # dropout and jitter stream; the init already used it in build_components
    logger = MetricsLogger(run_dir, tensorboard=tc.tensorboard)
    if not resume:
        logger.log({"kind": "meta", "step": 0, "run": run_dir.name, "params": n_params,
                    "arch": comp.model_cfg.arch, "corpus": comp.corpus_summary})
    evals = read_metrics(run_dir, "eval") if resume else []

    batches = _iter_forever(comp.train_loader)
    model.train()
    bar = None
    if tc.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc=run_dir.name, dynamic_ncols=True)
    say = bar.write if bar is not None else print_fn
    window_tokens, window_time, window_loss, window_lm, window_n = 0, 0.0, 0.0, 0.0, 0
    window_stats = RouterStats()
    last_eval: dict = evals[-1] if evals else {}
    skipped = 0
    stop_reason = "steps"

    while step < tc.steps:
        t0 = time.perf_counter()
        rng_before = torch.get_rng_state()
        micro = [_to(next(batches), device) for _ in range(tc.grad_accum)]
        loss_sum, lm_sum = 0.0, 0.0
        nonfinite_at = None
        for batch in micro:
            with _autocast(device, tc.precision):
                out = model(**batch)
            loss = out.loss / tc.grad_accum
            if not torch.isfinite(out.loss.detach()):
                nonfinite_at = "loss"
                break
            loss.backward()
            loss_sum += float(out.loss.detach()) / tc.grad_accum
            lm = getattr(out, "lm_loss", None)
            lm_sum += float(lm.detach() if lm is not None else out.loss.detach()) / tc.grad_accum
            window_stats.add(getattr(out, "router", None))
            window_tokens += batch_tokens(batch)
        grad_norm = float("nan")
        if nonfinite_at is None:
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")  # inf: measure only
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            if not math.isfinite(grad_norm):
                nonfinite_at = "gradient"
        if nonfinite_at is not None:
            where = _locate_nonfinite(model, micro, rng_before, device, tc.precision, nonfinite_at)
            optimizer.zero_grad(set_to_none=True)
            if not tc.skip_nonfinite:
                logger.log({"kind": "error", "step": step + 1, "error": f"non-finite {nonfinite_at}", "where": where})
                logger.close()
                if bar is not None:
                    bar.close()
                raise NonFiniteLossError(
                    f"non-finite {nonfinite_at} at step {step + 1}: first non-finite output in {where} "
                    "(set train.skip_nonfinite=true to skip such steps)"
                )
            skipped += 1
            say(f"step {step + 1}: non-finite {nonfinite_at} ({where}); step skipped")
            logger.log({"kind": "skip", "step": step + 1, "error": f"non-finite {nonfinite_at}", "where": where})
            # a skipped step still counts, so the schedule and data order stay those of the run plan
        else:
            set_lr(optimizer, lr_at(step, cfg.optim, tc.steps))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        train_seconds += dt
        window_time += dt
        window_loss += loss_sum
        window_lm += lm_sum
        window_n += 1
        tokens_seen += sum(batch_tokens(b) for b in micro)

        last_step = step == tc.steps
        over_time = tc.max_minutes > 0 and train_seconds >= tc.max_minutes * 60
        ckpt_due = (tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0) or last_step or over_time
        # a log window also closes at every checkpoint, so a resumed run's windows match the uninterrupted run's
        if step % tc.log_every == 0 or ckpt_due:
            rs = window_stats.summary()
            rec = {"kind": "train", "step": step, "loss": window_loss / max(window_n, 1),
                   "lm_loss": window_lm / max(window_n, 1),
                   "lr": lr_at(step - 1, cfg.optim, tc.steps), "grad_norm": grad_norm,
                   "tokens_per_s": window_tokens / max(window_time, 1e-9), "train_seconds": train_seconds,
                   "tokens_seen": tokens_seen, "drop_fraction": rs.get("drop_fraction", 0.0),
                   "load_balancing_loss": rs.get("load_balancing_loss", 0.0),
                   "router_entropy": rs.get("router_entropy", 0.0)}
            logger.log(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                drop=f"{rec['drop_fraction']:.3f}", refresh=False)
            window_tokens, window_time, window_loss, window_lm, window_n = 0, 0.0, 0.0, 0.0, 0
            window_stats = RouterStats()
        if bar is not None:
            bar.update(1)

        if step % tc.eval_every == 0 or last_step or over_time:
            ev = evaluate(model, comp.val_batches, device, tc.precision)
            ev.update({"kind": "eval", "step": step, "train_seconds": train_seconds, "tokens_seen": tokens_seen})
            logger.log(ev)
            evals.append(ev)
            last_eval = ev
            drop = f", dropped {ev['drop_fraction']:.2%}" if "drop_fraction" in ev else ""
            say(f"step {step:>6}  val loss {ev['val_loss']:.4f}  neg log perplexity {ev['neg_log_perplexity']:.4f}"
                f"{drop}  ({train_seconds:.0f}s)")
        if ckpt_due:
            state = {"train_seconds": train_seconds, "tokens_seen": tokens_seen, "skipped_steps": skipped,
                     "lr": lr_at(step - 1, cfg.optim, tc.steps), "schedule": cfg.optim.schedule,
                     "data": comp.train_loader.state_dict() if hasattr(comp.train_loader, "state_dict") else None,
                     "last_eval": {k: v for k, v in last_eval.items() if k != "tokens_per_expert"}}
            ck.save_checkpoint(run_dir, step, model, optimizer, state, to_toml(run_cfg), keep=tc.keep_checkpoints)
        if over_time and not last_step:
            stop_reason = f"time budget ({tc.max_minutes} min)"
            break

    if bar is not None:
        bar.close()
    logger.log({"kind": "end", "step": step, "train_seconds": train_seconds, "stop": stop_reason})
    logger.close()
    if tc.plots:
        try:
            from switchformer.plot import plot_run

            plot_run(run_dir)
        except Exception as e:  # plotting must never lose a finished run
            print_fn(f"warning: plotting failed: {e}")
    return TrainResult(run_dir, step, last_eval, evals, train_seconds)


def _locate_nonfinite(
    model: torch.nn.Module,
    micro: list[dict[str, torch.Tensor]],
    rng_before: torch.Tensor,
    device: torch.device,
    precision: str,
    what: str,
) -> str:
    """Name the first module whose output is non-finite, replaying the step's batches under the same RNG."""
    rng_now = torch.get_rng_state()
    try:
        torch.set_rng_state(rng_before)
        for batch in micro:
            with _autocast(device, precision):
                where = first_nonfinite_module(model, lambda b=batch: model(**b))
            if where is not None:
                return where
    finally:
        torch.set_rng_state(rng_now)
    if what == "gradient":
        for name, p in model.named_parameters():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return f"the gradient of {name} (all forward outputs were finite)"
    return "the loss computation (all module outputs were finite)"
