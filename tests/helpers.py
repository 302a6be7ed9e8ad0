"""What the test modules share besides fixtures: paths, runners, checkpoint builders, image makers, a served
`siglip serve`, readers of the outputs. Plain functions: any test module imports them from here (tests/ is on
sys.path through pyproject.toml's pytest `pythonpath`), never from another test module or from conftest.py."""

from __future__ import annotations

import base64
import io
import os
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    import httpx
except ImportError:  # the test extra's httpx: modules that need it skip with pytest.importorskip
    httpx = None

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
IMAGES = SHARED / "images"
RAM_TAGS = SHARED / "ram_tag_list.txt"


# -- running the CLI --------------------------------------------------------------------------------------
def run_siglip(*args, **kw) -> subprocess.CompletedProcess:
    """Run `python -m siglip_cli ARGS...` in a subprocess, as a shell script would."""
    return subprocess.run(
        [sys.executable, "-m", "siglip_cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=kw.pop("cwd", None),
        env={**os.environ, **kw.pop("env", {})},
        **kw,
    )


# -- tiny random-weight checkpoints, built offline --------------------------------------------------------
def _tokenizer():
    """A character-level Gemma tokenizer with byte fallback, configured like the SigLIP 2 checkpoints'."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for ch in "▁" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=False, add_eos_token=True, padding_side="right")


def _text_config(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        projection_size=32,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def write_processor(folder: Path, **recipe) -> None:
    """preprocessor_config.json as the Hub checkpoints ship it (written as a file: no processor class of a
    particular transformers version is needed to make one)."""
    import json

    config = dict(
        do_normalize=True,
        do_rescale=True,
        do_resize=True,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        rescale_factor=1 / 255,
        **recipe,
    )
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def build_fixed(folder: Path) -> Path:
    """SiglipModel + GemmaTokenizer + a 64x64 bilinear processor: the layout of the fixed-resolution SigLIP 2s."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    tok = _tokenizer()
    config = SiglipConfig(
        text_config=_text_config(len(tok)),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
    )
    model = SiglipModel(config).eval()
    with torch.no_grad():  # a realistic scale and bias, so that scores are not all ~0 or ~1
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-2.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_processor(
        folder,
        image_processor_type="SiglipImageProcessor",
        do_convert_rgb=True,
        resample=2,
        size={"height": 64, "width": 64},
    )
    return folder


def build_naflex(folder: Path) -> Path:
    """Siglip2Model + Siglip2 processor (up to 256 patches of 16 px): the layout of the NaFlex checkpoints."""
    import torch
    from transformers import Siglip2Config, Siglip2Model

    torch.manual_seed(1)
    tok = _tokenizer()
    config = Siglip2Config(
        text_config=_text_config(len(tok)),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_patches=16,
            patch_size=16,
        ),
    )
    model = Siglip2Model(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-2.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    # 256 as in the real NaFlex checkpoints (Siglip2Processor applies 256 whatever the image processor says).
    write_processor(
        folder, image_processor_type="Siglip2ImageProcessor", resample=2, patch_size=16, max_num_patches=256
    )
    return folder


def build_v1(folder: Path) -> Path:
    """SiglipModel + a sentencepiece SiglipTokenizer (spiece.model, no tokenizer.json) + a bicubic processor:
    the layout of the SigLIP 1 checkpoints (google/siglip-*). The tokenizer is trained here, in well under a
    second, on a few lines."""
    import sentencepiece as spm
    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer

    lines = [
        "a red car on a road",
        "this is a photo of a great grey owl",
        "two dogs playing in the snow",
        "a photo of a cat",
        "the quick brown fox jumps over the lazy dog",
        string.ascii_lowercase,
        string.digits,
    ] * 20
    spiece = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=spiece,
        vocab_size=120,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(spiece.getvalue())
    tok = SiglipTokenizer(vocab_file=str(folder / "spiece.model"), model_max_length=64)
    torch.manual_seed(2)
    text = _text_config(len(tok))
    text.update(pad_token_id=1, eos_token_id=1, bos_token_id=None)
    config = SiglipConfig(
        text_config=text,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
    )
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-2.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_processor(
        folder,
        image_processor_type="SiglipImageProcessor",
        do_convert_rgb=True,
        resample=3,
        size={"height": 64, "width": 64},
    )
    return folder


# -- references -------------------------------------------------------------------------------------------
def open_clip_tokenizer():
    """open_clip's tokenizer module, the reference for SigLIP's text rules, loaded on its own: the package's
    __init__ imports torchvision, which the CPU build of torch used here cannot load. Skips without it."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or importlib.util.find_spec("ftfy") is None:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch; .ci/run does)")
    path = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("open_clip_tokenizer", path))
    module.__spec__.loader.exec_module(module)
    return module


def reference_image_embeddings(ckpt, paths) -> np.ndarray:
    """transformers' AutoProcessor + AutoModel on the photos: their unit image embeddings, in order."""
    import torch
    from PIL import ImageOps
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(ckpt)
    model = AutoModel.from_pretrained(ckpt).eval()
    out = []
    for i in range(0, len(paths), 32):
        # RGB first: the NaFlex processor does not convert grayscale photos itself and fails on them.
        images = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths[i : i + 32]]
        with torch.no_grad():
            feats = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
        out.append(torch.nn.functional.normalize(feats, dim=-1).numpy())
    return np.concatenate(out)


# -- images -----------------------------------------------------------------------------------------------
def make_image(path, size=(40, 30), color=(200, 30, 30), mode="RGB", fmt=None):
    """A plain image of one colour at path (its folders made), in the format its suffix names or fmt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def jpeg_bytes(color=(200, 30, 30), size=(40, 30)) -> bytes:
    """A JPEG of one colour, as bytes."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def jpeg(size=(64, 48), color=(200, 30, 30)) -> bytes:
    """jpeg_bytes, size first and a little larger by default (as the serve tests send them)."""
    return jpeg_bytes(color, size)


def b64(data: bytes) -> str:
    """data as a JSON body carries it."""
    return base64.b64encode(data).decode()


def make_library(root, n: int, size=(24, 18)):
    """n distinct small images, in a few folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / f"d{i % 7}" / f"img{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return root


def noise_photos(folder, n: int):
    """n photos of noise, 200x300: big enough that --max-patches changes their pixels."""
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


# -- outputs ----------------------------------------------------------------------------------------------
def table(path) -> dict:
    """An output's columns as lists: {column: [values, row by row]}."""
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    return {k: t.column(k).to_pylist() for k in t.column_names}


# -- faults injected --------------------------------------------------------------------------------------
def tight_memory(monkeypatch, fits: int) -> list[int]:
    """The encoder raises CUDA's out-of-memory error for chunks of more than `fits` images."""
    import torch

    from siglip_cli.model import Encoder

    sizes, clean = [], Encoder._encode

    def encode(self, args):
        sizes.append(len(args[0]))
        if len(args[0]) > fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return clean(self, args)

    monkeypatch.setattr(Encoder, "_encode", encode)
    return sizes


def hook_dir(tmp_path, code: str):
    """A sitecustomize.py that runs in every Python process of the run; `code` patches what it must."""
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": str(hooks)}


# Runs in the decode workers only (the main process and the resource tracker have no multiprocessing parent).
IN_WORKERS = """
import builtins, multiprocessing, os, signal, sys, time
_open = builtins.open
def open(file, *args, **kwargs):
    if multiprocessing.parent_process() is not None and isinstance(file, str) and file.endswith(".jpg"):
        name = os.path.basename(file)
        log = os.environ.get("SIGLIP_TEST_LOG")
        if log:
            with _open(log, "a") as f:
                loaded = [m for m in ("torch", "transformers", "pyarrow") if m in sys.modules]
                f.write(f"{os.getpid()} {name} {','.join(loaded)}\\n")
        if "slow" in name:
            time.sleep(0.8)
        if "stall" in name:
            time.sleep(600)
        if "flaky" in name and not os.path.exists(file + ".seen"):
            _open(file + ".seen", "w").close()
            os.kill(os.getpid(), signal.SIGBUS)  # the machine's fault (a full /dev/shm), once
    return _open(file, *args, **kwargs)
builtins.open = open
"""


CRASH_ALWAYS = (
    IN_WORKERS
    + """
_open2 = builtins.open
def open(file, *args, **kwargs):
    if multiprocessing.parent_process() is not None and isinstance(file, str) and file.endswith("crash-always.jpg"):
        os.kill(os.getpid(), signal.SIGSEGV)
    return _open2(file, *args, **kwargs)
builtins.open = open
"""
)


# -- a served `siglip serve` ------------------------------------------------------------------------------
def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A `siglip serve` process on a loopback port, and requests to it."""

    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.url = proc, f"http://127.0.0.1:{port}"

    def post(self, path: str, body, **kw):
        return httpx.post(self.url + path, json=body, timeout=60, **kw)

    def get(self, path: str, **kw):
        return httpx.get(self.url + path, timeout=10, **kw)

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024


def start(ckpt, *args, port: int | None = None) -> Served:
    """`siglip serve -m ckpt ARGS...` on a free port (or `port`), on the CPU in float32, once /ready answers 200."""
    port = port or free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "siglip_cli",
            "serve",
            "-m",
            str(ckpt),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "-j",
            "1",
            *map(str, args),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    served = Served(proc, port)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if served.get("/ready").status_code == 200:
                return served
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("serve was not ready in 120 s")


def stop(served: Served) -> None:
    """SIGTERM, and SIGKILL after 10 s."""
    served.proc.terminate()
    try:
        served.proc.wait(10)
    except subprocess.TimeoutExpired:
        served.proc.kill()
