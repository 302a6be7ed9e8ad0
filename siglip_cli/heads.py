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


def select(
    scores: torch.Tensor, thresholds: torch.Tensor, top_k: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (image, text, score) triples to keep, grouped by image and highest score first within an image.

    A text is kept for an image when its score reaches the text's own threshold and it is among the image's
    top_k texts (None: no limit). Flat triples keep the copy to the host small: only what is kept moves.
    """
    k = scores.shape[1] if top_k is None else min(top_k, scores.shape[1])
    top, idx = scores.topk(k, dim=1)
    rows, cols = (top >= thresholds[idx]).nonzero(as_tuple=True)
    return rows, idx[rows, cols], top[rows, cols]
