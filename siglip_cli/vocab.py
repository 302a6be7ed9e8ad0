"""Vocabulary and label files, prompt templates, and the on-disk cache of text embeddings.

Parsing is light (the CLI calls it before loading anything heavy); torch is imported only to embed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass

from .errors import UsageError

CACHE_VERSION = 1


@dataclass(frozen=True)
class Vocab:
    """Tags as the user spelled them, and an optional threshold for each (None: use the global one)."""

    tags: tuple[str, ...]
    thresholds: tuple[float | None, ...]


def parse_vocab(lines, source: str, allow_thresholds: bool = True, comments: bool = True) -> Vocab:
    """One tag a line; blank lines and '#' comments ignored (in files: `--labels '#1,#2'` are labels); spaces
    stripped; 'tag<TAB>0.05' sets a threshold.

    Duplicates (compared lowercased, as the model sees them) are dropped with one warning on stderr.
    """
    tags, thresholds, seen, dropped = [], [], set(), []
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip() or (comments and line.lstrip().startswith("#")):
            continue
        tag, _, threshold = line.partition("\t")
        tag = tag.strip()
        if not tag:
            raise UsageError(f"{source}, line {number}: a threshold without a tag")
        value = None
        if threshold.strip():
            if not allow_thresholds:
                raise UsageError(f"{source}, line {number}: labels take no threshold")
            try:
                value = float(threshold)
            except ValueError:
                value = -1.0
            if not 0.0 <= value <= 1.0:
                raise UsageError(
                    f"{source}, line {number}: threshold {threshold.strip()!r} is not a number from 0 to 1"
                )
        if tag.lower() in seen:
            dropped.append(tag)
            continue
        seen.add(tag.lower())
        tags.append(tag)
        thresholds.append(value)
    if not tags:
        raise UsageError(f"{source} holds no tags (one tag a line; '#' starts a comment)")
    if dropped:
        shown = ", ".join(repr(t) for t in dropped[:5]) + (" ..." if len(dropped) > 5 else "")
        print(f"siglip: warning: {source}: dropped {len(dropped)} duplicate(s): {shown}", file=sys.stderr)
    return Vocab(tuple(tags), tuple(thresholds))


def read_vocab(path: str, allow_thresholds: bool = True) -> Vocab:
    """Parse a vocabulary (or label) file; an unreadable or empty one is a usage error (exit 2)."""
    from .sources import text_lines

    return parse_vocab(text_lines(path, "the vocabulary"), path, allow_thresholds)


def check_templates(templates: tuple[str, ...]) -> tuple[str, ...]:
    """Each prompt template must hold exactly one '{}' where the tag goes."""
    for t in templates:
        if t.count("{}") != 1:
            raise UsageError(f"template {t!r} must contain '{{}}' exactly once, where the tag goes")
    return templates


def cache_dir() -> str:
    """$SIGLIP_CACHE_DIR, else $XDG_CACHE_HOME/siglip, else ~/.cache/siglip."""
    if os.environ.get("SIGLIP_CACHE_DIR"):
        return os.environ["SIGLIP_CACHE_DIR"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "siglip")


def cache_key(model_fingerprint: str, dtype: str, text_length: int, tags, templates, rules: str) -> str:
    """Everything that changes the text embeddings, hashed."""
    blob = json.dumps([CACHE_VERSION, model_fingerprint, dtype, text_length, list(templates), list(tags), rules])
    return hashlib.sha256(blob.encode()).hexdigest()


def text_embeddings(encoder, tags: tuple[str, ...], templates: tuple[str, ...], use_cache: bool = True):
    """(n_tags, D) normalized embeddings on the encoder's device: one per tag, averaged over the templates.

    Cached on disk by model, dtype, templates and vocabulary, so that a nightly run does not recompute them.
    """
    import numpy as np
    import torch

    from .heads import ensemble

    def where() -> str:  # by what computes them (a text tower that cannot be converted falls back to torch)
        key = cache_key(
            encoder.fingerprint, encoder.text_kind, encoder.info.text_length, tags, templates, encoder.text_rules
        )
        return os.path.join(cache_dir(), "text", key + ".npy")

    path = where()
    if use_cache and os.path.exists(path):
        try:
            cached = np.load(path, allow_pickle=False)
            # what a cache entry must be: as written, one finite float32 vector per tag, of the model's size;
            # anything else (cut short, another writer's array or file) is recomputed and rewritten, never scored
            if (
                isinstance(cached, np.ndarray)
                and cached.shape == (len(tags), encoder.info.dim)
                and cached.dtype == np.float32
                and np.isfinite(cached).all()
            ):
                return torch.from_numpy(cached).to(encoder.device)
        except Exception:
            pass
    per_template = torch.stack([encoder.encode_texts([t.format(tag) for tag in tags]) for t in templates])
    emb = ensemble(per_template)
    path = where()
    if use_cache:
        from .scratch import scratch

        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with scratch(os.path.dirname(path)) as folder:
                with open(os.path.join(folder, "text.npy"), "wb") as f:
                    np.save(f, emb.cpu().numpy())
                os.replace(f.name, path)
        except OSError as e:  # a read-only or full cache costs time, not the run
            print(f"siglip: warning: cannot write the text-embedding cache {path}: {e.strerror or e}", file=sys.stderr)
    return emb
