"""Pure functions for the math: normalization, sigmoid scores, ensembles, selection. No I/O.

They take and return torch tensors and run on whatever device the tensors are on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalize the last dimension."""
    return F.normalize(x.float(), dim=-1)


def sigmoid_scores(images: torch.Tensor, texts: torch.Tensor, logit_scale: float, logit_bias: float) -> torch.Tensor:
    """The model's own probability that each text matches each image: (n_images, n_texts).

    sigmoid(exp(logit_scale) * cos + logit_bias), with `logit_scale` already exponentiated. Both inputs must be
    L2-normalized. Never a softmax: SigLIP scores each pair independently.
    """
    return torch.sigmoid(images @ texts.T * logit_scale + logit_bias)


def ensemble(per_template: torch.Tensor) -> torch.Tensor:
    """(n_templates, n_texts, D) normalized text embeddings -> (n_texts, D): mean over templates, renormalized."""
    return normalize(per_template.mean(dim=0))


def rank(scores: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the k best scores (None: all) and their text indices, highest first. No host sync."""
    k = scores.shape[1] if k is None else min(k, scores.shape[1])
    return scores.topk(k, dim=1)


def kept(values, indices, thresholds):
    """Which ranked (value, index) pairs reach their text's own threshold: a boolean mask of values' shape.

    Works on torch tensors and numpy arrays alike (the pipeline calls it on the host copies).
    """
    return values >= thresholds[indices]
