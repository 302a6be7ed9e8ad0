"""Shared fixtures: tiny random-weight checkpoints built offline, the shared photos, and a CLI runner."""

from __future__ import annotations

import os
import string
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
IMAGES = SHARED / "images"
RAM_TAGS = SHARED / "ram_tag_list.txt"

# Never reach the network from a test.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """Text-embedding and OpenVINO caches of the session's own, never the user's ~/.cache/siglip."""
    if "SIGLIP_CACHE_DIR" not in os.environ:
        os.environ["SIGLIP_CACHE_DIR"] = str(tmp_path_factory.mktemp("siglip-cache"))


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
    import io

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


@pytest.fixture(scope="session")
def v1_ckpt(tmp_path_factory) -> Path:
    pytest.importorskip("sentencepiece", reason="SigLIP 1 tokenizers need sentencepiece (a dependency)")
    return build_v1(tmp_path_factory.mktemp("siglip-v1"))


@pytest.fixture(scope="session")
def fixed_ckpt(tmp_path_factory) -> Path:
    return build_fixed(tmp_path_factory.mktemp("siglip-fixed"))


@pytest.fixture(scope="session")
def naflex_ckpt(tmp_path_factory) -> Path:
    return build_naflex(tmp_path_factory.mktemp("siglip-naflex"))


@pytest.fixture(params=["fixed", "naflex"])
def ckpt(request, fixed_ckpt, naflex_ckpt) -> Path:
    """Each test that takes it runs on both checkpoint layouts."""
    return fixed_ckpt if request.param == "fixed" else naflex_ckpt


@pytest.fixture(params=["v1", "fixed", "naflex"])
def any_ckpt(request, v1_ckpt, fixed_ckpt, naflex_ckpt) -> Path:
    """SigLIP 1, and SigLIP 2 in both layouts."""
    return {"v1": v1_ckpt, "fixed": fixed_ckpt, "naflex": naflex_ckpt}[request.param]


@pytest.fixture(scope="session")
def photos() -> Path:
    if not IMAGES.is_dir():
        pytest.skip(f"the shared photos are not at {IMAGES}")
    return IMAGES.resolve()  # as rows name them: folders resolved (shared/ may be reached through a link)


@pytest.fixture(scope="session")
def ram_tags() -> Path:
    if not RAM_TAGS.is_file():
        pytest.skip(f"the RAM tag list is not at {RAM_TAGS}")
    return RAM_TAGS


@pytest.fixture
def cli():
    """Run `siglip ARGS...` in-process like a user would; returns the click Result (stdout and stderr apart)."""
    from typer.testing import CliRunner

    from siglip_cli.cli import app

    runner = CliRunner(env={"COLUMNS": "200"})  # rich wraps error boxes at the terminal width

    def invoke(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke


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
