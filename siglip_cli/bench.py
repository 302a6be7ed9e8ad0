"""`siglip bench`: the model alone (the ceiling), decoding alone, and the whole pipeline, on one device."""

from __future__ import annotations

import dataclasses
import itertools
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import ARCHS, ModelConfig, RunConfig
from .decode import decode_photos
from .devices import resolve_backend, resolve_device, resolve_dtype
from .loader import chunk_size, decoded_chunks, pixel_shape
from .model import Encoder


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark: a model (or an architecture with random weights), the images, and the run settings."""

    run: RunConfig  # model, device, dtype, batch size, workers, --compile, --exact
    arch: str | None = None
    images: int | None = None  # files to push through; default 20 batches
    seconds: float = 3.0  # at least this long for the ceiling


def random_encoder(arch: str, cfg: ModelConfig, batch_size: int) -> Encoder:
    """The named architecture with random weights, built on the device: no download."""
    from types import SimpleNamespace

    from transformers import AutoModel, GemmaTokenizer, SiglipConfig

    from .checkpoint import hf_quiet

    hf_quiet(False)
    hidden, mlp, layers, heads, patch, size = ARCHS[arch]
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    backend = resolve_backend(cfg, device, naflex=False)
    torch.manual_seed(0)  # the same random weights in every run: backends compare, conversions cache
    config = SiglipConfig(
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            patch_size=patch,
            image_size=size,
        ),
        # the text tower does not take part in image throughput: keep it minimal
        text_config=dict(
            vocab_size=512,
            hidden_size=hidden,
            intermediate_size=mlp,
            num_hidden_layers=1,
            num_attention_heads=heads,
            max_position_embeddings=64,
            projection_size=hidden,
        ),
    )
    with torch.device(device):
        # built in float32 then cast, so that every dtype has the same weights (rounded)
        model = AutoModel.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        # so400m's trained scale (exp 4.72 = 112) and bias: tag scores of random weights then fall below any
        # threshold, as most of a vocabulary does on a real photo, instead of all sitting near 0.5.
        model.logit_scale.data.fill_(4.72)
        model.logit_bias.data.fill_(-16.5)
    load = torch.float32 if backend == "openvino" else dtype
    model = model.to(load)
    # what Encoder reads of a processor: the recipe of the fixed-resolution SigLIP 2 checkpoints
    processor = SimpleNamespace(
        size={"height": size, "width": size},
        resample=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        rescale_factor=1 / 255,
    )
    # A byte-level Gemma tokenizer: enough to embed a vocabulary when measuring `tag`.
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    vocab.update({f"<0x{i:02X}>": 6 + i for i in range(256)})
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=False, add_eos_token=True)
    from .config import usable_cpus

    ov = dict(dtype=dtype, quantize=cfg.quantize, threads=usable_cpus(), batch=batch_size, bound=cfg.int8_bound)
    name = dataclasses.replace(cfg, name=f"random:{arch}")
    return Encoder(model, processor, tokenizer, name, device, load, openvino=ov if backend == "openvino" else None)


def synthetic_photos(folder: str, n: int = 64) -> list[str]:
    """n distinct 500x375 JPEGs (smooth shapes plus noise, about the size of web photos)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    paths = []
    for i in range(n):
        base = np.stack([np.sin(xx / rng.uniform(5, 60) + c) * np.cos(yy / rng.uniform(5, 60)) for c in range(3)], -1)
        img = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        paths.append(os.path.join(folder, f"synthetic{i:03d}.jpg"))
        Image.fromarray(img).save(paths[-1], quality=90)
    return paths


def bench_images(cfg: RunConfig, folder: str, most: int = 512) -> tuple[list[str], bool]:
    """The images given that decode (at most `most` of them), or, given none, generated ones in folder; and
    whether they were generated. Images given of which none decodes are an error: a benchmark of error rows
    measures nothing (it timed them, and a missing folder silently timed generated photos)."""
    from PIL import Image

    from .errors import UsageError
    from .sources import iter_files, missing

    src = cfg.sources
    if not src.paths:
        return synthetic_photos(folder), True
    if gone := [p for p in src.paths if missing(p)]:
        raise UsageError(f"{', '.join(gone)}: no such file or folder")
    paths, bad = [], 0
    for r in iter_files(src.paths, None, src.extensions):
        if len(paths) >= most:
            break
        try:
            if r.error is not None:
                raise OSError(r.error)
            with Image.open(r.path) as im:
                im.load()
            paths.append(r.path)
        except Exception:
            bad += 1
    if not paths:
        raise UsageError(
            f"no image in {', '.join(src.paths)} can be decoded"
            + (f" ({bad} tried)" if bad else "")
            + "; bench makes its own photos when given none"
        )
    if bad:
        print(f"siglip: note: {bad} of the images given cannot be decoded; bench leaves them out", file=sys.stderr)
    return paths, False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def ceiling(encoder: Encoder, batch_size: int, seconds: float, sample: np.ndarray | None = None) -> tuple[float, float]:
    """Images/s of the image tower alone on pixels already on the device; and the first call's seconds.

    sample: real decoded photos (fixed-size checkpoints), repeated to a batch; they also calibrate --quantize int8.
    """
    shape = pixel_shape(encoder.spec)
    if sample is not None and not encoder.naflex:
        x = torch.from_numpy(np.resize(sample, (batch_size, *shape))).to(encoder.device)
    else:
        x = torch.randint(0, 256, (batch_size, *shape), dtype=torch.uint8, device=encoder.device)
    args = [x]
    if encoder.naflex:
        side = int(encoder.spec.max_patches**0.5)
        args += [
            torch.ones(batch_size, shape[0], dtype=torch.int32, device=encoder.device),
            torch.tensor([[side, shape[0] // side]] * batch_size),
            True,
        ]  # every patch real: no mask
    with encoder.on_device():
        return timed(encoder, args, batch_size, seconds)


def timed(encoder: Encoder, args: list, batch_size: int, seconds: float) -> tuple[float, float]:
    t = time.perf_counter()
    encoder.tower(*args)
    sync(encoder.device)
    first = time.perf_counter() - t
    for _ in range(2):
        encoder.tower(*args)
    sync(encoder.device)
    n, t = 0, time.perf_counter()
    while n < 5 or time.perf_counter() - t < seconds:
        encoder.tower(*args)
        n += 1
        if n % 5 == 0:
            sync(encoder.device)
    sync(encoder.device)
    return n * batch_size / (time.perf_counter() - t), first


def decode_rate(records, spec, workers: int, batch_size: int, timeout: float) -> float:
    """Images/s of reading and decoding alone, with the run's worker processes (their start included)."""
    t = time.perf_counter()
    n = sum(len(c) for c in decoded_chunks(records, spec, workers, chunk_size(batch_size, workers), timeout))
    return n / (time.perf_counter() - t)


def end_to_end(cfg: RunConfig, encoder: Encoder, records, folder: str) -> float:
    """Images/s of the whole pipeline (decode, encode, task, Parquet), model already loaded."""
    from .index import Store
    from .pipeline import process
    from .progress import Progress

    store = Store.open(os.path.join(folder, f"out-{type(cfg.head).__name__}"), {"bench": type(cfg.head).__name__})
    try:
        progress = Progress(False)
        t = time.perf_counter()
        process(cfg, store, iter(records), progress, [encoder])
        return (progress.summary.ok + progress.summary.failed) / (time.perf_counter() - t)
    finally:
        store.close()


def run(bench: BenchConfig, tag_spec=None) -> dict:
    """Measure everything on the same device and settings; returns the numbers (images/s) and the setting."""
    from .devices import default_batch_size
    from .sources import FileRecord
    from .tasks import EmbedSpec

    cfg = bench.run
    batch_size = cfg.batch_size or default_batch_size(resolve_device(cfg.model.device))
    t = time.perf_counter()
    encoder = (
        random_encoder(bench.arch, cfg.model, batch_size) if bench.arch else Encoder.load(cfg.model, False, batch_size)
    )
    load_s = time.perf_counter() - t
    encoder.pad_to = batch_size if cfg.model.compile else 0
    spec = dataclasses.replace(encoder.spec, max_pixels=cfg.max_pixels, exact=cfg.exact)
    with tempfile.TemporaryDirectory(prefix="siglip-bench-") as folder:
        paths, generated = bench_images(cfg, folder)
        n = bench.images or 20 * batch_size
        # Each file once per pass; passes repeat the list until n images (the OS cache serves repeats).
        records = [FileRecord(p) for p in itertools.islice(itertools.cycle(paths), n)]
        if encoder.backend == "openvino":  # its batch, and int8 calibrated on the photos a run would use
            from .encoders import openvino

            openvino.prepare([encoder], (FileRecord(p) for p in paths), spec)
        top, first_call_s = ceiling(
            encoder, batch_size, bench.seconds, decode_photos([FileRecord(p) for p in paths[:batch_size]], spec)
        )
        decode = decode_rate(records, spec, cfg.workers, batch_size, cfg.timeout)
        run_cfg = dataclasses.replace(cfg, batch_size=batch_size, head=EmbedSpec())
        e2e = end_to_end(run_cfg, encoder, records, folder)
        result = {
            "device": device_name(encoder.device),
            "model": encoder.info.name,
            "dtype": str(encoder.dtype)[6:],
            "backend": encoder.backend,
            "quantize": encoder.quantize,
            "compile": cfg.model.compile,
            "exact": cfg.exact,
            "batch_size": batch_size,
            "workers": cfg.workers,
            "images": n,
            "distinct_files": len({r.path for r in records}),
            "generated_images": generated,
            "load_s": round(load_s, 2),
            "first_call_s": round(first_call_s, 2),
            "ceiling": rate(top),
            "decode": rate(decode),
            "end_to_end": rate(e2e),
            "ratio": round(e2e / top, 3),
        }
        if tag_spec is not None:
            tag = end_to_end(dataclasses.replace(cfg, batch_size=batch_size, head=tag_spec), encoder, records, folder)
            result.update(tag=rate(tag), tag_vs_embed=round(tag / e2e, 3), n_tags=len(tag_spec.vocab.tags))
    return result


def rate(x: float) -> float:
    """Images/s to three significant figures: so400m on a 2-core CPU runs at a tenth of an image a second, which
    one decimal (or none) rounded to 0."""
    return float(f"{x:.3g}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def table(result: dict) -> str:
    """The result as the README's table row, with its header."""
    head = "| hardware | model | backend | dtype | quantize | compile | ceiling | decode | end to end | ratio |"
    row = (
        f"| {result['device']} | {result['model']} | {result['backend']} | {result['dtype']} | {result['quantize']} "
        f"| {'yes' if result['compile'] else 'no'} "
        f"| {result['ceiling']:.3g} | {result['decode']:.3g} | {result['end_to_end']:.3g} | {result['ratio']:.2f} |"
    )
    lines = [head, "| --- " * 10 + "|", row]
    if "tag" in result:
        lines.append(
            f"\ntag with {result['n_tags']:,} tags: {result['tag']:.3g} images/s, {result['tag_vs_embed']:.0%} of embed"
        )
    lines.append(
        f"\n{result['images']:,} images ({result['distinct_files']} distinct files"
        f"{', generated' if result['generated_images'] else ''}), batch {result['batch_size']}, "
        f"{result['workers']} workers; model load {result['load_s']}s, first call {result['first_call_s']}s"
    )
    return "\n".join(lines)
