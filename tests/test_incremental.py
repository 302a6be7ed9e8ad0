"""Cron-safe runs: kill -9 and resume, incremental reruns, changed and deleted files, settings, the lock."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import make_library, noise_photos, run_siglip


def table(out):
    return pq.read_table(out).sort_by("path")


def vectors(t):
    return np.stack(t.column("embedding").to_numpy(zero_copy_only=False))


@pytest.fixture(scope="module")
def big_library(tmp_path_factory):
    return make_library(tmp_path_factory.mktemp("big"), 3000, size=(8, 8))


@pytest.mark.parametrize("layout", ["folder", "file.parquet"])
def test_kill_9_then_rerun_gives_every_file_once(cli, fixed_ckpt, tmp_path, layout):
    lib = make_library(tmp_path / "lib", 600)
    ref_out = tmp_path / "ref.parquet"
    assert cli("embed", lib, "-o", ref_out, "-m", fixed_ckpt, "-j", "0", "-b", "8").exit_code == 0

    out = tmp_path / layout
    parts = tmp_path / ("folder" if layout == "folder" else ".file.parquet.parts")
    cmd = [
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
        "0",
        "-b",
        "8",
        "-q",
    ]
    env = {**os.environ, "SIGLIP_FLUSH_ROWS": "32"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and len([p for p in os.listdir(parts) if p.endswith(".parquet")]) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: make the library bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    done = pq.read_table(parts).num_rows  # what the killed run left is readable as it is
    assert 0 < done < 600
    rerun = cli(
        "embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "0", "-b", "8"
    )  # (only the killed run needs a process)
    assert rerun.exit_code == 0, rerun.stderr
    assert f"{done:,} unchanged" in rerun.stderr
    got, ref = table(out), table(ref_out)
    assert got.column("path").to_pylist() == ref.column("path").to_pylist()  # every file exactly once
    np.testing.assert_allclose(vectors(got), vectors(ref), atol=1e-5)
    if layout != "folder":
        assert not parts.exists()  # merged into the one file


def test_unchanged_rerun_neither_decodes_nor_loads_the_model(cli, fixed_ckpt, big_library, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = cli("embed", big_library, "-o", out, "-m", fixed_ckpt, "-b", "128")
    assert first.exit_code == 0, first.stderr

    def forbidden(*a, **k):
        raise AssertionError("an unchanged rerun must not load the model or decode")

    monkeypatch.setattr("siglip_cli.pipeline.Encoder.load", forbidden)
    monkeypatch.setattr("siglip_cli.loader.decoded_chunks", forbidden)
    parts_before = sorted(os.listdir(out))
    again = cli("embed", big_library, "-o", out, "-m", fixed_ckpt)
    assert again.exit_code == 0, again.stderr
    assert "3,000 unchanged" in again.stderr and "0 done" in again.stderr
    assert sorted(os.listdir(out)) == parts_before


def test_changed_file_replaces_its_row(cli, fixed_ckpt, tmp_path):
    lib = make_library(tmp_path / "lib", 20)
    out = tmp_path / "out"
    assert cli("embed", lib, "-o", out, "-m", fixed_ckpt).exit_code == 0
    before = table(out)
    target = lib / "d3" / "img00003.png"
    Image.new("RGB", (30, 30), (0, 0, 255)).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    result = cli("embed", lib, "-o", out, "-m", fixed_ckpt)
    assert result.exit_code == 0 and "1 done" in result.stderr and "19 unchanged" in result.stderr
    after = table(out)
    assert after.column("path").to_pylist() == before.column("path").to_pylist()
    i = after.column("path").to_pylist().index(str(target))
    assert after.column("width")[i].as_py() == 30
    assert not np.allclose(vectors(after)[i], vectors(before)[i])
    assert np.allclose(np.delete(vectors(after), i, 0), np.delete(vectors(before), i, 0))


def test_rehash_finds_content_changes_that_keep_size_and_mtime(cli, fixed_ckpt, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    a = lib / "a.bmp"  # BMP: same size on disk for any pixels
    Image.new("RGB", (16, 16), (255, 0, 0)).save(a)
    out = tmp_path / "out.parquet"
    assert cli("embed", lib, "-o", out, "-m", fixed_ckpt).exit_code == 0
    st = a.stat()
    Image.new("RGB", (16, 16), (0, 255, 0)).save(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert a.stat().st_size == st.st_size
    assert "1 unchanged" in cli("embed", lib, "-o", out, "-m", fixed_ckpt).stderr
    result = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "--rehash")
    assert "1 done" in result.stderr
    assert pq.read_table(out).num_rows == 1


def test_deleted_file_kept_unless_prune(cli, fixed_ckpt, tmp_path):
    lib = make_library(tmp_path / "lib", 10)
    for out in (tmp_path / "out", tmp_path / "out.parquet"):
        assert cli("embed", lib, "-o", out, "-m", fixed_ckpt).exit_code == 0
    gone = lib / "d0" / "img00000.png"
    gone.unlink()
    for out in (tmp_path / "out", tmp_path / "out.parquet"):
        assert cli("embed", lib, "-o", out, "-m", fixed_ckpt).exit_code == 0
        assert str(gone) in table(out).column("path").to_pylist()
        result = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "--prune")
        assert "1 pruned" in result.stderr
        paths = table(out).column("path").to_pylist()
        assert str(gone) not in paths and len(paths) == 9


def test_other_model_needs_overwrite(cli, fixed_ckpt, naflex_ckpt, tmp_path):
    lib = make_library(tmp_path / "lib", 5)
    for out in (tmp_path / "out", tmp_path / "out.parquet"):
        assert cli("embed", lib, "-o", out, "-m", fixed_ckpt).exit_code == 0
        refused = cli("embed", lib, "-o", out, "-m", naflex_ckpt)
        assert refused.exit_code == 1
        assert "different settings" in refused.stderr and "--overwrite" in refused.stderr
        assert cli("embed", lib, "-o", out, "-m", naflex_ckpt, "--overwrite").exit_code == 0
        t = table(out)
        assert t.num_rows == 5
        from siglip_cli.sink import read_metadata

        assert read_metadata(str(out))["architecture"] == "Siglip2Model"
        assert cli("embed", lib, "-o", out, "-m", naflex_ckpt).exit_code == 0  # now it fits


def test_tag_settings_are_part_of_the_output(cli, fixed_ckpt, tmp_path):
    lib = make_library(tmp_path / "lib", 3)
    vocab = tmp_path / "v.txt"
    vocab.write_text("red\nsky\n")
    out = tmp_path / "tags"
    assert cli("tag", lib, "--vocab", vocab, "-o", out, "-m", fixed_ckpt).exit_code == 0
    changed = cli("tag", lib, "--vocab", vocab, "--template", "a {}", "-o", out, "-m", fixed_ckpt)
    assert changed.exit_code == 1 and "templates" in changed.stderr
    vocab.write_text("red\nsky\ngrass\n")
    assert cli("tag", lib, "--vocab", vocab, "-o", out, "-m", fixed_ckpt).exit_code == 1


def hold_lock(lock_path, pid_text="4242\n"):
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, pid_text.encode(), 0)
    return fd


def test_second_run_on_a_locked_output_exits_1_or_waits(fixed_ckpt, tmp_path):
    lib = make_library(tmp_path / "lib", 3)
    out = tmp_path / "out.parquet"
    lock = tmp_path / ".out.parquet.lock"
    fd = hold_lock(lock)
    try:
        refused = run_siglip("embed", lib, "-o", out, "-m", fixed_ckpt)
        assert refused.returncode == 1
        assert "pid 4242" in refused.stderr and str(lock) in refused.stderr and "--wait" in refused.stderr
        waiting = subprocess.Popen(
            [sys.executable, "-m", "siglip_cli", "embed", str(lib), "-o", str(out), "-m", str(fixed_ckpt), "--wait"],
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)
        assert waiting.poll() is None  # still waiting for the lock
    finally:
        os.close(fd)
    assert waiting.wait(timeout=120) == 0
    assert pq.read_table(out).num_rows == 3


def test_two_runs_at_once(fixed_ckpt, tmp_path):
    lib = make_library(tmp_path / "lib", 400)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "siglip_cli", "embed", str(lib), "-o", str(out), "-m", str(fixed_ckpt), "-j", "0"]
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / ".siglip.lock").exists() or not (out / ".siglip.lock").read_text().strip():
        assert time.time() < deadline and first.poll() is None, "the first run never took the lock"
        time.sleep(0.02)
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert first.wait(timeout=120) == 0
    assert second.returncode == 1 and f"pid {first.pid}" in second.stderr
    assert pq.read_table(out).num_rows == 400


def test_stale_lock_of_a_dead_process_is_taken_over(cli, fixed_ckpt, tmp_path):
    lib = make_library(tmp_path / "lib", 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".siglip.lock").write_text("999999\n")  # left by a process that died; nobody holds the flock
    assert cli("embed", lib, "-o", out, "-m", fixed_ckpt).exit_code == 0
    assert pq.read_table(out).num_rows == 3


def test_examples_nightly_and_query(fixed_ckpt, tmp_path):
    """The cron example twice (the second run finds nothing to do), then the DuckDB example over its output."""
    lib = make_library(tmp_path / "photos", 12)
    (tmp_path / "v.txt").write_text("red\nsky\n")
    bindir = os.path.dirname(sys.executable)
    env = {
        **os.environ,
        "SIGLIP_MODEL": str(fixed_ckpt),
        "SIGLIP_VOCAB": str(tmp_path / "v.txt"),
        "PATH": bindir + os.pathsep + os.environ["PATH"],
    }
    examples = os.path.join(os.path.dirname(__file__), "..", "examples")
    for _ in range(2):
        nightly = subprocess.run(
            ["bash", f"{examples}/nightly.sh", str(lib), str(tmp_path / "index")],
            capture_output=True,
            text=True,
            env=env,
        )
        assert nightly.returncode == 0, nightly.stderr
    assert pq.read_table(tmp_path / "index" / "embeddings").num_rows == 12
    query = subprocess.run(
        ["bash", f"{examples}/query.sh", str(tmp_path / "index")], capture_output=True, text=True, env=env
    )
    assert query.returncode == 0, query.stderr
    assert "most frequent tags" in query.stdout and "img00000.png" in query.stdout


def test_max_patches_is_recorded_as_the_setting_it_is(cli, fixed_ckpt, naflex_ckpt, tmp_path):
    """--max-patches equal to the checkpoint's default is the default (an index made without it takes the run,
    and one made with it, by an older version, takes a run without it); on a fixed-resolution checkpoint it
    means nothing: a note, and not part of the settings. Another value is another setting."""
    from siglip_cli.sink import read_metadata

    lib = make_library(tmp_path / "lib", 4)
    out = tmp_path / "naflex.parquet"
    assert cli("embed", lib, "-o", out, "-m", naflex_ckpt).exit_code == 0
    again = cli("embed", lib, "-o", out, "-m", naflex_ckpt, "--max-patches", "256")
    assert again.exit_code == 0, again.stderr
    assert read_metadata(str(out))["signature"]["max_patches"] is None
    refused = cli("embed", lib, "-o", out, "-m", naflex_ckpt, "--max-patches", "64")
    assert refused.exit_code == 1 and "different settings" in refused.stderr

    # an index written by an older version, which recorded --max-patches 256 as 256
    t = pq.read_table(out)
    meta = read_metadata(str(out))
    meta["signature"]["max_patches"] = 256
    pq.write_table(
        t.replace_schema_metadata({**t.schema.metadata, b"siglip": __import__("json").dumps(meta).encode()}), out
    )
    assert read_metadata(str(out))["signature"]["max_patches"] == 256
    (lib / "new.png").write_bytes((lib / "d0" / "img00000.png").read_bytes())
    later = cli("embed", lib, "-o", out, "-m", naflex_ckpt)
    assert later.exit_code == 0, later.stderr
    assert table(out).num_rows == 5

    fixed = tmp_path / "fixed.parquet"
    noted = cli("embed", lib, "-o", fixed, "-m", fixed_ckpt, "--max-patches", "64")
    assert noted.exit_code == 0 and "--max-patches is for NaFlex checkpoints" in noted.stderr
    assert read_metadata(str(fixed))["signature"]["max_patches"] is None
    assert cli("embed", lib, "-o", fixed, "-m", fixed_ckpt).exit_code == 0


def test_an_image_query_is_embedded_with_the_index_s_max_patches(cli, naflex_ckpt, tmp_path):
    """search --image of a file outside the index is embedded as the index's images were (its --max-patches):
    an exact copy of an indexed photo scores 1 against it."""
    lib = noise_photos(tmp_path / "lib", 3)
    out = tmp_path / "idx.parquet"
    assert cli("embed", lib, "-o", out, "-m", naflex_ckpt, "--max-patches", "16").exit_code == 0
    copy = tmp_path / "copy.png"
    copy.write_bytes((lib / "p1.png").read_bytes())
    result = cli("search", out, "--image", copy, "--json", "-k", "1")
    assert result.exit_code == 0, result.stderr
    import json

    (top,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert top["path"] == str(lib / "p1.png") and top["score"] > 0.9999


def test_an_overwrite_that_was_stopped_is_told_and_finished(cli, fixed_ckpt, naflex_ckpt, tmp_path):
    """A run with --overwrite killed before its end leaves rows of both settings: the next run says so (it said
    only "made with different settings", the settings of the rows the user had just replaced), and a rerun with
    --overwrite finishes it, keeping the rows it had made."""
    import shutil

    lib = make_library(tmp_path / "lib", 5)
    out, other = tmp_path / "out", tmp_path / "other"
    assert cli("embed", lib, "-o", out, "-m", fixed_ckpt).exit_code == 0
    assert cli("embed", *sorted(lib.rglob("*.png"))[:3], "-o", other, "-m", naflex_ckpt).exit_code == 0
    (done,) = other.glob("part-*.parquet")
    shutil.copy(done, out / "part-00000001.parquet")  # as the stopped --overwrite had written it
    told = cli("embed", lib, "-o", out, "-m", naflex_ckpt)
    assert told.exit_code == 1 and "holds rows made with these settings and rows made with others" in told.stderr
    finished = cli("embed", lib, "-o", out, "-m", naflex_ckpt, "--overwrite")
    assert finished.exit_code == 0 and "2 done" in finished.stderr, finished.stderr
    from siglip_cli.sink import read_metadata

    assert table(out).num_rows == 5 and read_metadata(str(out))["architecture"] == "Siglip2Model"
