"""What each command computes from a batch of image embeddings, and the output columns it fills."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from .model import Encoder
from .sink import vector_type


@dataclass(frozen=True)
class EmbedSpec:
    """`siglip embed`: the L2-normalized image embedding."""

    float16: bool = False


class EmbedTask:
    """Writes the embedding column."""

    def __init__(self, spec: EmbedSpec, encoder: Encoder):
        self.field = pa.field("embedding", vector_type(encoder.info.dim, spec.float16))
        self.np_dtype = "float16" if spec.float16 else "float32"

    def fields(self) -> list[pa.Field]:
        return [self.field]

    def metadata(self) -> dict:
        return {"task": "embed", "embedding_dtype": self.np_dtype}

    def payload(self, embeddings: torch.Tensor) -> dict:
        """Column values for the images of the batch that decoded, in order."""
        return {"embedding": embeddings.cpu().numpy().astype(self.np_dtype)}


def make_task(spec, encoder: Encoder):
    """The runtime for a task spec built by the CLI."""
    if isinstance(spec, EmbedSpec):
        return EmbedTask(spec, encoder)
    raise TypeError(f"unknown task {spec!r}")
