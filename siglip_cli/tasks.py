"""What each command computes from a batch of image embeddings, and the output columns it fills."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from .config import DEFAULT_TEMPLATE, DEFAULT_THRESHOLD
from .heads import select, sigmoid_scores
from .model import Encoder
from .sink import vector_type
from .vocab import Vocab, text_embeddings


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


@dataclass(frozen=True)
class TagSpec:
    """`siglip tag`: sigmoid scores against a vocabulary, thresholded and ranked."""

    vocab: Vocab
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    threshold: float = DEFAULT_THRESHOLD
    top_k: int | None = None
    all_scores: bool = False
    with_embeddings: bool = False
    float16: bool = False
    cache: bool = True


@dataclass(frozen=True)
class ClassifySpec:
    """`siglip classify`: the best of a few labels, with the same prompts and scores as tag."""

    labels: tuple[str, ...]
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    top_k: int = 5
    cache: bool = True


def _pairs(rows, idx, score, names, n: int, key: str) -> list[list[dict]]:
    """Flat (image, text, score) triples back to one ranked list of {key, score} per image."""
    out = [[] for _ in range(n)]
    for r, i, s in zip(rows.tolist(), idx.tolist(), score.tolist()):
        out[r].append({key: names[i], "score": s})
    return out


def _scored_list(key: str) -> pa.DataType:
    return pa.list_(pa.struct([pa.field(key, pa.string()), pa.field("score", pa.float32())]))


class TagTask:
    """Writes `tags` (and on request the dense scores and the embedding)."""

    def __init__(self, spec: TagSpec, encoder: Encoder):
        self.spec, self.encoder = spec, encoder
        self.tags = spec.vocab.tags
        self.text = text_embeddings(encoder, self.tags, spec.templates, spec.cache)
        self.thresholds = torch.tensor(
            [spec.threshold if t is None else t for t in spec.vocab.thresholds], device=encoder.device
        )
        self.embed = EmbedTask(EmbedSpec(spec.float16), encoder) if spec.with_embeddings else None

    def fields(self) -> list[pa.Field]:
        fields = [pa.field("tags", _scored_list("tag"))]
        if self.spec.all_scores:
            fields.append(pa.field("scores", vector_type(len(self.tags), float16=True)))
        return fields + (self.embed.fields() if self.embed else [])

    def metadata(self) -> dict:
        s = self.spec
        meta = {"task": "tag", "templates": list(s.templates), "threshold": s.threshold, "top_k": s.top_k,
                "n_tags": len(self.tags), "score": "sigmoid(exp(logit_scale) * cos + logit_bias)"}
        if s.all_scores:  # the dense vector's columns
            meta["vocabulary"] = list(self.tags)
        return meta

    def payload(self, embeddings: torch.Tensor) -> dict:
        scores = sigmoid_scores(embeddings, self.text, self.encoder.logit_scale, self.encoder.logit_bias)
        rows, idx, score = (t.cpu() for t in select(scores, self.thresholds, self.spec.top_k))
        out = {"tags": _pairs(rows, idx, score, self.tags, len(embeddings), "tag")}
        if self.spec.all_scores:
            out["scores"] = scores.half().cpu().numpy()
        if self.embed:
            out.update(self.embed.payload(embeddings))
        return out


class ClassifyTask:
    """Writes `label`, `score` and the ranked `top_k`."""

    def __init__(self, spec: ClassifySpec, encoder: Encoder):
        self.spec, self.encoder = spec, encoder
        self.text = text_embeddings(encoder, spec.labels, spec.templates, spec.cache)
        self.none = torch.zeros(len(spec.labels), device=encoder.device)  # no threshold: rank only

    def fields(self) -> list[pa.Field]:
        return [pa.field("label", pa.string()), pa.field("score", pa.float32()), pa.field("top_k", _scored_list("label"))]

    def metadata(self) -> dict:
        return {"task": "classify", "templates": list(self.spec.templates), "labels": list(self.spec.labels),
                "score": "sigmoid(exp(logit_scale) * cos + logit_bias)"}

    def payload(self, embeddings: torch.Tensor) -> dict:
        scores = sigmoid_scores(embeddings, self.text, self.encoder.logit_scale, self.encoder.logit_bias)
        rows, idx, score = (t.cpu() for t in select(scores, self.none, self.spec.top_k))
        top = _pairs(rows, idx, score, self.spec.labels, len(embeddings), "label")
        return {"label": [t[0]["label"] for t in top], "score": [t[0]["score"] for t in top], "top_k": top}


def make_task(spec, encoder: Encoder):
    """The runtime for a task spec built by the CLI."""
    kind = {EmbedSpec: EmbedTask, TagSpec: TagTask, ClassifySpec: ClassifyTask}[type(spec)]
    return kind(spec, encoder)
