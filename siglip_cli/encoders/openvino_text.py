"""The OpenVINO text tower: converted with its tokenizer once per checkpoint and precision, cached on disk, and
chosen by Encoder.load on a CPU (tag, classify and the server's texts run on it; ovtext.py reads the cache
without torch)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings

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


def convert_text(encoder, folder: str, torch_text=None) -> bool:
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
        if torch_text is not None and torch_text.model is None and encoder.text_dtype == torch.float32:
            torch_text.model = text.to(encoder.device).eval()  # loaded already: the fallback uses it as it is
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


class OpenVINOText:
    """A text tower: texts -> embeddings (n, D) float32 on the encoder's device by the cached OpenVINO text tower,
    converted at first use; where it cannot be had (no tokenizer to save, no memory to convert, a converter or
    compiler that fails), the torch tower it was given, for the rest of the run (then `backend` says torch)."""

    def __init__(self, encoder, torch_text, precision: str, threads: int):
        self.encoder, self.torch, self.precision, self.threads = encoder, torch_text, precision, threads
        self.tower, self.fell_back = None, False

    @property
    def backend(self) -> str:
        return "torch" if self.fell_back else "openvino"

    @property
    def kind(self) -> str:
        """What decides the text embeddings' numbers (the vocabulary cache's key)."""
        return self.torch.kind if self.fell_back else f"openvino {self.precision}"

    def __call__(self, texts: list[str]) -> torch.Tensor:
        from ..text import prepare

        if not self.fell_back and self.tower is None:
            self.fell_back = not self._open()
        if self.fell_back:
            return self.torch(texts)
        e = self.encoder
        return torch.from_numpy(self.tower(prepare(texts, e.text_rules))).to(e.device)

    def _open(self) -> bool:
        from . import ovtext

        e = self.encoder
        folder = ovtext.place(e.fingerprint, e.info.text_length)
        if not ovtext.cached(folder):
            try:
                if not convert_text(e, folder, self.torch):
                    return False
            except RunError:
                raise
            except Exception as error:  # a converter that fails: the text tower stays on torch
                say(f"note: the text tower stays on torch (OpenVINO cannot convert it: {first_line(error)})")
                return False
        try:
            self.tower = ovtext.TextTower(folder, self.precision, self.threads)
        except Exception as error:  # a cached tower OpenVINO cannot compile here: torch, for this run
            say(f"note: the text tower stays on torch (OpenVINO cannot compile it: {first_line(error)})")
            return False
        return True
