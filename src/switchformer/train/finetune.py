"""Fine-tuning a pretrained Switch model on a text-to-text task (paper §4.1), through the training loop's own steps.

    switchformer finetune runs/switch --task stdlib-name                 # a run of ours
    switchformer finetune DIR_OR_HUB_ID --task data.jsonl finetune.target_field=label
    switchformer finetune --resume runs/switch-stdlib-name train.steps=800

``finetune(cfg)`` composes the pieces of :mod:`switchformer.train.loop`: the pretrained weights and tokenizer of
``cfg.finetune.source`` (a run directory, or a transformers-format directory / Hub id with its ``spiece.model``), the
task's examples (:mod:`switchformer.data.tasks`) in a shuffled, resumable loader, and ``train(...,
trainer_cls=FinetuneTrainer)``: the same optimizer step, logging, atomic checkpoints and exact resume as
pretraining. ``FinetuneTrainer`` changes only evaluation and the end of the run:

- every ``train.eval_every`` steps (and before the first step, ``finetune.eval_at_start``): the teacher-forced
  validation loss, then greedy decoding (``model.generate``) of the first ``finetune.eval_examples`` validation
  examples, scored with the task's metrics (:mod:`switchformer.train.task_metrics`);
- the best evaluation by the task's primary metric (ties: the lower validation loss) is kept in ``RUN_DIR/best/``
  (``save_pretrained`` weights, the tokenizer's ``spiece.model``, ``best.json``, the validation predictions); the
  paper reports the peak validation score, evaluating every 200 steps (§4.1);
- at the end, the best weights are scored on the test split; ``RUN_DIR/finetune_results.json`` and ``.md`` hold the
  untuned (step 0), best and last evaluations and the test scores, and the table is printed.

The paper's fine-tuning settings (``FINETUNE_DEFAULTS``) are applied to the source's config before the command
line's overrides: dropout 0.1 and expert dropout 0.4 (§2.4, §4.1, Table 4), a constant learning rate of 1e-3 (the
official T5X fine-tuning config), the load-balancing loss as in pretraining. ``finetune.freeze_router=true`` keeps
the routers' weights fixed; ``model.moe.capacity_factor=...`` sets the capacity factor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from switchformer.config import IGNORE_INDEX, RunConfig, apply_overrides, load_toml
from switchformer.errors import ConfigError, RunError
from switchformer.train.loop import Components, Trainer, TrainResult, evaluate, resolve_device, train
from switchformer.train.task_metrics import FINETUNE_EXTRA, compute, require

FINETUNE_DEFAULTS = (
    "model.dropout_rate=0.1",  # paper §4.1: dropout 0.1 on the non-expert layers when fine-tuning
    "model.moe.expert_dropout=0.4",  # paper §2.4, Table 4: 0.4 inside the experts
    "optim.schedule=constant",  # official T5X fine-tuning config: Adafactor, constant learning rate 1e-3
    "optim.lr=0.001",
    "optim.warmup_steps=0",
    "train.steps=300",  # a CPU-sized budget for configs/default.toml's model (the paper: 16k steps of 1M tokens)
    "train.eval_every=100",
    "train.checkpoint_every=100",
)
"""Overrides applied to the source's config before the command line's (which win)."""

BEST_DIR = "best"
BEST_FILE = "best.json"
RESULTS_JSON = "finetune_results.json"
RESULTS_MD = "finetune_results.md"
_SPLIT_SALT = 0x7A5C  # the training order's seed stream (differs from the pretraining loader's)


# ----------------------------------------------------------------------------------------------------------------
# Source models


@dataclass
class Source:
    """A pretrained model to fine-tune: its run config (or defaults), weights and tokenizer."""

    cfg: RunConfig
    """The source run's config (a transformers directory: defaults with its model config)."""
    state_dict: dict[str, torch.Tensor]
    tokenizer: Any
    description: str


def _is_run_dir(p: Path) -> bool:
    return (p / "config.toml").is_file() or (p.parent.name == "checkpoints" and (p / "train_state.json").is_file())


def load_source(source: str, device: torch.device | str = "cpu") -> Source:
    """The weights, config and tokenizer of ``source``: a run directory (or one of its checkpoint directories), a
    transformers-format directory, or a Hub id.

    Raises:
        RunError / CheckpointError: not a usable run or checkpoint, or no tokenizer beside the weights.
    """
    from switchformer.train.runs import load_run

    if not source:
        raise ConfigError("no source model: pass SOURCE (a run directory, a transformers-format directory or a Hub "
                          "id), e.g. switchformer finetune runs/switch --task stdlib-name")
    p = Path(os.path.expanduser(source))
    if p.is_dir() and _is_run_dir(p):
        run = load_run(p, device)
        if run.tokenizer is None:
            raise RunError(f"{run.run_dir / 'tokenizer' / 'spiece.model'} is missing: fine-tuning needs the "
                           "tokenizer the run was trained with")
        return Source(run.cfg, run.model.state_dict(), run.tokenizer, f"{run.checkpoint} (step {run.step})")
    from switchformer.data.tokenizer import load_checkpoint_tokenizer
    from switchformer.interop import from_pretrained, resolve_weights

    resolved = resolve_weights(source)  # a Hub id is downloaded here: config, weights and tokenizer files
    tok = load_checkpoint_tokenizer(resolved.directory)  # the checkpoint's own spiece.model
    model = from_pretrained(resolved, device=device)
    cfg = dataclasses.replace(RunConfig(), name=_slug(p.name if p.is_dir() else source), model=model.config)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_sentinels=tok.num_sentinels))
    return Source(cfg, model.state_dict(), tok, str(source))


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-.")
    return out or "model"


# ----------------------------------------------------------------------------------------------------------------
# Encoded examples, batches and the training loader


@dataclass
class EncodedSplit:
    """Token ids of one split's examples (inputs end with EOS; both cut to the configured lengths)."""

    inputs: list[np.ndarray]
    targets: list[np.ndarray]
    references: list[str]
    """The uncut target texts (what metrics score against)."""
    cut_inputs: int = 0
    """Inputs longer than ``finetune.input_length`` tokens (cut)."""
    cut_targets: int = 0


def encode_split(tok: Any, examples: Sequence[Any], input_length: int, target_length: int) -> EncodedSplit:
    """Encode examples: ``ids[:length - 1] + [EOS]`` for inputs and targets (T5's text-to-text format)."""
    inputs, targets = [], []
    cut_in = cut_tgt = 0
    for ex in examples:
        i, t = tok.encode(ex.input), tok.encode(ex.target)
        cut_in += len(i) >= input_length
        cut_tgt += len(t) >= target_length
        inputs.append(np.asarray(i[: input_length - 1] + [tok.eos_id], dtype=np.int64))
        targets.append(np.asarray(t[: target_length - 1] + [tok.eos_id], dtype=np.int64))
    return EncodedSplit(inputs, targets, [ex.target for ex in examples], cut_in, cut_tgt)


def _pad(rows: Sequence[np.ndarray], value: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), value, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for k, r in enumerate(rows):  # one row per example of a batch, not per token
        out[k, : len(r)] = r
        mask[k, : len(r)] = 1
    return out, mask


def collate(inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray] | None, pad_id: int,
            decoder_start_id: int) -> dict[str, torch.Tensor]:
    """A padded encoder-decoder batch (padded to its longest row): input_ids, attention_mask and, with targets,
    labels (-100 on padding), decoder_input_ids (labels shifted right after the start id) and
    decoder_attention_mask: the keys the pretraining loader produces."""
    input_ids, attention_mask = _pad(inputs, pad_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if targets is not None:
        labels, decoder_mask = _pad(targets, IGNORE_INDEX)
        decoder_input_ids = np.full_like(labels, pad_id)
        decoder_input_ids[:, 0] = decoder_start_id
        decoder_input_ids[:, 1:] = np.where(labels[:, :-1] == IGNORE_INDEX, pad_id, labels[:, :-1])
        batch.update(labels=labels, decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_mask)
    return {k: torch.from_numpy(v) for k, v in batch.items()}


class TaskLoader:
    """Training batches of a task: every epoch a new permutation of the examples (seeded by data.seed and the epoch),
    batches that run across epoch ends, and a state of one integer (examples consumed), so a resumed run sees the
    same batches as an uninterrupted one."""

    def __init__(self, split: EncodedSplit, batch_size: int, seed: int, pad_id: int, decoder_start_id: int) -> None:
        if not split.inputs:
            raise RunError("the task's train split is empty")
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.pad_id, self.decoder_start_id = pad_id, decoder_start_id
        self.position = 0
        self._order: tuple[int, np.ndarray] | None = None
        h = hashlib.sha256()
        for a, b in zip(split.inputs, split.targets, strict=True):
            h.update(a.tobytes() + b"|" + b.tobytes() + b"\n")
        self.fingerprint = h.hexdigest()[:16]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, _SPLIT_SALT, epoch])
            self._order = (epoch, rng.permutation(len(self.split.inputs)))
        return self._order[1]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        n = len(self.split.inputs)
        idx = []
        for pos in range(self.position, self.position + self.batch_size):
            epoch, i = divmod(pos, n)
            idx.append(int(self._epoch_order(epoch)[i]))
        self.position += self.batch_size
        return collate([self.split.inputs[i] for i in idx], [self.split.targets[i] for i in idx], self.pad_id,
                       self.decoder_start_id)

    def state_dict(self) -> dict:
        return {"kind": "task", "position": self.position, "seed": self.seed, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position; the examples (tokenized) and the seed must be those of the run."""
        if state.get("kind") != "task":
            raise RunError("the checkpoint's data state is not a fine-tuning loader's; resume a run of "
                           "switchformer finetune with switchformer finetune --resume")
        for key in ("seed", "fingerprint"):
            if state.get(key) != getattr(self, key):
                raise RunError(f"the checkpoint was trained on other task data ({key} {state.get(key)!r}, now "
                               f"{getattr(self, key)!r}); resume with the run's task, tokenizer, lengths and "
                               "data.seed")
        self.position = int(state["position"])


@dataclass
class FinetuneComponents(Components):
    """``Components`` plus the task and its encoded validation and test splits."""

    task: Any = None
    validation: EncodedSplit | None = None
    test: EncodedSplit | None = None


def build_finetune_components(cfg: RunConfig, device: torch.device, tokenizer: Any,
                              state_dict: dict[str, torch.Tensor] | None,
                              print_fn: Callable[[str], None] = print) -> FinetuneComponents:
    """The task's loaders and the model of ``cfg.model`` with ``state_dict`` loaded (None: left for a resume to
    load), routers frozen when ``finetune.freeze_router``."""
    from switchformer.data.tasks import load_task
    from switchformer.models import build_model

    fc, mc = cfg.finetune, cfg.model
    if mc.arch != "encoder_decoder":
        raise ConfigError(f"finetune takes encoder-decoder models (the Switch Transformer, paper §4.1); this "
                          f"model is {mc.arch!r}")
    if tokenizer.vocab_size > mc.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {mc.vocab_size} "
                          "embeddings; use the tokenizer the model was trained with")
    task = load_task(fc, Path(cfg.out_dir) / ".cache")
    require(task.metrics)
    train_split = encode_split(tokenizer, task.splits["train"], fc.input_length, fc.target_length)
    val_examples = task.splits["validation"][: fc.eval_examples or None]
    validation = encode_split(tokenizer, val_examples, fc.input_length, fc.target_length)
    test_examples = task.splits["test"][: fc.test_examples or None]
    test = encode_split(tokenizer, test_examples, fc.input_length, fc.target_length)
    model = build_model(mc, init=False)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ConfigError(f"the source's weights do not fit this model config (missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}); override only settings that keep the weights' shapes "
                              "(dropout, capacity, router losses)")
    model.to(device)
    if fc.freeze_router:
        frozen = [n for n, p in model.named_parameters() if n.endswith("router.weight")]
        if not frozen:
            print_fn("warning: finetune.freeze_router: the model has no router")
        for n, p in model.named_parameters():
            if n in frozen:
                p.requires_grad_(False)
    bs = cfg.train.batch_size
    loader = TaskLoader(train_split, bs, cfg.data.seed, tokenizer.pad_id, mc.decoder_start_token_id)
    val_batches = [collate(validation.inputs[i : i + bs], validation.targets[i : i + bs], tokenizer.pad_id,
                           mc.decoder_start_token_id) for i in range(0, len(validation.inputs), bs)]
    cut = (f"; inputs cut to {fc.input_length} tokens: {train_split.cut_inputs} of {len(train_split.inputs)} "
           f"train, targets cut to {fc.target_length}: {train_split.cut_targets}")
    return FinetuneComponents(model, mc, tokenizer, loader, val_batches, task.summary() + cut, task=task,
                              validation=validation, test=test)


# ----------------------------------------------------------------------------------------------------------------
# Decoding and scoring


@torch.no_grad()
def predict(model: torch.nn.Module, tokenizer: Any, inputs: Sequence[np.ndarray], *, batch_size: int,
            max_new_tokens: int, device: torch.device) -> list[str]:
    """Greedy decoding (``model.generate``) of encoded inputs; the texts up to the first EOS."""
    out: list[str] = []
    for i in range(0, len(inputs), batch_size):
        batch = collate(inputs[i : i + batch_size], None, tokenizer.pad_id, 0)
        ids = model.generate(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id)
        for row in ids[:, 1:].tolist():  # column 0 is the decoder start id
            if tokenizer.eos_id in row:
                row = row[: row.index(tokenizer.eos_id)]
            # ids past the tokenizer (the embedding table is padded to a multiple of 128) have no text
            out.append(tokenizer.decode([t for t in row if t != tokenizer.pad_id and t < tokenizer.vocab_size]))
    return out


@torch.no_grad()
def token_accuracy(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Teacher-forced target-token accuracy (x 100): the share of target tokens (EOS included) that are the
    model's argmax given the reference prefix. A finer signal than exact match while a model still learns."""
    was_training = model.training
    model.eval()
    hits = total = 0
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch).logits
            real = batch["labels"] != IGNORE_INDEX
            hits += int(((logits.argmax(-1) == batch["labels"]) & real).sum())
            total += int(real.sum())
    finally:
        model.train(was_training)
    return 100.0 * hits / max(total, 1)


def score(model: torch.nn.Module, tokenizer: Any, split: EncodedSplit, metrics: Sequence[str], *, batch_size: int,
          max_new_tokens: int, device: torch.device) -> tuple[dict[str, float], list[str]]:
    """(metrics, predictions) of ``split`` decoded greedily (under a forked RNG: scoring never moves training's)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        preds = predict(model, tokenizer, split.inputs, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        device=device)
    return compute(metrics, preds, split.references), preds


# ----------------------------------------------------------------------------------------------------------------
# The trainer


class FinetuneTrainer(Trainer):
    """The training loop's ``Trainer`` with task evaluation, the best checkpoint and the final results."""

    comp: FinetuneComponents

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.layout.world != 1:
            raise RunError("switchformer finetune runs on one process; start it without torchrun / --nproc")
        self.best: dict | None = None
        self.results: dict = {}

    @property
    def metric(self) -> str:
        return self.comp.task.metric

    def _decode_kwargs(self) -> dict:
        return {"batch_size": self.tc.batch_size, "max_new_tokens": self.cfg.finetune.target_length,
                "device": self.device}

    def start(self, setup_seconds: float = 0.0) -> None:
        super().start(setup_seconds)
        self.say(self.comp.corpus_summary)
        scored = [e for e in self.evals if self.metric in e]
        on_disk = _read_best(self.run_dir)
        if self.resumed_from is not None and on_disk is not None and on_disk["step"] <= self.state.step:
            self.best = on_disk  # a best saved after the checkpoint is re-made when its step is replayed
        else:
            for e in scored:
                if self._better(e):
                    self.best = e
        if self.resumed_from is None and self.cfg.finetune.eval_at_start:
            self.evaluate()

    def evaluate(self) -> dict:
        """Validation loss, then the task's metrics of greedy decoding; a new best is saved to ``RUN_DIR/best``."""
        ev = evaluate(self.model, self.comp.val_batches, self.device, self.tc.precision, self.layout)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            ev["token_accuracy"] = token_accuracy(self.model, self.comp.val_batches, self.device)
        t0 = time.perf_counter()
        scores, preds = score(self.model, self.comp.tokenizer, self.comp.validation, self.comp.task.metrics,
                              **self._decode_kwargs())
        s = self.state
        ev.update(scores)
        ev.update({"kind": "eval", "step": s.step, "train_seconds": s.train_seconds, "tokens_seen": s.tokens_seen,
                   "metric": self.metric, "eval_examples": len(preds), "decode_seconds": time.perf_counter() - t0})
        self.logger.log(ev)
        self.evals.append(ev)
        extra = "  ".join(f"{m} {scores[m]:.2f}" for m in self.comp.task.metrics)
        self.say(f"step {s.step:>6}  val loss {ev['val_loss']:.4f}  token accuracy {ev['token_accuracy']:.2f}  "
                 f"{extra}  ({s.train_seconds:.0f}s)")
        if self._better(ev):
            self.best = {k: v for k, v in ev.items() if k != "tokens_per_expert"}
            self._save_best(preds)
        return ev

    def _better(self, ev: dict) -> bool:
        """Whether evaluation ``ev`` beats the best so far: a higher task metric, or the same metric and a lower
        validation loss (while a small model's exact match is still 0, the loss tells the checkpoints apart)."""
        if self.best is None:
            return True
        m = self.metric
        return ev[m] > self.best[m] or (ev[m] == self.best[m] and ev["val_loss"] < self.best["val_loss"])

    def _save_best(self, preds: list[str]) -> None:
        """Write ``RUN_DIR/best`` (weights, tokenizer, ``best.json``, validation predictions) next to the old one,
        then swap, so a crash leaves a complete best directory."""
        from switchformer.interop import save_pretrained

        final = self.run_dir / BEST_DIR
        tmp = self.run_dir / f".{BEST_DIR}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with warnings.catch_warnings():  # capacity settings transformers ignores: restored by from_pretrained
            warnings.simplefilter("ignore")
            save_pretrained(self.model, tmp)
        self.comp.tokenizer.save(tmp)
        (tmp / "tokenizer_config.json").write_text(json.dumps({"extra_ids": self.comp.tokenizer.num_sentinels}))
        with open(tmp / "predictions_validation.jsonl", "w", encoding="utf-8") as f:
            for ex, p in zip(self.comp.task.splits["validation"], preds, strict=False):
                f.write(json.dumps({"id": ex.id, "target": ex.target, "prediction": p}) + "\n")
        (tmp / BEST_FILE).write_text(json.dumps(self.best, indent=1) + "\n")
        old = self.run_dir / f".{BEST_DIR}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def finish(self, reason: str) -> TrainResult:
        """Close the run, score the best weights on the test split, write and print the results."""
        result = super().finish(reason)
        self.results = self._final_results(reason)
        text = results_markdown(self.results)
        (self.run_dir / RESULTS_JSON).write_text(json.dumps(self.results, indent=1) + "\n")
        (self.run_dir / RESULTS_MD).write_text(text)
        self.print_fn(text)
        return result

    def _final_results(self, reason: str) -> dict:
        from switchformer.interop import from_pretrained

        best = _read_best(self.run_dir)
        test: dict = {}
        if best is not None and self.comp.test is not None and self.comp.test.inputs:
            model = from_pretrained(self.run_dir / BEST_DIR, device=self.device)
            scores, preds = score(model, self.comp.tokenizer, self.comp.test, self.comp.task.metrics,
                                  **self._decode_kwargs())
            test = {"examples": len(preds), **scores}
            with open(self.run_dir / BEST_DIR / "predictions_test.jsonl", "w", encoding="utf-8") as f:
                for ex, p in zip(self.comp.task.splits["test"], preds, strict=False):
                    f.write(json.dumps({"id": ex.id, "target": ex.target, "prediction": p}) + "\n")
        scored = [e for e in self.evals if self.metric in e]
        keep = ("step", "val_loss", "token_accuracy", "train_seconds", *self.comp.task.metrics)
        fc = self.cfg.finetune
        return {
            "task": self.comp.task.name, "description": self.comp.task.description, "metric": self.metric,
            "metrics": list(self.comp.task.metrics), "sizes": self.comp.task.sizes(), "source": fc.source,
            "eval_examples": len(self.comp.validation.inputs), "steps": self.state.step, "stop": reason,
            "settings": {"dropout_rate": self.cfg.model.dropout_rate,
                         "expert_dropout": self.cfg.model.moe.expert_dropout,
                         "capacity_factor": self.cfg.model.moe.capacity_factor,
                         "freeze_router": fc.freeze_router, "lr": self.cfg.optim.lr,
                         "schedule": self.cfg.optim.schedule, "batch_size": self.tc.batch_size},
            "untuned": next(({k: e.get(k) for k in keep} for e in scored if e["step"] == 0), None),
            "best": None if best is None else {k: best.get(k) for k in keep},
            "last": {k: scored[-1].get(k) for k in keep} if scored else None,
            "test": test,
            "evals": [{k: e.get(k) for k in keep} for e in scored],
            "best_dir": str(self.run_dir / BEST_DIR),
        }


def _read_best(run_dir: Path) -> dict | None:
    path = Path(run_dir) / BEST_DIR / BEST_FILE
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None


def results_markdown(results: dict) -> str:
    """The results as a markdown table: untuned, best and last validation scores, and the best weights' test
    scores."""
    metrics = results["metrics"]
    head = "| | step | val loss | token accuracy | " + " | ".join(metrics) + " |"
    rule = "|---|---:|---:|---:|" + "---:|" * len(metrics)
    rows = []
    for label, rec in (("untuned (validation)", results.get("untuned")), ("best (validation)", results.get("best")),
                       ("last (validation)", results.get("last"))):
        if rec:
            rows.append(f"| {label} | {rec['step']} | {rec['val_loss']:.4f} | {rec['token_accuracy']:.2f} | "
                        + " | ".join(f"{rec.get(m, float('nan')):.2f}" for m in metrics) + " |")
    test = results.get("test") or {}
    if test:
        best_step = results["best"]["step"] if results.get("best") else "-"
        rows.append(f"| best (test, {test['examples']} examples) | {best_step} | - | - | "
                    + " | ".join(f"{test[m]:.2f}" for m in metrics) + " |")
    sizes = results["sizes"]
    title = (f"Fine-tuning on {results['task']} ({results['description']}): {sizes['train']} train / "
             f"{sizes['validation']} validation ({results['eval_examples']} scored per evaluation) / {sizes['test']} "
             f"test examples; metric {results['metric']} (0-100)")
    return "\n".join([title, "", head, rule, *rows, ""]) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Entry points


@dataclass
class FinetuneResult:
    """What ``finetune`` returns: the training result and the results written to ``finetune_results.json``."""

    train: TrainResult
    results: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.train.run_dir


def finetune_config(source_cfg: RunConfig, source: str, task: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The fine-tuning run's config: the source's, with ``FINETUNE_DEFAULTS``, then ``overrides``; named
    ``<source name>-<task>`` unless an override names it."""
    name = _slug(f"{source_cfg.name}-{Path(task).stem if not task.startswith('hf:') else task[3:]}")
    cfg = dataclasses.replace(source_cfg, name=name,
                              finetune=dataclasses.replace(source_cfg.finetune, source=source, task=task))
    return apply_overrides(cfg, [*FINETUNE_DEFAULTS, *overrides])


def finetune(source: str | None = None, task: str | None = None, overrides: Sequence[str] = (), *,
             resume: bool = False, run_dir: str | Path | None = None,
             print_fn: Callable[[str], None] = print) -> FinetuneResult:
    """Fine-tune ``source`` on ``task`` (a new run), or continue the run ``run_dir`` (``resume=True``).

    Args:
        source: run directory, transformers-format directory or Hub id (not with ``resume``).
        task: built-in task name, data file or directory, or ``hf:NAME[:CONFIG]`` (not with ``resume``).
        overrides: dotted config overrides, applied after ``FINETUNE_DEFAULTS``.
        resume: continue ``run_dir`` exactly from its newest checkpoint, with its own config.toml plus overrides.
        run_dir: the run directory (default ``<out_dir>/<source name>-<task>``, suffixed -2, -3... when taken).
        print_fn: where progress lines go.

    Raises:
        ConfigError, DataError, RunError, CheckpointError: bad settings, data, source or run (one-line messages).
        ModuleNotFoundError: a metric's package is missing (names ``switchformer[finetune]``).
    """
    if resume:
        if run_dir is None:
            raise ConfigError("--resume needs the fine-tuning run's directory")
        run_dir = Path(run_dir)
        if not (run_dir / "config.toml").is_file():
            raise RunError(f"{run_dir} is not a run directory (no config.toml); pass the fine-tuning run's directory")
        cfg = apply_overrides(load_toml(run_dir / "config.toml"), list(overrides))
        if not cfg.finetune.source:
            raise RunError(f"{run_dir} is not a fine-tuning run (its config has no finetune.source); resume it with "
                           "switchformer train --resume")
        from switchformer.data.tokenizer import Tokenizer

        tok_file = run_dir / "tokenizer" / "spiece.model"
        if not tok_file.is_file():
            raise RunError(f"{tok_file} is missing: resuming needs the run's tokenizer")
        tokenizer = Tokenizer.from_file(tok_file, num_sentinels=cfg.data.num_sentinels)
        state_dict = None
    else:
        if source is None or task is None:
            raise ConfigError("finetune needs SOURCE and --task TASK (or --resume RUN_DIR)")
        _check_metric_packages(task, overrides)
        src = load_source(source)
        cfg = finetune_config(src.cfg, source, task, overrides)
        tokenizer, state_dict = src.tokenizer, src.state_dict
        print_fn(f"fine-tuning {src.description} on {task}")
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    comp = build_finetune_components(cfg, device, tokenizer, state_dict, print_fn)
    result = train(cfg, resume=resume, run_dir=run_dir, components=comp, print_fn=print_fn,
                   trainer_cls=FinetuneTrainer)
    return FinetuneResult(result, json.loads((result.run_dir / RESULTS_JSON).read_text(encoding="utf-8")))


def _check_metric_packages(task: str, overrides: Sequence[str]) -> None:
    """Fail before any loading when the task's metrics need a package that is missing."""
    from switchformer.data.tasks import BUILTIN_TASKS, DEFAULT_METRIC

    metric = next((o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "finetune.metric"),
                  "auto")
    if metric != "auto":
        names: tuple[str, ...] = (metric,)
    else:
        names = BUILTIN_TASKS[task][2] if task in BUILTIN_TASKS else (DEFAULT_METRIC,)
    try:
        require(names)
    except ValueError as e:
        raise ConfigError(f"finetune.metric: {e}") from None


__all__ = ["FINETUNE_DEFAULTS", "FINETUNE_EXTRA", "FinetuneResult", "FinetuneTrainer", "finetune", "finetune_config",
           "load_source"]
