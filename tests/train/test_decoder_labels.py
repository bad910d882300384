"""Decoder-only batches, the model's training loss and the validation metric all agree on the label alignment."""

import numpy as np
import torch

from switchformer.config import ModelConfig, MoEConfig
from switchformer.data.loader import BatchLoader
from switchformer.models import build_model
from switchformer.train.loop import evaluate


def test_decoder_only_train_loss_equals_validation_nll():
    tokens = np.random.default_rng(0).integers(3, 60, size=3000).astype(np.int32)
    loader = BatchLoader(tokens, batch_size=3, input_length=16, arch="decoder_only", split="train", seed=0)
    batch = next(loader)
    cfg = ModelConfig(arch="decoder_only", vocab_size=64, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2,
                      dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      moe=MoEConfig(num_experts=4, capacity_factor=None, eval_capacity_factor=None))
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(**batch)
    metrics = evaluate(model, [batch], torch.device("cpu"))
    assert abs(metrics["val_loss"] - out.lm_loss.item()) < 1e-5
    # and it is next-token prediction: recompute from the logits by hand
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    manual = -logp.gather(-1, batch["input_ids"][:, 1:, None]).mean()
    assert abs(manual.item() - out.lm_loss.item()) < 1e-5
