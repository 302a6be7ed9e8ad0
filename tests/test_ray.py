"""`--ray`: the same rows as a local run, errors as rows, incremental, and finished after its driver is killed.

One local Ray for the whole module (ray.init(num_cpus=2) here); each run is the CLI in a subprocess joining it,
as a user's run joins a cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from helpers import CRASH_ALWAYS, hook_dir, run_siglip

ray = pytest.importorskip("ray", reason="the ray extra is not installed")


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def odd(tmp_path_factory, photos) -> Path:
    """A folder of files a library has: two photos (one named in bytes that are not UTF-8), and a corrupt one."""
    folder = tmp_path_factory.mktemp("odd")
    shots = sorted(photos.glob("*.JPEG"))
    (folder / "plain.jpg").write_bytes(shots[0].read_bytes() + b"\0")  # not a copy of an indexed photo (a move)
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as f:
        f.write(shots[1].read_bytes() + b"\0")
    (folder / "corrupt.jpg").write_bytes(shots[2].read_bytes()[:3000])  # a truncated JPEG
    return folder


@pytest.fixture(scope="module")
def local(tmp_path_factory, fixed_ckpt, photos, odd) -> Path:
    """The local run the Ray runs are held to (default settings: --dtype auto, --backend auto), in this process."""
    from typer.testing import CliRunner

    from siglip_cli.cli import app

    out = tmp_path_factory.mktemp("local") / "local.parquet"
    done = CliRunner().invoke(app, [str(a) for a in ("embed", photos, odd, "-m", fixed_ckpt, "-o", out)])
    assert done.exit_code == 0, done.stderr
    return out


def rows(path):
    return (
        pads.dataset(str(path), format="parquet")
        .to_table()
        .sort_by([("path", "ascending"), ("path_bytes", "ascending")])
    )


def meta(path) -> dict:
    files = sorted(Path(path).glob("*.parquet")) if Path(path).is_dir() else [Path(path)]
    m = json.loads(pq.read_schema(files[-1]).metadata[b"siglip"])
    m.pop("created")
    return m


def same_rows(local, theirs, vector: str | None = "embedding") -> None:
    a, b = rows(local), rows(theirs)
    assert b.schema.remove_metadata() == a.schema.remove_metadata()
    assert b.num_rows == a.num_rows
    for name in a.column_names:
        if name != vector:
            assert b.column(name).equals(a.column(name)), name
    if vector:
        ok = np.array([s == "ok" for s in a.column("status").to_pylist()])
        va = np.stack(a.column(vector).to_numpy(zero_copy_only=False)[ok])
        vb = np.stack(b.column(vector).to_numpy(zero_copy_only=False)[ok])
        if vector == "embedding":
            assert (va * vb).sum(axis=1).min() >= 0.99999
        else:  # sigmoid scores
            assert np.abs(va.astype(np.float32) - vb.astype(np.float32)).max() <= 1e-3
    assert meta(theirs) == meta(local)


def parts(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")}


def test_a_ray_run_writes_the_rows_of_a_local_run_and_a_rerun_nothing(
    cluster, local, fixed_ckpt, photos, odd, tmp_path
):
    out = tmp_path / "index"
    done = run_siglip("embed", photos, odd, "-m", fixed_ckpt, "-o", out, "--ray", cluster)
    assert done.returncode == 0, done.stderr
    assert "128 done (127 ok, 1 failed)" in done.stderr
    same_rows(local, out)
    table = rows(out)
    failed = table.filter(pads.field("status") == "error").to_pylist()
    assert [Path(r["path"]).name for r in failed] == ["corrupt.jpg"] and "corrupt or truncated" in failed[0]["error"]
    assert b"caf\xe9.jpg" in [os.path.basename(b) for b in table.column("path_bytes").to_pylist() if b]

    before = parts(out)
    for again in (["--ray", cluster], []):  # nothing new, on Ray or here: the settings signature is a local run's
        rerun = run_siglip("embed", photos, odd, "-m", fixed_ckpt, "-o", out, *again)
        assert rerun.returncode == 0, rerun.stderr
        assert "0 done" in rerun.stderr and "128 unchanged" in rerun.stderr
    assert parts(out) == before


def test_tag_on_a_ray_of_its_own_scores_as_a_local_run(cli, cluster, naflex_ckpt, photos, tmp_path):
    """`tag` (NaFlex batches) on Ray; `--ray local` starts a Ray of its own even where RAY_ADDRESS names another."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\ndog\nbeach\nmountain\ncar\n")
    common = ["tag", photos, "-m", naflex_ckpt, "--vocab", vocab, "--all-scores", "--top-k", "3"]
    local = cli(*common, "-o", tmp_path / "local.parquet")
    assert local.exit_code == 0, local.stderr
    done = run_siglip(*common, "-o", tmp_path / "ray.parquet", "--ray", "local", env={"RAY_ADDRESS": cluster})
    assert done.returncode == 0, done.stderr
    same_rows(tmp_path / "local.parquet", tmp_path / "ray.parquet", vector="scores")


def test_a_killed_driver_is_finished_by_the_next_run_with_every_file_once(
    cluster, local, fixed_ckpt, photos, odd, tmp_path
):
    common = ["embed", photos, odd, "-m", fixed_ckpt]
    out = tmp_path / "index"
    # Batches of one image, a part file for each: the run is slow enough to be killed part-way.
    proc = subprocess.Popen(
        [sys.executable, "-m", "siglip_cli", *map(str, common), "-o", str(out), "--ray", cluster, "--batch-size", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "SIGLIP_FLUSH_ROWS": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    written = rows(out).num_rows
    assert 0 < written < 128
    done = run_siglip(*common, "-o", out, "--ray", cluster)
    assert done.returncode == 0, done.stderr
    assert f"{128 - written} done" in done.stderr and f"{written} unchanged" in done.stderr
    same_rows(local, out)


def test_ray_refuses_a_device_list_and_a_text_run(cluster, fixed_ckpt, photos, tmp_path):
    two = run_siglip(
        "embed", photos, "-m", fixed_ckpt, "-o", tmp_path / "x.parquet", "--ray", cluster, "--device", "cpu,cpu"
    )
    assert two.returncode == 1 and "--ray places each encoder" in two.stderr
    text = run_siglip("embed", "--text", "a cat", "-m", fixed_ckpt, "-o", "-", "--ray", cluster)
    assert text.returncode == 2 and "--ray runs image embedding" in text.stderr


def test_a_decode_task_makes_error_rows_of_files_that_crash_or_stall_the_decoder(tmp_path, monkeypatch, photos):
    """The class of fault a local run isolates in its worker processes: on Ray too, one row each, never a task
    that Ray retries for ever."""
    import pyarrow as pa

    from siglip_cli.cluster import _KEPT, _tables, decode_block
    from siglip_cli.decode import ImageSpec
    from siglip_cli.sources import FileRecord

    monkeypatch.setenv("PYTHONPATH", hook_dir(tmp_path, CRASH_ALWAYS)["PYTHONPATH"])
    shot = sorted(photos.glob("*.JPEG"))[0].read_bytes()
    names = ["a.jpg", "b-stall.jpg", "c-crash-always.jpg", "d.jpg"]
    for name in names:
        (tmp_path / name).write_bytes(shot)
    table = next(_tables([FileRecord(str(tmp_path / n), len(shot), 0) for n in names]))
    try:
        out = pa.concat_tables(decode_block(table, ImageSpec(), timeout=3.0))
    finally:
        from siglip_cli.loader import _close

        _close(_KEPT)
    failure = dict(
        zip((os.path.basename(os.fsdecode(p)) for p in out.column("path").to_pylist()), out.column("error").to_pylist())
    )
    assert failure["a.jpg"] is None and failure["d.jpg"] is None
    assert "took over 3s" in failure["b-stall.jpg"]
    assert "crashed" in failure["c-crash-always.jpg"]
    pixels = np.concatenate([c.to_numpy() for c in out.column("pixels").chunks]).reshape(4, -1)
    assert pixels[[0, 3]].any(axis=1).all() and not pixels[[1, 2]].any()
