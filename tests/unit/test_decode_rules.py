"""Decoding's rules as functions: the NaFlex target size, what is refused from a header and a size alone, the
conversion of any mode to RGB, and which failures a later run tries again (siglip_cli/decode.py). Images are a few
pixels, made here."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from siglip_cli.decode import RAISE_LIMIT, ImageSpec, decode, most_bytes, naflex_size, refusal, to_rgb
from siglip_cli.sources import FileRecord

from helpers import jpeg_bytes

SPEC = ImageSpec(height=16, width=16)


# -- the NaFlex size --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "height, width, want",
    [
        (256, 256, (256, 256)),  # 16 x 16 patches: exactly the budget
        (512, 512, (256, 256)),  # scaled down
        (10, 10, (256, 256)),  # scaled up to fill the budget
        (250, 1000, (128, 512)),  # 8 x 32 patches: the aspect kept
        (16, 10000, (16, 4096)),  # a strip: one patch high at least, 256 along
    ],
)
def test_naflex_size_fills_the_patch_budget_keeping_the_aspect(height, width, want):
    assert naflex_size(height, width, patch_size=16, max_patches=256) == want


def test_naflex_size_is_whole_patches_within_the_budget_for_any_image():
    rng = np.random.default_rng(0)
    for height, width in rng.integers(1, 6000, (300, 2)).tolist():
        for patch, budget in ((16, 256), (16, 1024), (14, 729)):
            h, w = naflex_size(height, width, patch, budget)
            assert h % patch == 0 and w % patch == 0 and h >= patch and w >= patch, (height, width)
            assert (h // patch) * (w // patch) <= budget, (height, width, patch, budget)


@pytest.mark.deps
def test_naflex_size_equals_transformers_siglip2_processor():
    """The same binary search as transformers' Siglip2 image processor, so a NaFlex image has the reference's
    patches exactly (tests/test_parity.py compares the embeddings)."""
    import importlib

    reference = None
    for module in ("image_processing_pil_siglip2", "image_processing_siglip2"):  # (the second needs torchvision)
        try:
            reference = importlib.import_module(f"transformers.models.siglip2.{module}")
            break
        except ImportError:
            continue
    get_image_size_for_max_num_patches = getattr(reference, "get_image_size_for_max_num_patches", None)
    if get_image_size_for_max_num_patches is None:
        pytest.skip("no Siglip2 image processor of transformers' with get_image_size_for_max_num_patches here")
    rng = np.random.default_rng(1)
    for height, width in [(1, 1), (16, 10000), (3000, 4000), *rng.integers(1, 5000, (200, 2)).tolist()]:
        for budget in (64, 256, 1024):
            assert naflex_size(height, width, 16, budget) == get_image_size_for_max_num_patches(
                height, width, 16, budget
            ), (height, width, budget)


# -- refused unread ---------------------------------------------------------------------------------------
def test_an_image_over_the_pixel_limit_or_a_file_too_big_for_its_size_is_refused_unread():
    assert refusal(4000, 3000, 5 << 20, max_pixels=10**8) is None
    assert refusal(100, 100, 1000, max_pixels=10_000) is None  # at the limit is within it
    over = refusal(100, 100, 1000, max_pixels=9_999)
    assert over == f"image is 100x100 = 10,000 pixels, over the limit of 9,999; {RAISE_LIMIT}"
    assert refusal(10, 10, most_bytes(10, 10), max_pixels=10**8) is None
    padded = refusal(10, 10, most_bytes(10, 10) + 1, max_pixels=10**8)  # a 1 GB "JPEG" of 10x10 pixels
    assert padded.startswith("not an image") and "more than a 10x10 image can take" in padded
    assert most_bytes(10, 10) > 10 * 10 * 8  # room for metadata, previews and a motion photo's video


# -- any mode to RGB --------------------------------------------------------------------------------------
def test_any_mode_becomes_rgb_with_transparency_on_white_and_high_bit_depths_scaled():
    clear = to_rgb(Image.new("RGBA", (2, 2), (200, 30, 30, 0)))
    assert clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGBA", (2, 2), (200, 30, 30, 255))).getpixel((1, 1)) == (200, 30, 30)
    assert to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    sixteen = to_rgb(Image.fromarray(np.array([[0, 65535]], np.uint16)))
    assert [sixteen.getpixel((x, 0)) for x in (0, 1)] == [(0, 0, 0), (255, 255, 255)]  # not clipped to white
    unit = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)))  # a float image in 0..1
    assert [unit.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)


# -- failures, and whether a later run tries them again ---------------------------------------------------
def test_vanished_and_limits(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_bytes())
    record = FileRecord(str(path), path.stat().st_size, path.stat().st_mtime_ns)
    small = ImageSpec(height=16, width=16, max_pixels=1000)
    assert "raise --max-pixels" in decode(record, small).error  # 40x30 = 1,200 pixels
    path.unlink()  # listed, then gone before it was read
    assert decode(record, SPEC).error == "file disappeared before it could be read"


def test_each_failure_is_tried_again_only_when_its_cause_may_be_gone(tmp_path, monkeypatch):
    """Judged without decoding: a cause that stays must not cost every nightly run the model's loading."""
    from siglip_cli import decode as d

    here, gone = tmp_path / "a.jpg", tmp_path / "gone.jpg"
    here.write_bytes(b"bytes")

    def may(error, pixels=None, max_pixels=10**8, timeout=60.0, path=here):
        return d.may_work_now(error, str(path), pixels, max_pixels, timeout)

    for lasting in (
        "not an image, or a format Pillow cannot read",
        "corrupt or truncated image: broken data stream",
        "empty file (0 bytes)",
        "the decoder crashed on this file",
        d.OUT_OF_MEMORY,
    ):
        assert not may(lasting), lasting
    assert may(d.UNREADABLE) and not may(d.UNREADABLE, path=gone)  # when it opens
    for read in (d.READ_ERROR + "Input/output error", "corrupt or truncated image: [Errno 5] Input/output error"):
        assert may(read) and not may(read, path=gone)  # when it reads (older versions called it corrupt)
    over = f"image is 64x48 = 3,072 pixels, over the limit of 2,000; {d.RAISE_LIMIT}"
    assert not may(over, 3072, 2000) and may(over, 3072, 4000)
    assert not may(over, None, 10**12)  # a size past the column's range (a lying header): past any limit
    stall = d.STALLED.format(3)
    assert not may(stall, timeout=3) and may(stall, timeout=10)
    assert not may(d.STALLED.format(12.34561), timeout=12.34561)  # the message rounds it: the same --timeout
    assert may(d.VANISHED) and not may(d.VANISHED, path=gone)  # there again
    monkeypatch.setattr(d, "HEIF", False)
    assert not may(d.NEEDS_HEIF)
    monkeypatch.setattr(d, "HEIF", True)
    assert may(d.NEEDS_HEIF)
    assert may("what an older version said")  # once: then it is written as this version says it

    import threading

    mount = threading.Event()

    def hangs(*a, **k):
        mount.wait(30)
        raise OSError("the mount came back")  # (let the probe's thread end quietly, after the test)

    monkeypatch.setattr("siglip_cli.decode.open", hangs, raising=False)  # a read that hangs (a network mount)
    started = time.monotonic()
    try:
        assert not may(d.UNREADABLE, timeout=0.3) and time.monotonic() - started < 5  # is not one the run waits for
    finally:
        mount.set()


def test_a_read_error_is_not_a_corrupt_image(tmp_path, monkeypatch):
    """EIO from a failing disk or a stale NFS handle is the read's fault, not the bytes': tried again next run."""
    import errno

    from siglip_cli.decode import may_work_now

    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_bytes()[:200])
    record = FileRecord(str(path), path.stat().st_size, path.stat().st_mtime_ns)
    cut = decode(record, SPEC).error
    assert cut.startswith("corrupt or truncated image") and not may_work_now(cut, str(path), None, 10**8, 60)

    def failing(*a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr("siglip_cli.decode.open", failing, raising=False)
    eio = decode(record, SPEC).error
    assert eio == "cannot read the file: Input/output error" and not may_work_now(eio, str(path), None, 10**8, 60)
    monkeypatch.undo()  # the disk reads again: the next run tries it
    assert may_work_now(eio, str(path), None, 10**8, 60)
