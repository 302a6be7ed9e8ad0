"""`siglip bench --backends`: every backend, dtype and quantization this machine can run, side by side on the
same photos: speed, closeness to torch float32 (and whether it holds the int8 bound), and tag agreement."""

from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
import time

import numpy as np
import torch

from .bench import BenchConfig, bench_images, ceiling, device_name, end_to_end, random_encoder, rate
from .decode import decode_photos
from .devices import cpu_bf16_native, resolve_device
from .errors import RunError
from .model import Encoder


def variants(device: torch.device) -> list[tuple[str, str, str]]:
    """(backend, dtype, quantize) that this machine can run, torch float32 first: the reference."""
    from .encoders import openvino

    bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_bf16_native())
    out = [("torch", "float32", "none")] + ([("torch", "bfloat16", "none")] if bf16 else [])
    if device.type == "cpu" and openvino.available():
        out += [("openvino", "float32", "none")] + ([("openvino", "bfloat16", "none")] if bf16 else [])
        out += [("openvino", "bfloat16" if bf16 else "float32", q) for q in ("int8-weights", "int8", "int4")]
    return out


@torch.inference_mode()
def _embed(encoder: Encoder, sample: np.ndarray, batch_size: int) -> np.ndarray:
    out = [
        encoder.tower(torch.from_numpy(sample[i : i + batch_size]).to(encoder.device)).float().cpu()
        for i in range(0, len(sample), batch_size)
    ]
    return torch.cat(out).numpy()


def top5(emb: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Each photo's five best tags (as `tag` ranks them: by cosine, the sigmoid keeps the order), as sorted ids."""
    return np.sort(np.argsort(-(emb @ text.T), axis=1, kind="stable")[:, :5], axis=1)


def matrix(bench: BenchConfig, tag_spec=None) -> dict:
    """Every backend, dtype and quantization this machine can run, on the same photos and weights: images/s of
    the tower alone and end to end, and each one's cosine to torch float32 on the same pixels; with a
    vocabulary, the share of photos whose top 5 tags are torch float32's."""
    from .devices import default_batch_size
    from .sources import FileRecord
    from .tasks import EmbedSpec

    cfg = bench.run
    device = resolve_device(cfg.model.device)
    rows, ref, sample, sample_spec, text = [], None, None, None, None
    with tempfile.TemporaryDirectory(prefix="siglip-bench-") as folder:
        paths, generated = bench_images(cfg, folder)
        for backend, dtype, quantize in variants(device):
            model = dataclasses.replace(cfg.model, backend=backend, dtype=dtype, quantize=quantize, compile=False)
            batch_size = cfg.batch_size or default_batch_size(device)
            encoder = (
                random_encoder(bench.arch, model, batch_size) if bench.arch else Encoder.load(model, False, batch_size)
            )
            if encoder.naflex:
                raise RunError("bench --backends compares fixed-resolution checkpoints (NaFlex runs on torch only)")
            spec = dataclasses.replace(encoder.spec, max_pixels=cfg.max_pixels, exact=cfg.exact)
            if sample is None or spec != sample_spec:  # cosines over up to 256 photos: the first 64 calibrate int8
                sample, sample_spec = decode_photos([FileRecord(p) for p in paths[: max(256, batch_size)]], spec), spec
            if encoder.backend == "openvino":
                from .encoders import openvino

                openvino.prepare([encoder], (FileRecord(p) for p in paths), spec)
            t = time.perf_counter()
            emb = _embed(encoder, sample, batch_size)
            prepare_s = time.perf_counter() - t
            ref = emb if ref is None else ref
            cos = (emb * ref).sum(axis=1)
            if tag_spec is not None and text is None:  # the text tower runs on torch in float32 in every variant
                from .vocab import text_embeddings

                text = text_embeddings(encoder, tag_spec.vocab.tags, tag_spec.templates, False).float().cpu().numpy()
                ref_tags = top5(ref, text)
            top, _ = ceiling(encoder, batch_size, bench.seconds, sample)
            n = bench.images or 10 * batch_size
            records = [FileRecord(p) for p in itertools.islice(itertools.cycle(paths), n)]
            run_cfg = dataclasses.replace(cfg, model=model, batch_size=batch_size, head=EmbedSpec())
            out = os.path.join(folder, f"{backend}-{dtype}-{quantize}")
            os.makedirs(out)
            e2e = end_to_end(run_cfg, encoder, records, out)
            rows.append(
                {
                    "backend": backend,
                    "dtype": dtype,
                    "quantize": quantize,
                    "tower": rate(top),
                    "end_to_end": rate(e2e),
                    "ratio": round(e2e / top, 3),
                    "vs_float32": round(e2e / rows[0]["end_to_end"], 2) if rows else 1.0,
                    "min_cos": round(float(cos.min()), 6),
                    "mean_cos": round(float(cos.mean()), 6),
                    "bound": bool(cos.mean() >= cfg.model.int8_bound[0] and cos.min() >= cfg.model.int8_bound[1]),
                    "int8_check": getattr(encoder.tower, "check", None),
                    "first_batch_s": round(prepare_s, 1),
                }
            )
            if text is not None:
                rows[-1]["top5_same"] = round(float((top5(emb, text) == ref_tags).all(axis=1).mean()), 3)
            del encoder
    return {
        "device": device_name(device),
        "model": f"random:{bench.arch}" if bench.arch else cfg.model.name,
        "images": n,
        "photos_compared": len(sample),
        "distinct_files": len({r.path for r in records}),
        "generated_images": generated,
        "batch_size": batch_size,
        "workers": cfg.workers,
        "variants": rows,
    }


def matrix_table(result: dict) -> str:
    """The backends side by side, as the README's table."""
    tags = "top5_same" in result["variants"][0]
    lines = [
        "| hardware | model | backend | dtype | quantize | tower img/s | end to end img/s | vs torch float32 "
        "| end to end / tower | min cos | mean cos | within the bound |" + (" same top 5 tags |" if tags else ""),
        "| --- " * (12 + tags) + "|",
    ]
    for v in result["variants"]:
        lines.append(
            f"| {result['device']} | {result['model']} | {v['backend']} | {v['dtype']} | {v['quantize']} "
            f"| {v['tower']:.3g} | {v['end_to_end']:.3g} | {v['vs_float32']:.2f}x | {v['ratio']:.2f} "
            f"| {v['min_cos']:.5f} | {v['mean_cos']:.5f} | {'yes' if v['bound'] else 'no'} |"
            + (f" {v['top5_same']:.0%} |" if tags else "")
        )
    lines.append(
        f"\n{result['images']:,} images end to end ({result['distinct_files']} distinct files"
        f"{', generated' if result['generated_images'] else ''}), cosines on {result['photos_compared']} "
        f"photos against torch float32 on the same pixels; batch {result['batch_size']}, "
        f"{result['workers']} workers; the bound: mean and least cosine at least --int8-bound's"
    )
    return "\n".join(lines)
