"""The OpenVINO backend for CPUs: the image tower converted once per model, input size and quantization, and
cached on disk, so that a nightly run starts in seconds; run at the chosen precision (f32, or bf16 where the
CPU has it), optionally with NNCF's int8/int4 weight compression or int8 quantization calibrated on the run's
own first photos.

The converted graph includes the uint8 -> float scaling and the L2 normalization, so it takes the loader's
uint8 NHWC batch as it is. NaFlex checkpoints (variable patch grids) stay on torch, with a one-line note.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RunError, first_line
from ..scratch import scratch
from . import signals_held

CACHE_VERSION = 5  # 5: a rung with the patch embedding and the last blocks in float; 4: int8 checked, bound in key
QUANTIZE = ("none", "int8", "int8-weights", "int4")
# photos that calibrate int8 activations: the run's first. On random base-224 and the 125 shared photos, the first
# batch of 16 alone left the worst photo at cosine 0.937 to float32 (mean 0.987); 64: 0.983 (mean 0.994)
CALIBRATION = 64
VALIDATION = 32  # photos of the run after the calibration's that int8 is checked on (at least 8, else those)
BOUND = (0.995, 0.98)  # int8 is kept where its embeddings' mean and least cosine to float32 are at least these


def available() -> bool:
    """Whether the openvino extra is installed."""
    return importlib.util.find_spec("openvino") is not None


class _Tower(torch.nn.Module):
    """uint8 NHWC pixels -> L2-normalized image embeddings: what gets converted."""

    def __init__(self, model, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("a", a.detach().float().cpu().clone())
        self.register_buffer("b", b.detach().float().cpu().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float() * self.a[:, None, None] + self.b[:, None, None]
        return F.normalize(self.model(pixel_values=x).pooler_output.float(), dim=-1)


def import_nncf():
    """nncf, its log kept off stdout (it logs there, from its import on: a version warning would land in `-o -`)."""
    with contextlib.redirect_stdout(sys.stderr):
        import nncf
    nncf.set_log_level(logging.ERROR)
    return nncf


def _versions() -> dict:
    import openvino

    nncf = importlib.util.find_spec("nncf") is not None and import_nncf().__version__
    return {"openvino": openvino.__version__, "nncf": nncf, "torch": torch.__version__}


def int8_native() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI, AMX). Without them OpenVINO's int8
    products can saturate, and int8 needs NNCF's overflow fix (7-bit weights) in every layer, not only the
    first: on an AVX2-only EPYC (random base-224, 64 calibration photos, the 125 shared photos) the worst
    cosine to float32 went 0.988 -> 0.997 with it, the mean 0.9949 -> 0.9992."""
    from ..compat import cpu_int8_native

    return cpu_int8_native()


def cache_path(encoder, batch: int, quantize: str, bound=BOUND) -> str:
    """Where the converted tower of this model, batch and input size, and quantization (int8: and bound) lives."""
    from ..vocab import cache_dir

    spec = encoder.spec
    overflow = quantize == "int8" and not int8_native()
    key = json.dumps(
        [CACHE_VERSION, encoder.fingerprint, "image", [batch, spec.height, spec.width], quantize, _versions()]
        + (["overflow fix"] if overflow else [])
        + ([list(bound)] if quantize == "int8" else [])
    )
    return os.path.join(cache_dir(), "openvino", hashlib.sha256(key.encode()).hexdigest()[:24], "image.xml")


def memory_short(module: torch.nn.Module, copies: float, what: str) -> str | None:
    """Why converting `module` here would risk the run being killed, or None: converting holds about `copies`
    more copies of its weights at its peak, and where the memory available (MemAvailable, capped by a cgroup's
    limit) is short of that, the OOM killer would end the run, every night at the same point."""
    from ..config import available_memory

    need, free = copies * sum(p.numel() * p.element_size() for p in module.parameters()), available_memory()
    if free is None or free >= need:
        return None
    return (
        f"converting {what} for OpenVINO needs about {need / 2**30:.1f} GB more memory than the "
        f"{free / 2**30:.1f} GB available"
    )


def say(message: str) -> None:
    print(f"siglip: {message}", file=sys.stderr)


class OpenVINOTower:
    """The image tower as a compiled OpenVINO model; built (or read from the cache) at the first batch. int8's
    activations are calibrated on the photos `calibration` gives (see prepare), or the first batch's.

    The graph has a static batch (about 10% faster than a dynamic one on a CPU): the run's batch size where the
    run gave it (see prepare), else the first call's; smaller batches are padded, larger ones split.
    """

    def __init__(self, encoder, quantize: str, precision: str, threads: int, bound=BOUND):
        self.encoder, self.quantize, self.precision, self.threads = encoder, quantize, precision, threads
        self.compiled, self.batch, self.path, self.bound = None, 0, "", tuple(bound)
        self.calibration = None  # () -> photos (n, h, w, 3) uint8 that calibrate int8, or None: the first batch
        self.validation = None  # () -> other photos of the run that int8 is checked on (None: the calibration's)
        self.check: dict | None = None  # int8: what the check against float32 found, and what runs (see _int8)

    def _convert(self, sample: np.ndarray):
        # stdout may be the run's data (-o -): the converters' chatter and NNCF's progress bars go to stderr where
        # a person watches it, and nowhere in a cron job's log (they were its last lines, drawn once each)
        with (
            open(os.devnull, "w") as nowhere,
            contextlib.redirect_stdout(sys.stderr if sys.stderr.isatty() else nowhere),
            warnings.catch_warnings(),
            signals_held(),
        ):
            warnings.simplefilter("ignore")
            return self._convert_quietly(sample)

    def _convert_quietly(self, sample: np.ndarray):
        import openvino as ov

        t = time.perf_counter()
        tower = _Tower(
            self.encoder.vision, self.encoder.pixel_scale, self.encoder.pixel_shift
        ).eval()  # loaded in float32
        h, w = sample.shape[1:3]
        with torch.no_grad():  # traced on one image (fast), then fixed to the run's batch
            model = ov.convert_model(tower, example_input=torch.from_numpy(sample[:1]), input=[(-1, h, w, 3)])
        model.reshape([len(sample), h, w, 3])
        if self.quantize != "none":
            nncf = import_nncf()
            if self.quantize == "int8":
                model = self._int8(nncf, model, sample)
            elif self.quantize == "int8-weights":
                model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
            else:  # int4 in groups of 128 where the layer's width allows, smaller groups where not
                from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

                adjust = AdvancedCompressionParameters(
                    group_size_fallback_mode=GroupSizeFallbackMode.ADJUST, min_adjusted_group_size=16
                )
                model = nncf.compress_weights(
                    model,
                    mode=nncf.CompressWeightsMode.INT4_SYM,
                    ratio=1.0,
                    group_size=128,
                    all_layers=True,
                    advanced_parameters=adjust,
                )
        done = f"converted the image tower for OpenVINO ({self.quantize}) in {time.perf_counter() - t:.0f}s"
        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, exist_ok=True)
            with scratch(folder) as work:
                tmp = os.path.join(work, "model.xml")
                ov.save_model(model, tmp, compress_to_fp16=False)
                if self.check is not None:
                    with open(os.path.join(folder, "check.json"), "w") as f:
                        json.dump(self.check, f)
                os.replace(tmp[:-4] + ".bin", self.path[:-4] + ".bin")
                os.replace(tmp, self.path)  # the .xml last: its presence means the pair is whole
        except (OSError, RuntimeError) as e:  # a full disk, ulimit -f: this run uses it as it is, the next converts
            say(f"warning: {done}, but cannot cache it in {folder} ({first_line(e)}); the next run converts again")
        else:
            say(f"{done}; cached in {folder}")
        if self.quantize == "int8" and not int8_native():  # said where it is paid for: at the conversion
            say(
                "note: this CPU has no int8 dot-product instructions (AVX512-VNNI, AMX): --quantize int8 is no "
                "faster here than float32 (measured on an AVX2 EPYC); `siglip bench --backends` compares them"
            )
        return model

    def _int8(self, nncf, model, sample: np.ndarray):
        """int8 weights and activations, calibrated on the run's photos, then checked against the float32 tower on
        other photos of the run: kept where the embeddings' mean and least cosine meet the bound; else int8 weights
        only; else float. Between int8 and int8 weights, int8 with the layers that make or finish the embedding
        kept in float (the patch embedding, the last two blocks, the head). What was found is `check` (the output's
        metadata, and one line on stderr)."""
        photos = self.calibration() if self.calibration else None
        photos = sample if photos is None or photos.shape[1:] != sample.shape[1:] else photos
        others = self.validation() if self.validation else None
        others = photos if others is None or others.shape[1:] != photos.shape[1:] else others
        step = len(sample)
        items = [np.resize(photos[i : i + step], sample.shape) for i in range(0, len(photos), step)]
        # the attention-pooling head stays in float: it makes the embedding (on random base-224, 64 photos: worst
        # cosine 0.983 -> 0.987, mean 0.9940 -> 0.9946; 5 of 78 quantizers)
        head = nncf.IgnoredScope(patterns=[".*head.*"], validate=False)
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        fix = AdvancedQuantizationParameters(
            overflow_fix=OverflowFix.FIRST_LAYER if int8_native() else OverflowFix.ENABLE
        )
        last = int(self.encoder.config.vision_config.num_hidden_layers) - 1
        ends = nncf.IgnoredScope(
            patterns=[".*head.*", ".*embeddings\\.patch_embedding.*", f".*encoder\\.layers\\.({last - 1}|{last})\\..*"],
            validate=False,
        )

        def int8(scope):
            return lambda m: nncf.quantize(
                m,
                nncf.Dataset(items),
                subset_size=len(items),
                ignored_scope=scope,
                model_type=nncf.ModelType.TRANSFORMER,
                fast_bias_correction=True,
                advanced_parameters=fix,
            )

        ladder = (
            ("int8", int8(head)),
            ("int8-ends-float", int8(ends)),
            ("int8-weights", lambda m: nncf.compress_weights(m, mode=nncf.CompressWeightsMode.INT8_ASYM)),
        )
        with torch.no_grad():
            reference = _Tower(self.encoder.vision, self.encoder.pixel_scale, self.encoder.pixel_shift).eval()
            want = np.concatenate(
                [reference(torch.from_numpy(others[i : i + step])).numpy() for i in range(0, len(others), step)]
            )
        found = []
        for used, make in ladder:
            candidate = make(model.clone())
            cos = (self._embed(candidate, others, step) * want).sum(axis=1)
            found.append(f"{used}: mean cos {cos.mean():.5f}, least {cos.min():.5f}")
            if cos.mean() >= self.bound[0] and cos.min() >= self.bound[1]:
                break
        else:  # what runs is the float tower: its own figures, not the last rung's
            used, candidate = "none", model
            cos = (self._embed(candidate, others, step) * want).sum(axis=1)
        self.check = {
            "used": used,
            "photos": len(others),
            "mean": round(float(cos.mean()), 6),
            "least": round(float(cos.min()), 6),
            "bound": list(self.bound),
            "tried": found,
            "on": "other photos of the run" if others is not photos else "the calibration photos",
        }
        verdict = {
            "int8": "int8 kept",
            "int8-ends-float": "below the bound: int8 with the patch embedding and the last two blocks in float",
            "int8-weights": "below the bound: int8 weights only",
            "none": "below the bound: runs in float",
        }[used]
        say(
            f"int8 checked against float32 on {len(others)} photos ({self.check['on']}): {'; '.join(found)} "
            f"(bound: mean >= {self.bound[0]:g}, least >= {self.bound[1]:g}): {verdict}"
        )
        return candidate

    def _embed(self, model, photos: np.ndarray, step: int) -> np.ndarray:
        import openvino as ov

        compiled = ov.Core().compile_model(
            model, "CPU", {"INFERENCE_PRECISION_HINT": self.precision, "INFERENCE_NUM_THREADS": self.threads}
        )
        out = []
        for i in range(0, len(photos), step):
            part = photos[i : i + step]
            padded = np.resize(part, (step, *part.shape[1:])) if len(part) < step else part
            out.append(compiled(padded)[0][: len(part)])
        return np.concatenate(out)

    def fits(self) -> bool:
        """Whether this tower is cached, or can be converted here: where the memory for converting is not there,
        False with a note (torch then runs it: unquantized, the same numbers, and the run's settings allow it),
        or, quantized, a one-line error before any work. About 2.5 more copies of the weights at the peak:
        so400m's image tower, 1.7 GB, peaked at 6.0 GB resident in all."""
        if os.path.exists(cache_path(self.encoder, self.batch, self.quantize, self.bound)):
            return True
        short = memory_short(self.encoder.vision, 2.5, "the image tower")
        if short is None:
            return True
        if self.quantize != "none":
            raise RunError(f"{short}; run with --quantize none (torch), or where there is more memory")
        say(f"note: the image tower runs on torch: {short}")
        return False

    def _build(self, sample: np.ndarray) -> None:
        import openvino as ov

        self.batch = max(self.batch, len(sample))  # a first batch short of photos that failed: padded
        sample = np.resize(sample, (self.batch, *sample.shape[1:]))
        self.path = cache_path(self.encoder, self.batch, self.quantize, self.bound)
        core = ov.Core()
        if os.path.exists(self.path):
            model = core.read_model(self.path)
            if self.quantize == "int8":  # what the conversion's check found, as it found it
                try:
                    with open(os.path.join(os.path.dirname(self.path), "check.json")) as f:
                        self.check = json.load(f)
                except (OSError, ValueError):
                    self.check = None
        else:
            try:
                model = self._convert(sample)
            except Exception as e:  # a converter or quantizer that fails: one line, and the way around it
                raise RunError(
                    f"cannot convert the model for OpenVINO: {first_line(e)}; run with --backend torch"
                ) from None
        config = {
            "INFERENCE_PRECISION_HINT": self.precision,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": self.threads,
        }
        self.compiled = core.compile_model(model, "CPU", config)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.numpy()
        if self.compiled is None:
            self._build(pixels)
        out = []
        for i in range(0, len(pixels), self.batch):
            part = pixels[i : i + self.batch]
            if len(part) < self.batch:  # the last batch of a run: padded with copies of its first image
                part = np.concatenate([part, np.repeat(part[:1], self.batch - len(part), axis=0)])
            out.append(self.compiled(part)[0][: len(pixels) - i])
        return torch.from_numpy(np.concatenate(out))


def prepare(encoders, records, spec):
    """The records, unchanged, after giving the encoders' int8 OpenVINO towers the run's first CALIBRATION
    photos to calibrate on and the VALIDATION after them to check on, and building them: the photos are decoded
    only if a tower has to be quantized (one read from the cache needs none)."""
    towers = [e.tower for e in encoders if isinstance(e.tower, OpenVINOTower) and e.tower.quantize == "int8"]
    if not towers:
        return records
    from ..decode import decode_photos

    records = iter(records)
    head = list(itertools.islice(records, CALIBRATION + VALIDATION))
    photos = functools.cache(lambda: decode_photos(head, spec))

    def others():
        rest = None if photos() is None else photos()[CALIBRATION:]
        return rest if rest is not None and len(rest) >= 8 else None

    for tower in towers:
        tower.calibration, tower.validation = (lambda: None if photos() is None else photos()[:CALIBRATION]), others
        # built now, before the output's metadata is made: it records what int8's check found
        cached = os.path.exists(cache_path(tower.encoder, tower.batch, tower.quantize, tower.bound))
        if cached or photos() is not None:
            tower._build(np.zeros((tower.batch, spec.height, spec.width, 3), np.uint8))
    return itertools.chain(head, records)


def image_tower(
    encoder, dtype: torch.dtype, quantize: str, threads: int, batch: int, bound=BOUND
) -> OpenVINOTower | None:
    """The encoder's image tower (loaded in float32) on OpenVINO at the precision of dtype, for graphs of this
    batch (int8: held to `bound`); None where it cannot be converted here (see OpenVINOTower.fits): torch runs it."""
    from .ovtext import precision as _precision

    tower = OpenVINOTower(encoder, quantize, _precision(dtype), threads, bound)
    tower.batch = batch
    return tower if tower.fits() else None
