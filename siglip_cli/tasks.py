"""What each command computes from a batch of image embeddings, and the output columns it fills."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
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
    """Writes the embedding column.

    Every task splits its work in two: `device()` launches the GPU work for a batch without waiting for it;
    `host()` turns the copied-back arrays into column values, while the device runs the next batch.
    """

    def __init__(self, spec: EmbedSpec, encoder: Encoder):
        self.field = pa.field("embedding", vector_type(encoder.info.dim, spec.float16))
        self.np_dtype = "float16" if spec.float16 else "float32"

    def fields(self) -> list[pa.Field]:
        return [self.field]

    def on(self, encoder: Encoder) -> "EmbedTask":
        """This task for another device's encoder (no device state: itself)."""
        return self

    def metadata(self) -> dict:
        return {"task": "embed", "embedding_dtype": self.np_dtype}

    def device(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """Device tensors to copy back for a batch (launched, not waited for)."""
        return {"embedding": embeddings.to(torch.float16 if self.np_dtype == "float16" else torch.float32)}

    def host(self, arrays: dict) -> dict:
        """Column values for the images of the batch that decoded, in order."""
        return {"embedding": arrays["embedding"]}


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


def _pairs(selected, names: pa.Array, key: str) -> pa.Array:
    """select()'s (indices, scores) per image as a list<struct<key, score>> column, built without a Python
    object per pair."""
    offsets = np.zeros(len(selected) + 1, np.int32)
    np.cumsum([len(idx) for idx, _ in selected], out=offsets[1:])
    idx = np.concatenate([i for i, _ in selected]) if selected else np.zeros(0, np.int64)
    val = np.concatenate([v for _, v in selected]).astype(np.float32) if selected else np.zeros(0, np.float32)
    pairs = pa.StructArray.from_arrays([names.take(pa.array(idx)), pa.array(val)], names=[key, "score"])
    return pa.ListArray.from_arrays(pa.array(offsets), pairs, type=_scored_list(key))


def _scored_list(key: str) -> pa.DataType:
    return pa.list_(pa.struct([pa.field(key, pa.string()), pa.field("score", pa.float32())]))


class _Scored:
    """A task that scores embeddings against text embeddings held on the encoder's device."""

    encoder: Encoder
    text: torch.Tensor

    def on(self, encoder: Encoder):
        """This task for another device's encoder: the text embeddings copied to that device."""
        twin = copy.copy(self)
        twin.encoder, twin.text = encoder, self.text.to(encoder.device)
        return twin


class TagTask(_Scored):
    """Writes `tags` (and on request the dense scores and the embedding)."""

    def __init__(self, spec: TagSpec, encoder: Encoder):
        self.spec, self.encoder = spec, encoder
        self.tags = spec.vocab.tags
        self.names = pa.array(self.tags, pa.string())
        self.text = text_embeddings(encoder, self.tags, spec.templates, spec.cache)
        self.thresholds = np.array([spec.threshold if t is None else t for t in spec.vocab.thresholds], np.float32)
        self.embed = EmbedTask(EmbedSpec(spec.float16), encoder) if spec.with_embeddings else None

    def fields(self) -> list[pa.Field]:
        fields = [pa.field("tags", _scored_list("tag"))]
        if self.spec.all_scores:
            fields.append(pa.field("scores", vector_type(len(self.tags), float16=True)))
        return fields + (self.embed.fields() if self.embed else [])

    def metadata(self) -> dict:
        s = self.spec
        meta = {
            "task": "tag",
            "templates": list(s.templates),
            "threshold": s.threshold,
            "top_k": s.top_k,
            "n_tags": len(self.tags),
            "score": "sigmoid(exp(logit_scale) * cos + logit_bias)",
        }
        if s.all_scores:  # the dense vector's columns
            meta["vocabulary"] = list(self.tags)
        return meta

    def device(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        # One matrix product per batch on the device; selection happens on the host (heads.select).
        out = {"scores": sigmoid_scores(embeddings, self.text, self.encoder.logit_scale, self.encoder.logit_bias)}
        if self.embed:
            out.update(self.embed.device(embeddings))
        return out

    def host(self, arrays: dict) -> dict:
        scores = arrays["scores"]
        out = {"tags": _pairs(select(scores, self.thresholds, self.spec.top_k), self.names, "tag")}
        if self.spec.all_scores:
            out["scores"] = scores.astype(np.float16)
        if self.embed:
            out.update(self.embed.host(arrays))
        return out


class ClassifyTask(_Scored):
    """Writes `label`, `score` and the ranked `top_k`."""

    def __init__(self, spec: ClassifySpec, encoder: Encoder):
        self.spec, self.encoder = spec, encoder
        self.text = text_embeddings(encoder, spec.labels, spec.templates, spec.cache)
        self.none = np.zeros(len(spec.labels), np.float32)  # no threshold: rank only
        self.names = pa.array(spec.labels, pa.string())

    def fields(self) -> list[pa.Field]:
        return [
            pa.field("label", pa.string()),
            pa.field("score", pa.float32()),
            pa.field("top_k", _scored_list("label")),
        ]

    def metadata(self) -> dict:
        return {
            "task": "classify",
            "templates": list(self.spec.templates),
            "labels": list(self.spec.labels),
            "score": "sigmoid(exp(logit_scale) * cos + logit_bias)",
        }

    def device(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": sigmoid_scores(embeddings, self.text, self.encoder.logit_scale, self.encoder.logit_bias)}

    def host(self, arrays: dict) -> dict:
        selected = select(arrays["scores"], self.none, self.spec.top_k)
        return {
            "label": [self.spec.labels[idx[0]] for idx, _ in selected],
            "score": [val[0] for _, val in selected],
            "top_k": _pairs(selected, self.names, "label"),
        }


def make_task(spec, encoder: Encoder):
    """The runtime for a task spec built by the CLI."""
    kind = {EmbedSpec: EmbedTask, TagSpec: TagTask, ClassifySpec: ClassifyTask}[type(spec)]
    return kind(spec, encoder)
