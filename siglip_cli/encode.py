"""One batch through the encoder, and what an output records of the encoder: shared by the local run
(pipeline.py), the Ray actors (cluster.py) and the server's batcher."""

from __future__ import annotations

import datetime
import sys

import numpy as np
import torch

from . import __version__
from .decode import Decoded
from .loader import Batch, collate
from .model import Encoder
from .worker import pixel_shape


def made_with(openvino: bool) -> dict[str, str]:
    """The versions of the packages that compute the numbers (OpenVINO's and NNCF's when they ran)."""
    import importlib.metadata

    names = ("torch", "transformers") + (("openvino", "nncf") if openvino else ())
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def metadata(encoder: Encoder, extra: dict) -> dict:
    """The file metadata: enough to know, years later, what made the numbers."""
    info = encoder.info
    return {
        "versions": encoder.versions  # (a remote tower: the server's)
        if encoder.backend == "remote"
        else made_with("openvino" in (encoder.backend, encoder.text_backend)),
        "tool": "siglip",
        "tool_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "model": info.name,
        "revision": info.revision,
        "commit": info.commit,
        "architecture": info.architecture,
        "dim": info.dim,
        "normalization": "l2",
        "preprocessing": info.preprocessing,
        "text_length": info.text_length,
        "dtype": str(encoder.dtype).removeprefix("torch."),
        "backend": encoder.backend,
        "quantize": encoder.quantize,
        "quantize_check": getattr(encoder.tower, "check", None),
        "text_backend": encoder.text_backend,
        "text_rules": encoder.text_rules,
        "logit_scale": encoder.logit_scale,
        "logit_bias": encoder.logit_bias,
        **extra,
    }


def finite(batch: Batch, arrays: dict) -> tuple[dict, list[int]]:
    """The arrays and indices of the batch's images whose results are all finite numbers; every other image
    becomes an error row (float16 overflows to inf and NaN: a wrong row must never pass for a right one)."""
    if not batch.ok:  # (every item refused by a --server)
        return arrays, []
    good = np.ones(len(batch.ok), bool)
    for values in arrays.values():
        good &= np.isfinite(values.reshape(len(good), -1)).all(axis=1)
    if good.all():
        return arrays, batch.ok
    for j in np.flatnonzero(~good):
        d = batch.items[batch.ok[j]]
        d.error = (
            "the model gave NaN or infinite values for this image (a float16/bfloat16 overflow?); "
            "--dtype float32 avoids it (into a new output, or with --overwrite)"
        )
    return {k: v[good] for k, v in arrays.items()}, [i for i, g in zip(batch.ok, good) if g]


def out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or MPS's RuntimeError saying the same."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "MPS backend out of memory" in str(error)
    )


def launch(encoder: Encoder, task, batch: Batch, batch_size: int):
    """Start a batch on the encoder's device; returns the function that waits for its arrays. Out of memory,
    the batch is redone in smaller chunks (Encoder.shrink), and so are the batches after it; said once."""
    before = encoder.chunk
    while True:
        try:
            with encoder.on_device():  # the task's work too: every allocation of this batch on its own GPU
                wait = encoder.to_host(task.device(encoder.encode_images(batch)))
            break
        except Exception as e:
            if not out_of_memory(e):
                raise
            encoder.shrink(e, batch_size)  # a RunError at one image
    if encoder.chunk != before:
        print(
            f"siglip: {encoder.device} ran out of memory at batch size {before or batch_size}; going on in "
            f"batches of {encoder.chunk} (--batch-size sets it)",
            file=sys.stderr,
        )
    return wait


def embed_decoded(encoder: Encoder, items: list[Decoded], batch_size: int) -> np.ndarray:
    """Embeddings of decoded images (float32, L2-normalized), given to the encoder as the CLI's loader does."""
    from .tasks import EmbedSpec, EmbedTask

    spec = encoder.spec
    pixels = torch.empty((len(items), *pixel_shape(spec)), dtype=torch.uint8)
    dst = pixels.numpy()
    for i, d in enumerate(items):
        dst[i, : len(d.pixels)] = d.pixels
    batch = collate(spec, pixels, list(items), list(range(len(items))), [d.grid for d in items])
    return launch(encoder, EmbedTask(EmbedSpec(), encoder), batch, batch_size)()["embedding"]
