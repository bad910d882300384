"""Router entropy has one definition in training logs and evaluation: the mean entropy of the router distribution
over the rows of real (non-padding) tokens."""

import math

import pytest
import torch

from switchformer.config import ModelConfig, MoEConfig
from switchformer.metrics import RouterEntropyProbe, router_entropy_sum
from switchformer.models import build_model
from switchformer.moe import SwitchFFN
from switchformer.train.loop import LogWindow, evaluate, routed_forward

PAD_FROM = 5  # the second sequence's encoder tokens from this position on are padding


def _model() -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                      dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      moe=MoEConfig(num_experts=4, exploration="argmax", capacity_factor=None,
                                    eval_capacity_factor=None))
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # a confident router: entropies well away from the uniform log(4)
        for name, p in model.named_parameters():
            if "router" in name:
                p.mul_(8.0)
    return model


def _batch(pad_content: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 128, (2, 12), generator=g)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, PAD_FROM:] = 0
    input_ids[1, PAD_FROM:] = pad_content
    labels = torch.randint(3, 128, (2, 6), generator=g)
    decoder_input_ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), labels[:, :-1]], 1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
            "labels": labels}


def _all_rows_entropy(model, batch) -> float:
    """The entropy averaged over every routed row, padding included (what the one definition excludes)."""
    sums = []

    def hook(mod, args, out):
        sums.append(router_entropy_sum(out[1].router_probs))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, SwitchFFN)]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    return sum(s for s, _ in sums) / sum(n for _, n in sums)


def test_router_entropy_ignores_padding_rows():
    """Real tokens do not see padding (masked attention), so an entropy over real rows cannot depend on what the
    padding positions hold; one that counted padding rows would."""
    model = _model().eval()
    zeros, noise = _batch(torch.zeros(12 - PAD_FROM, dtype=torch.long)), _batch(torch.arange(60, 60 + 12 - PAD_FROM))
    a, b = evaluate(model, [zeros], torch.device("cpu")), evaluate(model, [noise], torch.device("cpu"))
    assert a["router_entropy"] == pytest.approx(b["router_entropy"], rel=1e-5, abs=1e-6)
    assert 0 < a["router_entropy"] <= math.log(4) + 1e-6
    # the test discriminates: the padding rows' entropies do change with their content
    assert abs(_all_rows_entropy(model, zeros) - _all_rows_entropy(model, noise)) > 1e-3
    # and the count is that of the real routed tokens: encoder 12 + 5, decoder 2 * 6, one sparse block each
    with RouterEntropyProbe(model) as probe, torch.no_grad():
        model(**zeros)
    assert probe.sums()[1] == (12 + PAD_FROM) + 2 * 6


def test_training_logs_and_evaluation_measure_router_entropy_alike():
    """The training step's router entropy (same batch, before its update; argmax routing, no dropout, so a
    training-mode forward routes like an evaluation one) equals evaluation's."""
    model = _model()
    batch = _batch(torch.zeros(12 - PAD_FROM, dtype=torch.long))
    ev = evaluate(model, [batch], torch.device("cpu"))
    window = LogWindow()
    model.train()
    out, entropy = routed_forward(model, batch)
    window.router.add(out.router, entropy)
    assert window.router.summary()["router_entropy"] == pytest.approx(ev["router_entropy"], rel=1e-5)
