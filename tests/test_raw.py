"""Camera RAW files through their embedded previews, or developed where they have none: DNGs made here from a
photo's Bayer mosaic (pidng), one with a JPEG preview added as camera DNGs carry it."""

from __future__ import annotations

import json
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import run_siglip

pytestmark = pytest.mark.deps
pytest.importorskip("rawpy", reason="the raw extra (pip install 'siglip-cli[raw]')")
pidng = pytest.importorskip("pidng", reason="pidng writes the test DNGs")

TORCH = ["--device", "cpu", "--dtype", "float32", "--backend", "torch", "-q", "-j", "0"]


def dng(path, photo, preview: bytes | None = None):
    """A 12-bit RGGB DNG of the photo's mosaic; with `preview`, a JPEG the file's IFD1 points at (tags 513/514),
    where LibRaw finds a camera's preview."""
    from pidng.core import RAW2DNG, DNGTags, Tag
    from pidng.defs import CalibrationIlluminant, CFAPattern, DNGVersion, Orientation, PhotometricInterpretation

    rgb = np.asarray(Image.open(photo).convert("RGB").resize((256, 192)))
    h, w = rgb.shape[:2]
    bayer = np.zeros((h, w), np.uint16)
    bayer[0::2, 0::2], bayer[0::2, 1::2] = rgb[0::2, 0::2, 0], rgb[0::2, 1::2, 1]
    bayer[1::2, 0::2], bayer[1::2, 1::2] = rgb[1::2, 0::2, 1], rgb[1::2, 1::2, 2]
    t = DNGTags()
    for tag, value in [
        (Tag.ImageWidth, w), (Tag.ImageLength, h), (Tag.TileWidth, w), (Tag.TileLength, h),
        (Tag.Orientation, Orientation.Horizontal), (Tag.SamplesPerPixel, 1), (Tag.BitsPerSample, 12),
        (Tag.PhotometricInterpretation, PhotometricInterpretation.Color_Filter_Array),
        (Tag.CFARepeatPatternDim, [2, 2]), (Tag.CFAPattern, CFAPattern.RGGB), (Tag.BlackLevel, 0),
        (Tag.WhiteLevel, 4095), (Tag.CalibrationIlluminant1, CalibrationIlluminant.D65),
        (Tag.ColorMatrix1, [[1, 1], [0, 1], [0, 1], [0, 1], [1, 1], [0, 1], [0, 1], [0, 1], [1, 1]]),
        (Tag.AsShotNeutral, [[1, 1], [1, 1], [1, 1]]), (Tag.Make, "siglip"), (Tag.Model, "test"),
        (Tag.DNGVersion, DNGVersion.V1_4), (Tag.DNGBackwardVersion, DNGVersion.V1_2),
    ]:  # fmt: skip
        t.set(tag, value)
    r = RAW2DNG()
    r.options(t, path="", compress=False)
    r.convert((bayer << 4).astype(np.uint16), filename=str(path.with_suffix("")))
    if preview is not None:
        _add_preview(path, preview)
    return path


def _add_preview(path, jpeg: bytes) -> None:
    data = bytearray(path.read_bytes())
    assert data[:4] == b"II*\x00"
    ifd0 = struct.unpack_from("<I", data, 4)[0]
    n = struct.unpack_from("<H", data, ifd0)[0]
    ifd1 = len(data) + (len(data) % 2)
    data += b"\0" * (ifd1 - len(data))
    struct.pack_into("<I", data, ifd0 + 2 + 12 * n, ifd1)  # IFD0's next: IFD1
    at = ifd1 + 2 + 3 * 12 + 4
    entries = [(254, 4, 1, 1), (513, 4, 1, at), (514, 4, 1, len(jpeg))]  # a reduced image: the JPEG's place
    data += struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0" * 4
    path.write_bytes(bytes(data) + jpeg)


def rows(out) -> list[dict]:
    return pq.read_table(out).to_pylist()


def test_a_dng_with_a_preview_is_that_preview_and_one_without_is_developed(cli, fixed_ckpt, photos, tmp_path):
    photo = sorted(photos.glob("*.JPEG"))[0]
    preview = tmp_path / "preview.jpg"
    Image.open(photo).convert("RGB").resize((400, 300)).save(preview, quality=92)
    lib = tmp_path / "lib"
    lib.mkdir()
    dng(lib / "with_preview.dng", photo, preview.read_bytes())
    dng(lib / "no_preview.dng", photo)
    out = tmp_path / "o.parquet"
    assert cli("embed", lib, preview, "-o", out, "-m", fixed_ckpt, *TORCH).exit_code == 0
    got = {r["path"].rsplit("/", 1)[1]: r for r in rows(out)}
    assert {k: r["status"] for k, r in got.items()} == {
        "with_preview.dng": "ok",
        "no_preview.dng": "ok",
        "preview.jpg": "ok",
    }
    a, b = (np.array(got[k]["embedding"]) for k in ("with_preview.dng", "preview.jpg"))
    assert float(a @ b) >= 0.9999  # the preview the camera rendered, exactly
    assert (got["no_preview.dng"]["width"], got["no_preview.dng"]["height"]) == (256, 192)


def test_a_raw_and_jpeg_pair_is_one_row_and_without_the_extra_a_raw_says_so(cli, fixed_ckpt, photos, tmp_path):
    photo = sorted(photos.glob("*.JPEG"))[1]
    lib = tmp_path / "lib"
    lib.mkdir()
    dng(lib / "IMG_0001.DNG", photo)
    Image.open(photo).convert("RGB").save(lib / "IMG_0001.JPG")
    dng(lib / "IMG_0002.dng", photo)
    out = tmp_path / "o.parquet"
    assert cli("embed", lib, "-o", out, "-m", fixed_ckpt, *TORCH).exit_code == 0
    assert sorted(r["path"].rsplit("/", 1)[1] for r in rows(out)) == ["IMG_0001.JPG", "IMG_0002.dng"]
    both = tmp_path / "both.parquet"
    assert cli("embed", lib, "-o", both, "--raw-pairs", "-m", fixed_ckpt, *TORCH).exit_code == 0
    assert len(rows(both)) == 3
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text("import sys\nsys.modules['rawpy'] = None\n")
    r = run_siglip("embed", lib / "IMG_0002.dng", "-o", "-", "-m", fixed_ckpt, *TORCH, env={"PYTHONPATH": str(hooks)})
    row = json.loads(r.stdout)
    assert r.returncode == 0 and row["status"] == "error" and "pip install 'siglip-cli[raw]'" in row["error"]
