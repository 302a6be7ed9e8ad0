"""The torch towers of a checkpoint: one tower of a whole model called as a tower is, and the text tower that
embeds texts on torch (loaded the first time texts are encoded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class WholeTower(torch.nn.Module):
    """One tower of a whole SiglipModel / Siglip2Model, called as a tower is (its output has `pooler_output`)."""

    def __init__(self, model, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, **inputs):
        return getattr(self.model, self.method)(**inputs)


class TorchText:
    """The checkpoint's text tower on torch, loaded the first time texts are encoded (or given: a whole model's)."""

    backend = "torch"

    def __init__(self, encoder, model=None):
        self.encoder, self.model = encoder, model

    @property
    def kind(self) -> str:
        """What decides the text embeddings' numbers (the vocabulary cache's key)."""
        return str(self.encoder.text_dtype)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        e = self.encoder
        if self.model is None:
            self.model = e.load_text(e.text_dtype).to(e.device).eval()
        # No attention mask: the text tower was trained without one, and passing it changes the embedding.
        feats = self.model(input_ids=e.tokenize(texts).to(e.device))
        return F.normalize(feats.pooler_output.float(), dim=-1)
