"""The OpenVINO text tower: converted with its tokenizer once per checkpoint and precision, cached on disk, and
attached to an Encoder on a CPU (tag, classify and the server's texts run on it; ovtext.py reads the cache
without torch)."""

from __future__ import annotations

import contextlib
import json
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
from .openvino import memory_short, say


class _TextTower(torch.nn.Module):
    """Input ids (n, length) -> L2-normalized text embeddings (no attention mask, as SigLIP was trained)."""

    def __init__(self, text):
        super().__init__()
        self.text = text

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(input_ids=ids).pooler_output.float(), dim=-1)


def convert_text(encoder, folder: str) -> bool:
    """Convert the encoder's text tower (read again in float32) to OpenVINO and save it in `folder` (see ovtext),
    with the tokenizer as transformers configures it for SigLIP's text rules. False where the checkpoint's
    tokenizer is a slow (Python) one, which cannot be saved for the tokenizers library, or where converting would
    need more memory than there is."""
    import openvino as ov

    from .ovtext import FILES

    backend = getattr(encoder.tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    t = time.perf_counter()
    example = encoder.tokenize(["a photo of a dog"])  # also sets the backend's truncation and padding, saved with it
    text = encoder.load_text(torch.float32)
    # about two more copies of the weights at the peak (so400m's text tower, 2.8 GB: 7.6 GB in all)
    if short := memory_short(text, 2, "it"):
        say(f"note: the text tower stays on torch: {short}")
        if encoder._text is None and encoder.text_dtype == torch.float32:  # loaded already: used as it is
            encoder._text = text.to(encoder.device).eval()
        return False
    tower = _TextTower(text).eval()
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    with scratch(parent) as work:
        tmp = os.path.join(work, "text")
        os.mkdir(tmp)
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(), torch.no_grad(), signals_held():
            warnings.simplefilter("ignore")
            model = ov.convert_model(tower, example_input=example, input=[(-1, example.shape[1])])
        ov.save_model(model, os.path.join(tmp, FILES[0]), compress_to_fp16=False)
        backend.save(os.path.join(tmp, FILES[2]))
        with open(os.path.join(tmp, FILES[3]), "w") as f:
            json.dump({"length": int(example.shape[1]), "encode_special_tokens": backend.encode_special_tokens}, f)
        try:
            os.replace(tmp, folder)
        except OSError:  # another run converted it first
            pass
    say(f"converted the text tower for OpenVINO in {time.perf_counter() - t:.0f}s; cached in {folder}")
    return True


class TextRunner:
    """texts (lowercased) -> embeddings (n, D) float32 by the cached OpenVINO text tower, converted at first use;
    the torch text tower where the tokenizer cannot be saved (then the encoder falls back for good)."""

    def __init__(self, encoder, precision: str, threads: int):
        self.encoder, self.precision, self.threads, self.tower = encoder, precision, threads, None

    def __call__(self, texts: list[str]) -> np.ndarray:
        from . import ovtext

        if self.tower is None:
            e = self.encoder
            folder = ovtext.place(e.fingerprint, e.info.text_length)
            if not ovtext.cached(folder):
                try:
                    converted = convert_text(e, folder)
                except RunError:
                    raise
                except Exception as error:  # a converter that fails: the text tower stays on torch
                    say(f"note: the text tower stays on torch (OpenVINO cannot convert it: {first_line(error)})")
                    converted = False
                if not converted:
                    return self._torch(texts)
            try:
                self.tower = ovtext.TextTower(folder, self.precision, self.threads)
            except Exception as error:  # a cached tower OpenVINO cannot compile here: torch, for this run
                say(f"note: the text tower stays on torch (OpenVINO cannot compile it: {first_line(error)})")
                return self._torch(texts)
        return self.tower(texts)

    def _torch(self, texts: list[str]) -> np.ndarray:
        """The encoder's torch text tower from now on (and the vocabulary cache's key says so)."""
        e = self.encoder
        e.text_runner, e.text_backend, e.text_kind = None, "torch", str(e.text_dtype)
        return e._texts(texts).cpu().numpy()


def attach_text(encoder, dtype: torch.dtype, threads: int) -> None:
    """Run the encoder's text tower on OpenVINO at the precision of dtype (converted and cached at first use)."""
    from .ovtext import precision as _precision

    precision = _precision(dtype)
    encoder.text_runner = TextRunner(encoder, precision, threads)
    encoder.text_backend, encoder.text_kind = "openvino", f"openvino {precision}"
