"""Photo libraries as they are on a NAS: system, thumbnail and recycle folders are not photos; --exclude and
.siglipignore leave out what the user says; nothing left out is pruned as if it were deleted."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from PIL import Image

ARGS = ["-m", None, "--backend", "torch", "-q", "-j", "0"]


def photo(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path)
    return path


def paths(out) -> list[str]:
    return sorted(pq.read_table(out).column("path").to_pylist())


@pytest.fixture
def synology(tmp_path):
    """/volume1/photo as Synology Photos leaves it, with QNAP's, Windows' and Linux's own folders mixed in."""
    root = tmp_path / "photo"
    real = [photo(root / "2024" / "IMG_0001.jpg"), photo(root / "2024" / "IMG_0002.jpg", (0, 90, 200))]
    for name in ("IMG_0001.jpg", "IMG_0002.jpg"):
        for thumb in ("SYNOPHOTO_THUMB_XL.jpg", "SYNOPHOTO_THUMB_M.jpg", "SYNOPHOTO_THUMB_SM.jpg"):
            photo(root / "2024" / "@eaDir" / name / thumb)
    photo(root / "#recycle" / "deleted.jpg")
    photo(root / "@Recycle" / "old.jpg")
    photo(root / "@Recently-Snapshot" / "GMT+01_2024-01-01" / "IMG_0001.jpg")
    photo(root / "$RECYCLE.BIN" / "S-1-5-21" / "x.jpg")
    photo(root / "lost+found" / "#1234.jpg")
    photo(root / ".thumbnails" / "t.jpg")
    return root, real


def test_one_row_per_real_photo_of_a_synology_share(cli, fixed_ckpt, synology, tmp_path):
    root, real = synology
    out = tmp_path / "index.parquet"
    assert cli("embed", root, "-o", out, *[fixed_ckpt if a is None else a for a in ARGS]).exit_code == 0
    assert paths(out) == sorted(str(p) for p in real)
    # --include-hidden walks them all
    every = tmp_path / "every.parquet"
    assert (
        cli("embed", root, "-o", every, "--include-hidden", *[fixed_ckpt if a is None else a for a in ARGS]).exit_code
        == 0
    )
    assert len(paths(every)) == 2 + 6 + 6  # the photos, their thumbnails, one in each other folder


def test_exclude_and_siglipignore_are_honoured_and_never_pruned(cli, fixed_ckpt, tmp_path):
    args = [fixed_ckpt if a is None else a for a in ARGS]
    root = tmp_path / "lib"
    keep = [photo(root / "a.jpg"), photo(root / "trips" / "b.jpg"), photo(root / "trips" / "raw" / "keep.png")]
    photo(root / "Screenshots" / "s.png")
    photo(root / "trips" / "drafts" / "d.jpg")
    photo(root / "trips" / "raw" / "c.png")
    (root / "trips" / ".siglipignore").write_text("# drafts and raw pngs\ndrafts/\nraw/*.png\n!raw/keep.png\n")
    out = tmp_path / "index.parquet"
    assert cli("embed", root, "-o", out, "--exclude", "Screenshots", *args).exit_code == 0
    assert paths(out) == sorted(str(p) for p in keep)
    # a relative glob; then the same run without it: the rows it made before are kept, never pruned as deleted
    assert (
        cli("embed", root, "-o", out, "--exclude", "Screenshots", "--exclude", "trips/*", "--prune", *args).exit_code
        == 0
    )
    assert paths(out) == sorted(str(p) for p in keep)
    # a file named on the command line is taken whatever the exclusions say
    r = cli("embed", root / "Screenshots" / "s.png", "-o", "-", "--exclude", "Screenshots", *args)
    assert r.exit_code == 0 and '"status": "ok"' in r.stdout
