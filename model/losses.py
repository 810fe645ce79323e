"""The one token negative log-likelihood of the project.

Every loss and every log-probability (pretraining and SFT cross-entropy, DPO's sequence log-probabilities,
held-out loss and bits per character) is computed here, in fp32, over *pre-shifted* targets:
``targets[b, t]`` is the token to predict at position ``t``; ``IGNORE_INDEX`` marks positions without loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL in nats, ``[B, T]`` (fp32), 0 where ``targets == IGNORE_INDEX``. ``logits``: ``[B, T, V]``."""
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(targets.shape)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(targets[b, t] | prefix)`` per position, 0 where ignored (``-token_nll``)."""
    return -token_nll(logits, targets)


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL summed over all target tokens (fp32 scalar) and their number (the trainer's loss numerator)."""
    return token_nll(logits, targets).sum(), (targets != IGNORE_INDEX).sum()


def sequence_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: NLL summed over its target tokens ``[B]`` and their number ``[B]``."""
    return token_nll(logits, targets).sum(-1), (targets != IGNORE_INDEX).sum(-1)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face ``labels`` (aligned with the inputs) -> pre-shifted targets (no copy of the logits)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
