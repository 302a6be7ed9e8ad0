"""The fast decode path (JPEG DCT scaling) against the exact one, and --exact through the CLI."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from siglip_cli.decode import ImageSpec, decode
from siglip_cli.sources import FileRecord


@pytest.fixture(scope="module")
def camera_jpeg(tmp_path_factory, photos):
    """A 12-megapixel JPEG with camera-like noise, made from a real photo, and a copy turned by EXIF."""
    rng = np.random.default_rng(0)
    src = Image.open(sorted(photos.glob("*.JPEG"))[0]).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    noisy = np.clip(np.asarray(src, np.float32) + rng.normal(0, 8, (3000, 4000, 3)), 0, 255).astype(np.uint8)
    folder = tmp_path_factory.mktemp("camera")
    plain, turned = folder / "plain.jpg", folder / "turned.jpg"
    Image.fromarray(noisy).save(plain, quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(noisy).save(turned, quality=90, exif=exif)
    return plain, turned


@pytest.mark.parametrize(
    "spec",
    [
        ImageSpec(height=384, width=384),
        ImageSpec(height=224, width=224),
        ImageSpec(naflex=True, patch_size=16, max_patches=256),
    ],
    ids=["384", "224", "naflex"],
)
def test_fast_within_one_level_of_exact(camera_jpeg, spec):
    for path in camera_jpeg:
        fast = decode(FileRecord(str(path)), spec)
        exact = decode(FileRecord(str(path)), ImageSpec(**{**spec.__dict__, "exact": True}))
        assert fast.error is None and exact.error is None
        assert (fast.width, fast.height) == (exact.width, exact.height)
        assert fast.grid == exact.grid and fast.pixels.shape == exact.pixels.shape
        mad = np.abs(fast.pixels.astype(int) - exact.pixels.astype(int)).mean()
        assert mad <= 1.0, f"{path.name}: mean absolute difference {mad:.3f}/255"
    turned = decode(FileRecord(str(camera_jpeg[1])), spec)
    assert (turned.width, turned.height) == (3000, 4000)  # the EXIF turn is applied


def test_small_photos_are_bit_exact_either_way(photos):
    """Photos under 4 megapixels always take the exact path (so the parity tests see it too)."""
    for path in sorted(photos.glob("*.JPEG"))[:20]:
        for size in (64, 224, 384):
            a = decode(FileRecord(str(path)), ImageSpec(height=size, width=size))
            b = decode(FileRecord(str(path)), ImageSpec(height=size, width=size, exact=True))
            assert (a.pixels == b.pixels).all()


def test_exact_option_through_the_cli(cli, fixed_ckpt, camera_jpeg, tmp_path):
    fast, exact = tmp_path / "fast.parquet", tmp_path / "exact.parquet"
    assert cli("embed", camera_jpeg[0], "-o", fast, "-m", fixed_ckpt).exit_code == 0
    assert cli("embed", camera_jpeg[0], "-o", exact, "-m", fixed_ckpt, "--exact").exit_code == 0
    a, b = (np.array(pq.read_table(p).column("embedding")[0].as_py()) for p in (fast, exact))
    assert a @ b > 0.999 and not np.array_equal(a, b)


def test_compile_gives_the_eager_embeddings(cli, fixed_ckpt, photos, tmp_path, monkeypatch):
    """--compile on the CPU (inductor's C++ backend), with a last batch smaller than the rest (padded)."""
    monkeypatch.setenv("SIGLIP_CACHE_DIR", str(tmp_path / "cache"))
    paths = sorted(photos.glob("*.JPEG"))[:21]
    eager, compiled = tmp_path / "eager.parquet", tmp_path / "compiled.parquet"
    assert cli("embed", *paths, "-o", eager, "-m", fixed_ckpt, "-b", "8", "--device", "cpu").exit_code == 0
    result = cli("embed", *paths, "-o", compiled, "-m", fixed_ckpt, "-b", "8", "--device", "cpu", "--compile")
    assert result.exit_code == 0, result.stderr
    a, b = (np.stack(pq.read_table(p).column("embedding").to_numpy(zero_copy_only=False)) for p in (eager, compiled))
    assert a.shape == b.shape == (21, 32)
    assert (a * b).sum(axis=1).min() > 0.9999
    assert (tmp_path / "cache" / "inductor").is_dir()  # compiled artefacts kept for the next run
