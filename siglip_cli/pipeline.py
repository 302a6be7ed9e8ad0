"""The run: sources -> decode workers -> batches -> encoder -> task -> sink, with progress and a summary."""

from __future__ import annotations

import datetime

import pyarrow as pa
import torch

from . import __version__
from .config import RunConfig
from .loader import Batch, batches
from .model import Encoder
from .progress import Progress, Summary, progress_enabled
from .sink import IMAGE_FIELDS, TEXT_FIELDS, check_writable, open_sink, scatter, vector_type
from .sources import iter_files
from .tasks import make_task


def default_batch_size(device: torch.device) -> int:
    """Large enough to keep a GPU busy and within 16 GB for so400m/384; small on a CPU for smooth progress."""
    return {"cuda": 256, "mps": 64}.get(device.type, 16)


def metadata(encoder: Encoder, extra: dict) -> dict:
    """The file metadata: enough to know, years later, what made the numbers."""
    info = encoder.info
    return {
        "tool": "siglip", "tool_version": __version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "model": info.name, "revision": info.revision, "commit": info.commit, "architecture": info.architecture,
        "dim": info.dim, "normalization": "l2", "preprocessing": info.preprocessing, "text_length": info.text_length,
        "dtype": str(encoder.dtype).removeprefix("torch."), "logit_scale": encoder.logit_scale,
        "logit_bias": encoder.logit_bias, **extra,
    }


def image_rows(schema: pa.Schema, batch: Batch, payload: dict) -> pa.RecordBatch:
    """One row per file of the batch, in order: the common columns, then the task's (null on error)."""
    items, n = batch.items, len(batch.items)
    common = [
        pa.array([d.path for d in items], pa.string()),
        pa.array(["error" if d.error else "ok" for d in items], pa.string()),
        pa.array([d.error for d in items], pa.string()),
        pa.array([d.width if d.width >= 0 else None for d in items], pa.int32()),
        pa.array([d.height if d.height >= 0 else None for d in items], pa.int32()),
    ]
    task_fields = list(schema)[len(common):]
    rest = [scatter(f, payload[f.name], batch.ok, n) if payload else pa.nulls(n, f.type) for f in task_fields]
    return pa.RecordBatch.from_arrays(common + rest, schema=schema)


def run(cfg: RunConfig) -> Summary:
    """Embed, tag or classify every input file; one row each, written as the run goes."""
    check_writable(cfg.output.path)
    encoder = Encoder(cfg.model)
    task = make_task(cfg.head, encoder)
    sink, schema = open_sink(cfg.output.path, IMAGE_FIELDS + task.fields(), metadata(encoder, task.metadata()))
    src = cfg.sources
    records = iter_files(src.paths, src.files_from, src.extensions)
    recount = None if src.files_from == "-" else lambda: sum(1 for _ in iter_files(src.paths, src.files_from, src.extensions))
    progress = Progress(progress_enabled(cfg.quiet), recount)
    batch_size = cfg.batch_size or default_batch_size(encoder.device)
    try:
        for batch in batches(records, encoder.spec, batch_size, cfg.workers, pin=encoder.device.type == "cuda"):
            payload = task.payload(encoder.encode_images(batch)) if batch.ok else {}
            sink.write(image_rows(schema, batch, payload))
            progress.advance(len(batch.ok), len(batch.items) - len(batch.ok))
    except BaseException:
        progress.close()
        sink.abort()
        raise
    sink.close()
    summary = progress.close()
    summary.output = cfg.output.path
    return summary


def run_texts(cfg: RunConfig, texts: list[str]) -> Summary:
    """Text embeddings in the image embeddings' space, one row per text."""
    check_writable(cfg.output.path)
    encoder = Encoder(cfg.model)
    field = pa.field("embedding", vector_type(encoder.info.dim, cfg.output.float16))
    sink, schema = open_sink(cfg.output.path, TEXT_FIELDS + [field], metadata(encoder, {"task": "embed-text"}))
    progress = Progress(progress_enabled(cfg.quiet), label="texts")
    try:
        emb = encoder.encode_texts(texts).cpu().numpy().astype("float16" if cfg.output.float16 else "float32")
        n = len(texts)
        sink.write(pa.RecordBatch.from_arrays(
            [pa.array(texts, pa.string()), pa.array(["ok"] * n), pa.nulls(n, pa.string()), scatter(field, emb, range(n), n)],
            schema=schema,
        ))
        progress.advance(n, 0)
    except BaseException:
        progress.close()
        sink.abort()
        raise
    sink.close()
    summary = progress.close()
    summary.output = cfg.output.path
    return summary
