"""Faults a nightly run meets and must survive on its own: lying headers, kill -9, a small /dev/shm, full or
size-limited disks, stalled files, NaN results, containers, terminals. Each is caused here, not simulated away."""

from __future__ import annotations

import io
import os
import pty
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import lying_headers
from helpers import CRASH_ALWAYS, IN_WORKERS, hook_dir, jpeg_bytes, run_siglip


def library(folder, n: int, prefix: str = "img"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{prefix}{i:02d}.jpg").write_bytes(jpeg_bytes((20 * i % 256, 100, 50), (48, 40)))
    return folder


def rows(out) -> dict:
    return {os.path.basename(r["path"]): r for r in pq.read_table(out).to_pylist()}


# -- 1. a file's values never crash the run ----------------------------------------------------------------
def bmp_claiming(width: int, height: int = 3) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (9, 9, 9)).save(buf, "BMP")
    data = bytearray(buf.getvalue())
    struct.pack_into("<II", data, 18, width, height)
    return bytes(data)


def test_lying_bmp_header_is_an_error_row_and_reruns_work(cli, fixed_ckpt, tmp_path):
    lib = library(tmp_path / "lib", 3)
    (lib / "liar.bmp").write_bytes(bmp_claiming(4294967169, 1))
    out = tmp_path / "out.parquet"
    first = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "1")
    assert first.exit_code == 0, first.stderr
    liar = rows(out)["liar.bmp"]
    assert liar["status"] == "error" and "--max-pixels" in liar["error"]
    assert liar["width"] is None  # out of the column's range: unknown, not a crash
    assert sum(r["status"] == "ok" for r in rows(out).values()) == 3
    plain = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "1")  # past any --max-pixels: not tried again
    assert plain.exit_code == 0 and "4 unchanged" in plain.stderr, plain.stderr
    again = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "1", "--retry-errors")
    assert again.exit_code == 0 and "1 done" in again.stderr, again.stderr


def test_corpus_of_lying_headers(fixed_ckpt, tmp_path):
    root = tmp_path / "liars"
    names = lying_headers.build(str(root))
    exts = sorted({os.path.splitext(n)[1] for n in names})
    out = tmp_path / "out.parquet"
    result = run_siglip(
        "embed", root, "--ext", ",".join(exts), "-o", out, "-m", fixed_ckpt, "-j", "2", "--timeout", "30", timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    got = pq.read_table(out, columns=["path", "status", "error"]).to_pylist()
    assert sorted(os.path.basename(r["path"]) for r in got) == sorted(set(names))  # one row per file
    assert all(r["status"] == "ok" or r["error"] for r in got)


def test_values_that_cannot_be_stored_cost_one_row(fixed_ckpt):
    import pyarrow as pa

    from siglip_cli.decode import Decoded
    from siglip_cli.sink import IMAGE_FIELDS, image_rows, make_schema, vector_type
    from siglip_cli.sources import FileRecord

    schema = make_schema(IMAGE_FIELDS + [pa.field("embedding", vector_type(2))], {})
    items = [
        Decoded(FileRecord("/a.jpg", 10, 1), "ab", 5, 4),
        Decoded(FileRecord("/b.jpg", -1, 2**80), None, 2**40, -7, error="bad name caf\udce9"),  # lying values
        Decoded(FileRecord("/c.jpg", 10, 1), 12345, 5, 4),  # a value of the wrong type: a bug, one row
        Decoded(FileRecord("/d.jpg", 10, 1), "cd", 5, 4),
    ]
    batch = image_rows(schema, items, [0, 2, 3], {"embedding": np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)})
    got = batch.to_pylist()
    assert [r["path"] for r in got] == ["/a.jpg", "/b.jpg", "/c.jpg", "/d.jpg"]
    assert got[1]["width"] is None and got[1]["height"] is None and got[1]["size"] is None and got[1]["mtime"] is None
    assert got[1]["error"] == "bad name caf\ufffd"
    assert got[2]["status"] == "error" and "cannot record this file" in got[2]["error"] and got[2]["embedding"] is None
    assert got[2]["size"] == 10 and got[2]["mtime"] is not None  # kept: a rerun sees the file unchanged
    assert got[0]["embedding"] == [1, 0] and got[3]["embedding"] == pytest.approx([0.6, 0.8])


# -- 2. kill -9 leaves nothing behind ----------------------------------------------------------------------
def session_pids(sid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(entry))
    return found


def stalled_run(fixed_ckpt, tmp_path, stderr, env: dict | None = None) -> subprocess.Popen:
    """An embed run in a session of its own, its two decode workers stalled on files, once they are running
    (main, resource tracker, 2 workers) and a second more."""
    lib = library(tmp_path / "lib", 2)
    for i in range(4):
        (lib / f"stall{i}.jpg").write_bytes(jpeg_bytes())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "siglip_cli",
            "embed",
            str(lib),
            "-o",
            str(tmp_path / "out"),
            "-m",
            str(fixed_ckpt),
            "-j",
            "2",
            "-b",
            "2",
            "--timeout",
            "600",
        ],
        env={**os.environ, **hook_dir(tmp_path, IN_WORKERS), **(env or {})},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )
    deadline = time.monotonic() + 120
    while len(session_pids(proc.pid)) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    if len(session_pids(proc.pid)) < 4:
        proc.kill()
        raise AssertionError("the workers never started")
    time.sleep(1)
    return proc


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the run's processes")
def test_kill_9_leaves_no_process_and_no_shared_memory(fixed_ckpt, tmp_path):
    proc = stalled_run(fixed_ckpt, tmp_path, subprocess.DEVNULL)
    try:
        blocks = [n for n in os.listdir("/dev/shm") if n.startswith(f"siglip-{proc.pid}-")]
        assert blocks
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(3)
        assert session_pids(proc.pid) == []
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"siglip-{proc.pid}-")]
    finally:
        for pid in session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the run's processes")
@pytest.mark.parametrize(
    "sig,group,code,said",
    [(signal.SIGINT, True, 130, "siglip: interrupted"), (signal.SIGTERM, True, 143, "siglip: terminated")],
)
def test_ctrl_c_and_sigterm_end_the_run_in_one_line(fixed_ckpt, tmp_path, sig, group, code, said):
    """Ctrl-C reaches the whole process group (the workers too), and so does SIGTERM from systemd (timeout(1)
    signals the main process alone, the lesser case): either way one line and 128+signal, no worker tracebacks,
    no process and no shared memory left, and no leak warnings (a signal during a conversion is held until it
    ends: see encoders.signals_held)."""
    proc = stalled_run(fixed_ckpt, tmp_path, subprocess.PIPE, {"SIGLIP_FLUSH_ROWS": "1"})
    try:
        if group:
            os.killpg(proc.pid, sig)  # as a terminal does Ctrl-C
        else:
            os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert err.strip().splitlines()[-1] == said and "Traceback" not in err and "leaked" not in err, err
        time.sleep(1)
        assert session_pids(proc.pid) == []
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"siglip-{proc.pid}-")]
    finally:
        for pid in session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)


def test_blocks_of_dead_runs_are_removed_at_start(fixed_ckpt, tmp_path):
    from multiprocessing import resource_tracker, shared_memory

    dead = subprocess.Popen(["true"])
    dead.wait()
    block = shared_memory.SharedMemory(f"siglip-{dead.pid}-0123abcd", create=True, size=4096)
    resource_tracker.unregister(block._name, "shared_memory")  # left behind, as by a run killed with its tracker
    block.close()
    assert os.path.exists(f"/dev/shm/siglip-{dead.pid}-0123abcd")
    result = run_siglip("embed", library(tmp_path / "lib", 2), "-o", tmp_path / "out", "-m", fixed_ckpt, "-j", "1")
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(f"/dev/shm/siglip-{dead.pid}-0123abcd")


def test_blocks_held_by_a_live_run_elsewhere_are_kept(tmp_path):
    """Runs in other PID namespaces share /dev/shm (docker --ipc=host): their pids mean nothing here, their locks do."""
    import fcntl
    from multiprocessing import resource_tracker, shared_memory

    from siglip_cli.shm import reap_stale_blocks

    dead = subprocess.Popen(["true"])
    dead.wait()
    held = shared_memory.SharedMemory(f"siglip-{dead.pid}-00000001", create=True, size=4096)
    fcntl.flock(held._fd, fcntl.LOCK_SH)  # as a live run in another namespace holds its blocks
    orphan = shared_memory.SharedMemory(f"siglip-{dead.pid}-00000002", create=True, size=4096)
    for b in (held, orphan):
        resource_tracker.unregister(b._name, "shared_memory")
    orphan.close()
    try:
        reap_stale_blocks()
        assert os.path.exists(f"/dev/shm/siglip-{dead.pid}-00000001")
        assert not os.path.exists(f"/dev/shm/siglip-{dead.pid}-00000002")
    finally:
        held.close()
        held.unlink()


# -- 3. workers import no torch ----------------------------------------------------------------------------
def test_decode_workers_do_not_import_torch(fixed_ckpt, tmp_path):
    log = tmp_path / "workers.log"
    env = {**hook_dir(tmp_path, IN_WORKERS), "SIGLIP_TEST_LOG": str(log)}
    result = run_siglip(
        "embed", library(tmp_path / "lib", 4), "-o", tmp_path / "out", "-m", fixed_ckpt, "-j", "2", env=env
    )
    assert result.returncode == 0, result.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 4
    assert all(line.split(" ")[2:] == [""] for line in lines), lines  # no torch, transformers or pyarrow


# -- 4. a small /dev/shm ------------------------------------------------------------------------------------
def test_small_shared_memory_changes_nothing_but_speed(cli, fixed_ckpt, tmp_path, monkeypatch):
    lib = library(tmp_path / "lib", 12)
    ref = tmp_path / "ref.parquet"
    assert cli("embed", lib, "-o", ref, "-m", fixed_ckpt, "-j", "0").exit_code == 0
    want = rows(ref)
    for budget in ("1", str(3 * 64 * 64 * 3)):  # none at all; room for a few images
        monkeypatch.setenv("SIGLIP_SHM_BYTES", budget)
        out = tmp_path / f"out{budget}.parquet"
        result = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "2", "-b", "8")
        assert result.exit_code == 0, result.stderr
        assert ("travel by pipe" in result.stderr) == (budget == "1")
        got = rows(out)
        assert got.keys() == want.keys() and all(r["status"] == "ok" for r in got.values())
        for name in got:
            np.testing.assert_allclose(got[name]["embedding"], want[name]["embedding"], atol=1e-5)


def in_private_mount(script: str) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace (root only), where it can mount small tmpfs freely."""
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)


def can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return in_private_mount("mount -t tmpfs -o size=64k tmpfs /mnt").returncode == 0


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs root and unshare -m to mount a small tmpfs")


@needs_mount
def test_tiny_dev_shm_in_a_container(fixed_ckpt, tmp_path):
    lib = library(tmp_path / "lib", 12)
    out = tmp_path / "out.parquet"
    cmd = f"{sys.executable} -m siglip_cli embed {lib} -o {out} -m {fixed_ckpt} -j 2 -b 8"
    result = in_private_mount(f"mount -t tmpfs -o size=40k tmpfs /dev/shm && {cmd}")
    assert result.returncode == 0, result.stderr
    assert all(r["status"] == "ok" for r in rows(out).values()) and len(rows(out)) == 12


def test_a_worker_killed_by_the_machine_blames_no_file(fixed_ckpt, tmp_path):
    lib = library(tmp_path / "lib", 6)
    (lib / "flaky.jpg").write_bytes(jpeg_bytes())
    (lib / "zz-crash-always.jpg").write_bytes(jpeg_bytes())
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
        env=hook_dir(tmp_path, CRASH_ALWAYS),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    got = rows(out)
    assert got["flaky.jpg"]["status"] == "ok"  # its worker died once, but it decodes fine alone
    assert "crashed" in got["zz-crash-always.jpg"]["error"]
    assert sum(r["status"] == "ok" for r in got.values()) == 7


def test_slots_shrink_to_the_room_there_is(monkeypatch):
    from siglip_cli.shm import free as _free
    from siglip_cli.shm import slots as _slots

    image = 64 * 64 * 3
    monkeypatch.setenv("SIGLIP_SHM_BYTES", str(3 * image))
    chunk, blocks = _slots(2, 8, image)
    try:
        assert chunk == 1 and len(blocks) == 2  # 2 workers: 4 slots of 8 images would not fit; 2 of 1 do
    finally:
        _free(blocks)
    monkeypatch.setenv("SIGLIP_SHM_BYTES", str(image - 1))
    assert _slots(2, 8, image) == (8, None)  # not one image: pixels go by pipe


def test_a_crash_while_the_consumer_is_busy(tmp_path, monkeypatch):
    """A worker dies while the main process is busy with an earlier chunk (the GPU is the bottleneck)."""
    from siglip_cli.decode import ImageSpec
    from siglip_cli.loader import decoded_chunks
    from siglip_cli.sources import FileRecord

    lib = library(tmp_path / "lib", 10)
    (lib / "img05-crash-always.jpg").write_bytes(jpeg_bytes())
    monkeypatch.setenv("PYTHONPATH", hook_dir(tmp_path, CRASH_ALWAYS)["PYTHONPATH"])
    records = [FileRecord(str(p)) for p in sorted(lib.iterdir())]
    got = []
    for part in decoded_chunks(records, ImageSpec(height=16, width=16), workers=2, chunk=2, timeout=30):
        got += [(os.path.basename(d.record.path), d.error) for d in part]
        time.sleep(0.5)  # the encoder at work
    assert [name for name, _ in got] == sorted(p.name for p in lib.iterdir())
    errors = {name: e for name, e in got if e}
    assert list(errors) == ["img05-crash-always.jpg"] and "crashed" in errors["img05-crash-always.jpg"]


def test_workers_that_cannot_start_are_one_line_not_a_hang(fixed_ckpt, tmp_path):
    code = "import os, sys\nif '--multiprocessing-fork' in sys.argv:\n    os._exit(3)\n"
    result = run_siglip(
        "embed",
        library(tmp_path / "lib", 4),
        "-o",
        tmp_path / "out",
        "-m",
        fixed_ckpt,
        "-j",
        "2",
        env=hook_dir(tmp_path, code),
        timeout=180,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "die before decoding anything" in result.stderr and "-j 0" in result.stderr


def test_files_from_before_1970_stay_unchanged(cli, fixed_ckpt, tmp_path):
    lib = library(tmp_path / "lib", 2)
    old = lib / "img00.jpg"
    os.utime(old, (-5 * 365 * 86400, -5 * 365 * 86400))  # a scanned slide dated 1965
    out = tmp_path / "out"
    assert cli("embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "0").exit_code == 0
    assert rows(out)["img00.jpg"]["mtime"].year == 1965
    again = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "0")
    assert again.exit_code == 0 and "2 unchanged" in again.stderr


# -- 5. write errors are one line -------------------------------------------------------------------------
def no_temporaries(folder) -> list[str]:
    return [
        os.path.join(d, n)
        for d, dirs, names in os.walk(folder)
        for n in names + dirs
        if n.endswith(".tmp") or n.startswith(".siglip-tmp-")
    ]


def one_line_error(result, *fragments):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("siglip: error: cannot write") and all(f in last for f in fragments), result.stderr


@pytest.mark.parametrize("layout", ["folder", "file"])
def test_file_size_limit_is_one_line(cli, fixed_ckpt, tmp_path, layout):
    lib = library(tmp_path / "lib", 40)
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    out = outdir / ("index" if layout == "folder" else "index.parquet")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

    result = subprocess.run(
        [sys.executable, "-m", "siglip_cli", "embed", str(lib), "-o", str(out), "-m", str(fixed_ckpt), "-j", "1"],
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    one_line_error(result, "ulimit -f")
    assert no_temporaries(outdir) == []
    again = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "1")  # the limit lifted: it completes
    assert again.exit_code == 0, again.stderr
    assert len(rows(out)) == 40


@needs_mount
@pytest.mark.parametrize("mount, cause", [("size=64k", "disk is full"), ("ro", "read-only")])
def test_full_or_read_only_disk_is_one_line(fixed_ckpt, tmp_path, mount, cause):
    lib = library(tmp_path / "lib", 40)
    disk = tmp_path / "disk"
    disk.mkdir()
    fill = f"dd if=/dev/zero of={disk}/filler bs=1k 2>/dev/null;" if "size" in mount else ""
    cmd = f"{sys.executable} -m siglip_cli embed {lib} -o {disk}/index -m {fixed_ckpt} -j 1"
    result = in_private_mount(
        f"mount -t tmpfs -o {mount} tmpfs {disk} && {fill} {{ {cmd}; rc=$?; find {disk} -name '*.tmp' -o -name '.siglip-tmp-*'; exit $rc; }}"  # noqa: E501
    )
    one_line_error(result, cause)
    assert ".tmp" not in result.stdout  # nothing half-written left on the disk


KILLED_WRITING = """
import os, sys
from siglip_cli.scratch import scratch
with scratch(sys.argv[1]) as folder:
    with open(os.path.join(folder, "half-written"), "wb") as f:
        f.write(b"x" * 4096)
    os.kill(os.getpid(), 9)
"""


def killed_writing(parent, age: float = 600) -> list:
    """Have a process killed (SIGKILL) while it writes in parent; return what it left there, made `age` s old."""
    parent.mkdir(parents=True, exist_ok=True)
    before = set(parent.iterdir())
    assert subprocess.run([sys.executable, "-c", KILLED_WRITING, str(parent)]).returncode == -signal.SIGKILL
    left = [p for p in parent.iterdir() if p not in before]
    assert len(left) == 1 and left[0].name.startswith(".siglip-tmp-")
    for p in [*left[0].iterdir(), left[0]]:
        os.utime(p, (time.time() - age,) * 2)
    return left


def test_every_write_removes_what_killed_writes_left_beside_it(cli, fixed_ckpt, tmp_path, monkeypatch):
    """The class: each thing siglip writes (index parts, a merged index file, the search sidecar, search results
    as Parquet and HTML, the text-embedding cache) is made in a scratch folder, and making one removes what
    killed runs left in the same place."""
    lib, cache = library(tmp_path / "lib", 3), tmp_path / "cache"
    monkeypatch.setenv("SIGLIP_CACHE_DIR", str(cache))  # (runs in this process: only the killed writers need their own)
    folder, single, out = tmp_path / "index", tmp_path / "indexes" / "one.parquet", tmp_path / "out"
    single.parent.mkdir()
    for index in (folder, single):
        assert cli("embed", lib, "-o", index, "-m", fixed_ckpt, "-j", "0").exit_code == 0
    (lib / "new.jpg").write_bytes(jpeg_bytes((9, 9, 9)))
    left = killed_writing(folder) + killed_writing(single.parent) + killed_writing(out) + killed_writing(cache / "text")
    # and the temporary files of earlier versions, which wrote beside the destination under `.NAME.PID.tmp`
    (single.parent / ".one.parquet.parts").mkdir()
    left += [
        folder / ".part-00000001.parquet.99999.tmp",
        single.parent / ".one.parquet.99999.tmp",
        single.parent / ".one.parquet.parts" / ".part-00000000.parquet.99999.tmp",
    ]
    for path in left[-3:]:
        path.write_bytes(b"PAR1 half a file")
    for index in (folder, single):  # a new part, and a merge into the file
        result = cli("embed", lib, "-o", index, "-m", fixed_ckpt, "-j", "0")
        assert result.exit_code == 0, result.stderr
        assert len(rows(index)) == 4
    found = cli(
        "search", single, "--image", lib / "new.jpg", "-k", "2", "-o", out / "hits.parquet", "--html", out / "hits.html"
    )
    assert found.exit_code == 0, found.stderr
    assert len(pq.read_table(out / "hits.parquet")) == 2 and (out / "hits.html").stat().st_size > 0
    (tmp_path / "vocab.txt").write_text("cat\ndog\n")
    assert (
        cli(
            "tag", lib, "--vocab", tmp_path / "vocab.txt", "-o", tmp_path / "tags.parquet", "-m", fixed_ckpt, "-j", "0"
        ).exit_code
        == 0
    )
    assert list(cache.glob("text/*.npy"))
    assert [str(p) for p in left if p.exists()] == []
    assert no_temporaries(tmp_path) == []


def test_a_live_writer_and_a_fresh_leftover_are_kept(tmp_path):
    from siglip_cli.scratch import sweep

    live = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_WRITING.replace("os.kill(os.getpid(), 9)", "print(folder, flush=True); time.sleep(60)").replace(
                "import os, sys", "import os, sys, time"
            ),
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        held = live.stdout.readline().strip()
        for p in (os.path.join(held, "half-written"), held):
            os.utime(p, (time.time() - 3600,) * 2)
        fresh = killed_writing(tmp_path / "fresh", age=0)
        sweep(str(tmp_path)), sweep(str(tmp_path / "fresh"))
        assert os.path.isdir(held) and fresh[0].is_dir()  # locked by a live process; dead less than a minute
    finally:
        live.kill()
        live.wait()
    sweep(str(tmp_path))
    assert not os.path.exists(held)  # its lock went with its process (the folder is old)


# -- 6. the timeout is per file ----------------------------------------------------------------------------
def test_timeout_is_per_file_not_per_chunk(fixed_ckpt, tmp_path):
    lib = tmp_path / "lib"
    library(lib, 4, prefix="slow")  # 0.8 s each: a chunk of them takes longer than the timeout, no file does
    (lib / "stall.jpg").write_bytes(jpeg_bytes())
    log = tmp_path / "workers.log"
    out = tmp_path / "out.parquet"
    result = run_siglip(
        "embed",
        lib,
        "-o",
        out,
        "-m",
        fixed_ckpt,
        "-j",
        "1",
        "-b",
        "8",
        "--timeout",
        "1.5",
        env={**hook_dir(tmp_path, IN_WORKERS), "SIGLIP_TEST_LOG": str(log)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    got = rows(out)
    assert "took over 1.5s" in got.pop("stall.jpg")["error"]
    assert all(r["status"] == "ok" for r in got.values()) and len(got) == 4
    workers = {line.split()[0] for line in log.read_text().splitlines()}
    assert len(workers) == 2  # one restart, for the stalled file; slow files never time out


# -- 7. NaN and inf become error rows ---------------------------------------------------------------------
@pytest.fixture
def poisoned(monkeypatch):
    """The encoder returns NaN for images whose name says 'poison', as float16 overflow does."""
    import torch

    from siglip_cli.model import Encoder

    clean = Encoder.encode_images

    def encode(self, batch):
        with torch.inference_mode():
            out = clean(self, batch).clone()
            for j, i in enumerate(batch.ok):
                if "poison" in batch.items[i].record.path:
                    out[j] = float("nan")
        return out

    monkeypatch.setattr(Encoder, "encode_images", encode)


@pytest.mark.parametrize("command", [["embed"], ["tag", "--vocab", "VOCAB"], ["classify", "--labels", "cat,dog,bird"]])
def test_nan_results_are_error_rows(cli, fixed_ckpt, tmp_path, poisoned, command):
    lib = library(tmp_path / "lib", 3)
    (lib / "poison.jpg").write_bytes(jpeg_bytes())
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\ndog\n")
    out = tmp_path / "out.parquet"
    args = [str(vocab) if a == "VOCAB" else a for a in command]
    result = cli(
        *args, lib, "-o", out, "-m", fixed_ckpt, "-j", "0", "-b", "2", "--no-cache" if command[0] != "embed" else "-q"
    )
    assert result.exit_code == 0, result.stderr
    got = rows(out)
    bad = got.pop("poison.jpg")
    assert bad["status"] == "error" and "--dtype float32" in bad["error"]
    assert all(r["status"] == "ok" for r in got.values()) and len(got) == 3


# -- 8. defaults that fit the machine ---------------------------------------------------------------------
# (the cgroup CPU quota read from a fake /proc and /sys tree: tests/unit/test_machine_defaults.py)


@pytest.mark.skipif(not shutil.which("taskset"), reason="needs taskset (util-linux)")
def test_cpu_affinity_decides_the_default_workers():
    code = "from siglip_cli.config import usable_cpus, default_workers; print(usable_cpus(), default_workers())"
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]


def test_compile_without_a_compiler_is_one_line(fixed_ckpt, tmp_path):
    result = run_siglip(
        "embed",
        library(tmp_path / "lib", 1),
        "-o",
        tmp_path / "out",
        "-m",
        fixed_ckpt,
        "--compile",
        "--device",
        "cpu",
        env={"CXX": "/nonexistent/g++"},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("siglip: error: --compile needs a C++ compiler")


# -- 9. no screenful of numbers ---------------------------------------------------------------------------
def test_refuses_to_print_vectors_to_a_terminal(fixed_ckpt, tmp_path):
    lib = library(tmp_path / "lib", 1)
    main, tty = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "siglip_cli", "embed", str(lib), "-m", str(fixed_ckpt)],
            stdout=tty,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(tty)
        os.close(main)
    assert result.returncode == 2
    assert re.search(r"-o FILE\.parquet.*-o -", result.stderr) and len(result.stderr.strip().splitlines()) == 1
    piped = run_siglip("embed", lib, "-m", fixed_ckpt)  # a pipe: JSON Lines as before
    assert piped.returncode == 0 and piped.stdout.count("\n") == 1


def test_closed_pipe_ends_quietly(fixed_ckpt, tmp_path):
    lib = library(tmp_path / "lib", 30)
    cmd = f"{sys.executable} -m siglip_cli embed {lib} -m {fixed_ckpt} -j 0 -b 1 | head -n 1 >/dev/null; echo ${{PIPESTATUS[0]}}"  # noqa: E501
    result = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.stdout.strip() in ("0", "141")  # 0 when it finished before head closed the pipe


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full (Linux only)")
def test_stdout_on_a_full_disk_is_one_line(cli, fixed_ckpt, tmp_path):
    """`> file` on a full disk (/dev/full): one line and exit 1, for the vectors of embed (tag and classify
    write through the same sink) and the results of search, not a traceback (nor a second error at exit)."""
    lib = library(tmp_path / "lib", 3)
    index = tmp_path / "idx.parquet"
    assert cli("embed", lib, "-m", fixed_ckpt, "-o", index).exit_code == 0
    for args in (
        ["embed", lib, "-m", fixed_ckpt, "-o", "-"],
        ["search", index, "--image", next(lib.glob("*.jpg")), "--json"],
    ):
        with open("/dev/full", "w") as full:
            result = subprocess.run(
                [sys.executable, "-m", "siglip_cli", *map(str, args)],
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=300,
            )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and "Traceback" not in result.stderr, (args[0], result.stderr)
        assert lines[-1] == "siglip: error: cannot write stdout: No space left on device", (args[0], lines)
        assert lines.count(lines[-1]) == 1


# -- 10. a first run says what it downloads ---------------------------------------------------------------
def test_download_note_and_progress(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled

    from siglip_cli import checkpoint as model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cache = tmp_path / "hub"
    note = model.download_note("google/siglip2-base-patch16-224", None, str(cache))
    assert note and "downloading google/siglip2-base-patch16-224" in note and str(cache) in note
    snap = cache / "models--google--siglip2-base-patch16-224" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"weights")
    (cache / "models--google--siglip2-base-patch16-224" / "refs").mkdir()
    (cache / "models--google--siglip2-base-patch16-224" / "refs" / "main").write_text("a" * 40)
    assert model.download_note("google/siglip2-base-patch16-224", None, str(cache)) is None  # cached: no word
    assert model.download_note(str(tmp_path), None) is None  # a local folder
    model.hf_quiet(True)
    assert not are_progress_bars_disabled()
    model.hf_quiet(False)
    assert are_progress_bars_disabled()
