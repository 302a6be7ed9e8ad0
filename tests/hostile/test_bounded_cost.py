"""Hostile and careless inputs cost a bounded amount, checked before the work starts: a real server on
127.0.0.1 and real runs, each bounded in count and time, asserting memory and latency, not only status codes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import b64, httpx, jpeg, run_siglip, start, stop

# a server, as tests/test_serve.py starts it: the test extra's httpx and the serve extra
pytest.importorskip("httpx", reason="the test extra's httpx")
pytest.importorskip("fastapi", reason="the serve extra")
pytest.importorskip("uvicorn", reason="the serve extra")

LONG = "hello world " * 700_000  # 8.4 MB of text


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024


@pytest.fixture(scope="module")
def server(fixed_ckpt, tmp_path_factory, photos):
    index = tmp_path_factory.mktemp("hostile") / "index.parquet"
    some = sorted(photos.glob("*.JPEG"))[:8]
    assert run_siglip("embed", *some, "-o", index, "-m", fixed_ckpt, "-q", "--backend", "torch").returncode == 0
    s = start(fixed_ckpt, "--index", index, "--max-items", "64")
    yield s
    stop(s)


def test_an_8_mb_text_on_every_text_route_is_cut_not_swallowed(server):
    before = peak_rss(server.proc.pid)
    image = b64(jpeg())
    routes = [
        ("/txt/embed", {"input": LONG}),
        ("/v1/embeddings", {"input": [LONG]}),
        ("/classify", {"input": image, "labels": [LONG, "a dog"]}),
        ("/search", {"query": LONG}),
    ]
    for route, body in routes:
        with ThreadPoolExecutor(1) as pool:
            t = time.monotonic()
            long_answer = pool.submit(server.post, route, body)
            time.sleep(0.05)
            q = time.monotonic()
            small = httpx.post(server.url + "/txt/embed", json={"input": "dog"}, timeout=10)
            assert small.status_code == 200 and time.monotonic() - q < 2, route  # others are not held up
            answer = long_answer.result()
            assert answer.status_code == 200 and time.monotonic() - t < 10, (route, answer.text[:200])
    assert peak_rss(server.proc.pid) - before < 200 << 20


def test_globs_hosts_bodies_and_tokens_are_checked_before_work(server):
    t = time.monotonic()
    r = server.post("/search", {"query": "dog", "path": ["[" * 30_000]})
    assert r.status_code == 422 and "globs" in r.text and time.monotonic() - t < 2
    assert server.post("/search", {"query": "dog", "path": ["*"] * 17}).status_code == 422
    assert server.post("/search", {"query": "dog", "path": ["*.JPEG"]}).status_code == 200
    rebind = server.post("/txt/embed", {"input": "dog"}, headers={"Host": "rebind.attacker.example"})
    assert rebind.status_code == 421
    assert (
        server.post(
            "/txt/embed", {"input": "dog"}, headers={"Host": f"localhost:{server.url.rsplit(':', 1)[1]}"}
        ).status_code
        == 200
    )
    plain = httpx.post(server.url + "/txt/embed", content=b'{"input": "dog"}', headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415  # a page's simple POST (no preflight) is not read
    deep = httpx.post(
        server.url + "/txt/embed",
        content=b"[" * 5000 + b"]" * 5000,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert deep.status_code == 422 and "nests" in deep.text


def test_bearer_is_any_case_and_an_open_server_is_loud(fixed_ckpt):
    s = start(fixed_ckpt, "--api-key", "k3y")
    try:
        assert s.post("/txt/embed", {"input": "x"}, headers={"Authorization": "bearer k3y"}).status_code == 200
        assert s.post("/txt/embed", {"input": "x"}, headers={"Authorization": "BEARER k3y"}).status_code == 200
        assert s.post("/txt/embed", {"input": "x"}, headers={"Authorization": "Basic k3y"}).status_code == 401
    finally:
        stop(s)
    s = start(fixed_ckpt, "--host", "0.0.0.0", "--allow-host", "nas.local")
    try:
        port = s.url.rsplit(":", 1)[1]
        assert s.post("/txt/embed", {"input": "x"}, headers={"Host": f"nas.local:{port}"}).status_code == 200
        assert s.post("/txt/embed", {"input": "x"}, headers={"Host": "other.example"}).status_code == 421
    finally:
        stop(s)
    assert "WARNING: listening on 0.0.0.0 without --api-key" in s.proc.stderr.read()


def test_half_sent_requests_do_not_starve_the_server(server):
    """Connections that send half a request and stop: the server goes on answering."""
    host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
    held = []
    try:
        for _ in range(300):
            c = socket.create_connection((host, port), timeout=5)
            c.sendall(b"POST /txt/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
            held.append(c)
        t = time.monotonic()
        assert server.get("/health").status_code == 200 and time.monotonic() - t < 2
    finally:
        for c in held:
            c.close()


def test_32_clients_with_hostile_ones_among_them(server):
    """5% of requests hostile (a long text, a bad glob, a foreign Host, deep JSON, a text/plain body): no 5xx,
    no dropped connection, memory flat."""
    good = [("/txt/embed", {"input": ["a dog", "a beach"]}, {}), ("/search", {"query": "a dog"}, {})]
    bad = [
        ("/txt/embed", {"input": LONG[:2_000_000]}, {}),
        ("/search", {"query": "x", "path": ["[" * 5000]}, {}),
        ("/txt/embed", {"input": "x"}, {"Host": "rebind.attacker.example"}),
    ]
    statuses: list[int] = []

    async def client(http: httpx.AsyncClient, n: int) -> None:
        for i in range(12):
            route, body, headers = bad[(n + i) % len(bad)] if (n * 12 + i) % 20 == 0 else good[(n + i) % 2]
            r = await http.post(route, json=body, headers=headers)
            statuses.append(r.status_code)

    async def all_clients() -> None:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
            await asyncio.gather(*(client(http, n) for n in range(32)))

    server.post("/txt/embed", {"input": "warm"})
    before = peak_rss(server.proc.pid)
    asyncio.run(asyncio.wait_for(all_clients(), 180))
    assert len(statuses) == 32 * 12 and all(s < 500 for s in statuses), sorted(set(statuses))
    assert statuses.count(200) >= 32 * 12 * 0.9
    assert peak_rss(server.proc.pid) - before < 200 << 20


def test_a_sparse_4_gb_photo_is_an_error_row_read_by_its_header(tmp_path, fixed_ckpt):
    from PIL import Image

    Image.new("RGB", (64, 48), (1, 2, 3)).save(tmp_path / "huge.jpg")
    with open(tmp_path / "huge.jpg", "r+b") as f:
        f.truncate(4 << 30)  # sparse: no disk space used
    out = tmp_path / "o.parquet"
    # the run in a process of its own that reports the largest peak of its descendants (the run, its workers)
    script = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    run = [
        sys.executable,
        "-m",
        "siglip_cli",
        "embed",
        str(tmp_path),
        "-o",
        str(out),
        "-m",
        str(fixed_ckpt),
        "-q",
        "--backend",
        "torch",
        "-j",
        "1",
    ]
    said = subprocess.run([sys.executable, "-c", script, *run], capture_output=True, text=True, timeout=300)
    code, peak_kb = map(int, said.stdout.split())
    import pyarrow.parquet as pq

    rows = pq.read_table(out).to_pylist()
    assert code == 0 and [row["status"] for row in rows] == ["error"], said.stderr
    assert "more than a 64x48 image can take" in rows[0]["error"]
    assert peak_kb * 1024 < 1 << 30  # far under the file's 4 GB


def test_endless_lists_are_one_line_and_exit_2(tmp_path, fixed_ckpt):
    for args in (
        ["embed", "--files-from", "/dev/zero"],
        ["embed", "--texts-file", "/dev/zero"],
        ["tag", tmp_path, "--vocab", "/dev/zero"],
    ):
        r = run_siglip(*args, "-o", "-", "-m", fixed_ckpt, timeout=60)
        assert r.returncode == 2 and "longer than 65,536 bytes" in r.stderr and "Traceback" not in r.stderr, args


def test_thumbnails_open_only_what_decode_would(tmp_path):
    from siglip_cli.report import thumbnail

    fifo = tmp_path / "now_a_fifo.jpg"
    os.mkfifo(fifo)
    t = time.monotonic()
    assert thumbnail(str(fifo), timeout=5) is None and time.monotonic() - t < 5
    big = tmp_path / "big.png"
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # a 20000x20000 PNG header over a few bytes of data: refused by its size, never decoded
    big.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )
    assert thumbnail(str(big), timeout=5) is None


def test_an_embedding_column_another_tool_rewrote_is_one_line(fixed_ckpt, tmp_path, photos):
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = tmp_path / "index.parquet"
    assert (
        run_siglip(
            "embed", *sorted(photos.glob("*.JPEG"))[:3], "-o", index, "-m", fixed_ckpt, "-q", "--backend", "torch"
        ).returncode
        == 0
    )
    t = pq.read_table(index)
    i = t.schema.get_field_index("embedding")
    column = t.column("embedding").cast(pa.list_(pa.float32()))
    pq.write_table(t.set_column(i, pa.field("embedding", pa.list_(pa.float32())), column), index)
    for args in (["search", index, "a dog"], ["dedup", index]):
        r = run_siglip(*args, "--json")
        assert r.returncode == 1 and "rewritten by another tool" in r.stderr and "Traceback" not in r.stderr


def test_names_with_control_characters_are_shown_escaped():
    from siglip_cli.report import _cell

    assert _cell("/photos/\x1b]0;pwned\x07x.jpg") == "/photos/\\x1b]0;pwned\\x07x.jpg"
    assert _cell("/photos/ünïcode ok.jpg") == "/photos/ünïcode ok.jpg"


def test_the_token_is_not_sent_on_to_where_a_redirect_points(monkeypatch):
    """search --server: a 302 from the server to another origin gets no Authorization header."""
    import http.server
    import threading

    seen: list = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(404)
            self.end_headers()

        do_GET = do_POST  # (urllib follows a 302 with a GET)

        def log_message(self, *args):
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), Elsewhere)

    class Redirects(Elsewhere):
        def do_POST(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{other.server_port}/txt/embed")
            self.end_headers()

    first = http.server.HTTPServer(("127.0.0.1", 0), Redirects)
    for s in (first, other):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        from siglip_cli.errors import RunError
        from siglip_cli.remote import Remote

        monkeypatch.setenv("SIGLIP_API_KEY", "s3cret")
        with pytest.raises(RunError):
            Remote(f"http://127.0.0.1:{first.server_port}").texts(("a dog",))
        assert seen == ["Bearer s3cret", None]
    finally:
        first.shutdown()
        other.shutdown()
