"""The text tower on OpenVINO, as the cache keeps it: converted once per model and text length (see
openvino_text.convert_text), with the checkpoint's tokenizer as transformers configures it for SigLIP's text rules
(lowercased by the caller, right-padded to the trained length, truncated, EOS kept). Reading it needs neither
torch nor transformers: a text search whose tower is cached starts in seconds, not in the ten that importing
those two takes on a slow CPU.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os

import numpy as np

VERSION = 1
FILES = ("text.xml", "text.bin", "tokenizer.json", "text.json")  # text.json last: its presence means all are there


def precision(dtype: str) -> str:
    """OpenVINO's inference precision for a dtype's name ("float32", "bfloat16", "torch.float16", ...)."""
    return {"bfloat16": "bf16", "float16": "f16"}.get(str(dtype).removeprefix("torch."), "f32")


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("openvino", "tokenizers"))


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def place(fingerprint: str, length: int) -> str:
    """The cache folder of this model's text tower at this text length (saved in float32: the precision it
    runs at is chosen when it is compiled)."""
    from ..vocab import cache_dir

    key = json.dumps(
        [VERSION, fingerprint, "text", length, _version("openvino"), _version("transformers"), _version("tokenizers")]
    )
    return os.path.join(cache_dir(), "openvino", hashlib.sha256(key.encode()).hexdigest()[:24])


def cached(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, FILES[-1]))


class TextTower:
    """Texts -> L2-normalized embeddings (n, D) float32, from a cached conversion; texts arrive lowercased."""

    def __init__(self, folder: str, precision: str, threads: int, batch_size: int = 64):
        import openvino as ov
        from tokenizers import Tokenizer

        with open(os.path.join(folder, "text.json")) as f:
            info = json.load(f)
        # truncation and padding as transformers set them (saved with the tokenizer); this flag is not saved
        self.tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.tokenizer.encode_special_tokens = info["encode_special_tokens"]
        self.length, self.batch_size = info["length"], batch_size
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
        }
        core, xml = ov.Core(), os.path.join(folder, "text.xml")
        if os.access(folder, os.W_OK):  # OpenVINO's own cache of the compiled graph (weights stay in text.bin):
            # so400m's text tower compiles in 1.5 s instead of 2.2 on a slow CPU
            try:
                self.compiled = core.compile_model(
                    xml, "CPU", {**config, "CACHE_DIR": os.path.join(folder, "compiled"), "CACHE_MODE": "OPTIMIZE_SIZE"}
                )
                return
            except RuntimeError as e:  # OpenVINO before 2024.5 has no CACHE_MODE: compiled each time
                if "CACHE_MODE" not in str(e):
                    raise
        self.compiled = core.compile_model(xml, "CPU", config)

    def ids(self, texts: list[str]) -> np.ndarray:
        rows = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]
        return np.array(rows, np.int64).reshape(len(rows), self.length)

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = [
            self.compiled(self.ids(texts[i : i + self.batch_size]))[0] for i in range(0, len(texts), self.batch_size)
        ]
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, 0), np.float32)
