"""Losses: token cross-entropy sums for exact evaluation, and the training objective's composition.

The model already returns ``out.loss = lm_loss + aux_loss_coef * mean(load_balancing) + z_loss_coef * mean(z)``
(paper §2.2, Eq. 4; alpha = 0.01). Evaluation needs the *sum* of token NLLs so that several batches average per
token (the paper's negative log perplexity, in nats: footnote 4), which ``token_nll`` provides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from switchformer.config import IGNORE_INDEX


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over the real (label != -100) targets.

    Args:
        logits: [batch, seq, vocab] scores (any float dtype; computed in float32).
        labels: [batch, seq] int64 target ids, -100 where there is no target, aligned with ``logits``
            (for a decoder-only model the caller passes ``logits[:, :-1]`` and ``labels[:, 1:]``).

    Returns:
        (nll_sum, num_tokens): float32 scalar sum of -log p(label), int64 scalar count of real targets.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (labels != IGNORE_INDEX).sum()

