"""Every odd file gets a row: a corpus of what real photo folders hold, generated here, run through the CLI."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from siglip_cli.decode import ImageSpec, decode
from siglip_cli.sources import FileRecord

from helpers import jpeg_bytes, run_siglip


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb needs no more to be refused)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def build_corpus(root) -> dict[str, str]:
    """Writes the corpus; returns {name: 'ok' or a fragment of the expected error message}."""
    os.makedirs(root, exist_ok=True)
    expect = {}

    def put(name, data, outcome):
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        expect[name] = outcome

    good = jpeg_bytes()
    put("good.jpg", good, "ok")
    put("truncated.jpg", good[: len(good) // 2], "truncated")
    put("zero.jpg", b"", "empty")
    put("text.jpg", b"hello, not a picture\n", "not an image")
    buf = io.BytesIO()
    Image.new("RGB", (33, 21), (0, 90, 0)).save(buf, "PNG")
    put("png-named.jpg", buf.getvalue(), "ok")
    buf = io.BytesIO()
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(buf, "JPEG")
    put("cmyk.jpg", buf.getvalue(), "ok")
    gradient = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    for ext, fmt in (("tif", "TIFF"), ("png", "PNG")):
        buf = io.BytesIO()
        Image.fromarray(gradient).save(buf, fmt)
        put(f"gray16.{ext}", buf.getvalue(), "ok")
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.paste(1, (10, 0, 20, 20))
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=1)
    put("palette-alpha.png", buf.getvalue(), "ok")
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 0, 255))]
    for ext in ("gif", "webp"):
        buf = io.BytesIO()
        frames[0].save(buf, ext.upper(), save_all=True, append_images=frames[1:], duration=100, loop=0)
        put(f"animated.{ext}", buf.getvalue(), "ok")
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 120, 200)).save(buf, "AVIF")
    put("phone.avif", buf.getvalue(), "ok")
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (10, 120, 200)).save(buf, "HEIF")
        put("phone.heic", buf.getvalue(), "ok")
    except ImportError:
        pass
    put("bomb.png", png_with_size(100_000, 100_000), "--max-pixels")
    put(os.fsdecode(b"caf\xe9-latin1.jpg"), good, "ok")  # not valid UTF-8
    os.symlink("selfie.jpg", os.path.join(root, "selfie.jpg"))  # a link to itself
    expect["selfie.jpg"] = "symbolic links"
    os.mkdir(os.path.join(root, "loop"))
    os.symlink("..", os.path.join(root, "loop", "up"))  # a folder loop
    put(os.path.join("loop", "inside.jpg"), good, "ok")
    os.mkfifo(os.path.join(root, "fifo.jpg"))
    expect["fifo.jpg"] = "not a regular file"
    return expect


def rows_by_name(out, root):
    t = pq.read_table(out).to_pylist()
    return {os.path.relpath(os.fsdecode(r["path_bytes"]) if r["path_bytes"] else r["path"], root): r for r in t}


def check(rows, expect):
    assert set(rows) == set(expect), set(rows) ^ set(expect)
    for name, outcome in expect.items():
        r = rows[name]
        if outcome == "ok":
            assert r["status"] == "ok", (name, r["error"])
            assert len(r["embedding"]) == 32
        else:
            assert r["status"] == "error" and outcome in r["error"], (name, r["error"])
            assert r["embedding"] is None


def test_corpus_every_file_gets_a_row(fixed_ckpt, tmp_path):
    root = str(tmp_path / "corpus")
    expect = build_corpus(root)
    out = tmp_path / "out.parquet"
    listed = tmp_path / "list.txt"
    listed.write_bytes(b"/dev/zero\n" + os.fsencode(os.path.join(root, "vanished.jpg")) + b"\n")
    result = run_siglip(
        "embed", root, "--files-from", listed, "-o", out, "-m", fixed_ckpt, "-j", "2", "--timeout", "20"
    )
    assert result.returncode == 0, result.stderr
    rows = rows_by_name(out, root)
    assert rows.pop(os.path.relpath("/dev/zero", root))["error"] == "not a regular file"
    assert "no such file" in rows.pop("vanished.jpg")["error"]
    check(rows, expect)
    latin = rows[os.fsdecode(b"caf\xe9-latin1.jpg")]
    assert latin["path"].endswith("caf\ufffd-latin1.jpg")  # readable, and path_bytes has the exact name
    assert latin["path_bytes"] == os.fsencode(os.path.join(root, os.fsdecode(b"caf\xe9-latin1.jpg")))


def test_unchanged_rerun_of_the_corpus_keeps_odd_names(cli, fixed_ckpt, tmp_path):
    root = str(tmp_path / "corpus")
    build_corpus(root)
    out = tmp_path / "out"
    assert cli("embed", root, "-o", out, "-m", fixed_ckpt).exit_code == 0
    again = cli("embed", root, "-o", out, "-m", fixed_ckpt)
    assert again.exit_code == 0 and " 0 done" in again.stderr
    assert pq.read_table(out).num_rows == len(build_corpus(str(tmp_path / "c2")))


def test_json_lines_carry_odd_names(cli, fixed_ckpt, tmp_path):
    name = tmp_path / os.fsdecode(b"\xff\xfe.jpg")
    name.write_bytes(jpeg_bytes())
    import base64
    import json

    row = json.loads(cli("embed", name, "-o", "-", "-m", fixed_ckpt, "-q").stdout)
    assert row["status"] == "ok" and base64.b64decode(row["path_bytes"]) == os.fsencode(name)


SPEC = ImageSpec(height=16, width=16)


def test_decode_values_of_odd_modes(tmp_path):
    root = str(tmp_path)
    build_corpus(root)

    def pixels(name):
        d = decode(FileRecord(os.path.join(root, name)), SPEC)
        assert d.error is None, d.error
        return d.pixels.astype(int)

    g = pixels("gray16.png")
    assert g[0, 0, 0] < 20 and g[-1, -1, 0] > 235 and 100 < g.mean() < 155  # scaled, not clipped to white
    assert (pixels("gray16.tif") == g).all()
    pal = pixels("palette-alpha.png")  # transparent half composited onto white
    assert tuple(pal[8, 2]) == (255, 0, 0) and tuple(pal[8, 13]) == (255, 255, 255)
    assert pixels("animated.gif")[8, 8, 0] > 200 and pixels("animated.webp")[8, 8, 2] < 60  # the first frame: red
    c = pixels("cmyk.jpg")
    assert c[..., 0].mean() > 200 and c[..., 1].mean() < 60  # C0 M255 Y255 K0 is red


FAULTS = """
import builtins, multiprocessing, os, signal, time
_open = builtins.open
def open(file, *args, **kwargs):
    if multiprocessing.parent_process() is not None and isinstance(file, str):
        if file.endswith("crash.jpg"):
            os.kill(os.getpid(), signal.SIGSEGV)  # a decoder that segfaults
        if file.endswith("stall.jpg"):
            time.sleep(600)  # a read that never returns
    return _open(file, *args, **kwargs)
builtins.open = open
"""


def test_crashed_and_stalled_workers_cost_one_row_each(cli, fixed_ckpt, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(12):
        (lib / f"img{i:02d}.jpg").write_bytes(jpeg_bytes((20 * i, 100, 50)))
    clean = tmp_path / "clean.parquet"
    assert cli("embed", lib, "-o", clean, "-m", fixed_ckpt, "-j", "0").exit_code == 0
    (lib / "img03-crash.jpg").write_bytes(jpeg_bytes())
    (lib / "img07-stall.jpg").write_bytes(jpeg_bytes())
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(FAULTS)
    out = tmp_path / "out.parquet"
    result = run_siglip(
        "embed",
        lib,
        "-o",
        out,
        "-m",
        fixed_ckpt,
        "-j",
        "2",
        "-b",
        "4",
        "--timeout",
        "3",
        env={"PYTHONPATH": str(hooks)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = {os.path.basename(r["path"]): r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == 14
    assert "crashed" in rows.pop("img03-crash.jpg")["error"]
    assert "took over 3s" in rows.pop("img07-stall.jpg")["error"]
    ref = {os.path.basename(r["path"]): r for r in pq.read_table(clean).to_pylist()}
    assert rows.keys() == ref.keys()
    for name, r in rows.items():  # the other files are untouched by their neighbours' trouble
        assert r["status"] == "ok"
        np.testing.assert_allclose(r["embedding"], ref[name]["embedding"], atol=1e-5)


def test_unreadable_file_and_folder_are_read_once_they_can_be(fixed_ckpt, tmp_path):
    """Permissions stop only a process without CAP_DAC_OVERRIDE: as root, the run drops that capability.

    Reruns while they are unreadable do nothing (not even --rehash); the first run after a chmod reads them,
    without --retry-errors: the files' size and mtime did not change, only their permissions."""
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root, and setpriv (util-linux) is not there to drop CAP_DAC_OVERRIDE")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    lib = tmp_path / "lib"
    (lib / "private").mkdir(parents=True)
    for i, name in enumerate(("open.jpg", "secret.jpg", "private/hidden-away.jpg")):
        (lib / name).write_bytes(jpeg_bytes((80 * i, 30, 30)))
    (lib / "secret.jpg").chmod(0o000)
    (lib / "private").chmod(0o000)
    out = tmp_path / "out.parquet"

    def embed(*more):
        return subprocess.run(
            [
                *prefix,
                sys.executable,
                "-m",
                "siglip_cli",
                "embed",
                str(lib),
                "-o",
                str(out),
                "-m",
                str(fixed_ckpt),
                "-j",
                "1",
                *more,
            ],
            capture_output=True,
            text=True,
        )

    try:
        result = embed()
        again = [embed(), embed("--rehash")]
    finally:
        (lib / "private").chmod(0o755)
    assert result.returncode == 0, result.stderr
    rows = {os.path.relpath(r["path"], lib): r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == {"open.jpg", "secret.jpg", "private"}
    assert rows["open.jpg"]["status"] == "ok"
    assert "permission denied" in rows["secret.jpg"]["error"]
    assert "cannot read folder" in rows["private"]["error"]
    for rerun in again:
        assert rerun.returncode == 0 and "3 unchanged" in rerun.stderr and "0 done" in rerun.stderr, rerun.stderr
    (lib / "secret.jpg").chmod(0o644)
    healed = embed()  # (dropped capabilities still: as root, this process reads anything)
    assert healed.returncode == 0 and "2 done" in healed.stderr, healed.stderr
    rows = {os.path.relpath(r["path"], lib): r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == {"open.jpg", "secret.jpg", "private/hidden-away.jpg"}  # the folder's error row is gone
    assert all(r["status"] == "ok" for r in rows.values())


def test_a_failure_of_passing_circumstances_is_tried_again_and_one_of_the_bytes_is_not(
    cli, fixed_ckpt, tmp_path, monkeypatch
):
    """The remedy an error names works on the next run, without --retry-errors; until then, and for a file whose
    bytes are at fault, a rerun neither decodes nor loads the model."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "ok.jpg").write_bytes(jpeg_bytes((10, 200, 10)))
    (lib / "big.jpg").write_bytes(jpeg_bytes((200, 10, 10), size=(64, 48)))
    (lib / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (lib / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic, cut short")
    out = tmp_path / "out.parquet"
    monkeypatch.setattr("siglip_cli.decode.HEIF", False)  # the extra not installed (-j 0: decoded in this process)
    first = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "0", "--max-pixels", "2000")
    assert first.exit_code == 0, first.stderr
    errors = {os.path.basename(r["path"]): r["error"] for r in pq.read_table(out).to_pylist()}
    assert errors["ok.jpg"] is None and "raise --max-pixels" in errors["big.jpg"]
    assert "not an image" in errors["bad.jpg"] and "heif extra" in errors["phone.heic"]

    def forbidden(*a, **k):
        raise AssertionError("nothing has changed: no model, no decoding")

    with monkeypatch.context() as m:
        m.setattr("siglip_cli.pipeline.Encoder.load_all", forbidden)
        m.setattr("siglip_cli.loader.decoded_chunks", forbidden)
        same = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "0", "--max-pixels", "3000")
        assert same.exit_code == 0 and "4 unchanged" in same.stderr, same.stderr
    monkeypatch.setattr("siglip_cli.decode.HEIF", True)  # installed
    healed = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "0", "--max-pixels", "4000")
    assert healed.exit_code == 0 and "2 done (1 ok, 1 failed), 2 unchanged" in healed.stderr, healed.stderr
    rows = {os.path.basename(r["path"]): r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == 4 and rows["big.jpg"]["status"] == "ok"
    assert "not an image" in rows["phone.heic"]["error"]  # read now, and its bytes are at fault: it stays
    again = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "0")
    assert "4 unchanged" in again.stderr
