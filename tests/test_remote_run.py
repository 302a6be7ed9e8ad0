"""`siglip embed|tag|classify --server URL`: the files and the index here, the model on a `siglip serve`. Rows equal
a local run's, the index is one index whichever runs it, and a server that dies costs only what was in flight."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import free_port, httpx, start, stop

pytest.importorskip("fastapi", reason="the serve extra")


def rows(path) -> dict:
    t = pq.read_table(path)
    return {r["path"]: r for r in t.to_pylist()}


def signature(path) -> dict:
    part = sorted(p for p in os.listdir(path) if p.endswith(".parquet"))[-1]
    return json.loads(pq.read_schema(os.path.join(path, part)).metadata[b"siglip"])["signature"]


def some_photos(photos, folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(photos / name, folder / name)
    return folder


KEY = "sesame"


@pytest.fixture(scope="module")
def served(fixed_ckpt, naflex_ckpt):
    """A server of each layout, started as a user starts one (the fixed one with a token)."""
    servers = {"fixed": start(fixed_ckpt, "--api-key", KEY), "naflex": start(naflex_ckpt)}
    yield servers
    for s in servers.values():
        stop(s)


@pytest.fixture(autouse=True)
def token(monkeypatch):
    """The token of every run and server here (a server started in a test takes it from the environment)."""
    monkeypatch.setenv("SIGLIP_API_KEY", KEY)


@pytest.fixture(scope="module")
def library(photos, tmp_path_factory):
    """30 of the shared photos: enough batches for a run to be cut in the middle."""
    return some_photos(photos, tmp_path_factory.mktemp("library"), sorted(os.listdir(photos))[:30])


def ok(result):
    assert result.exit_code == 0, result.stderr
    return result


@pytest.mark.parametrize("layout", ["fixed", "naflex"])
def test_remote_rows_equal_local_rows_and_record_the_same_settings(cli, tmp_path, library, served, layout, request):
    ckpt = request.getfixturevalue(f"{layout}_ckpt")
    local = tmp_path / "local"
    ok(cli("embed", library, "-m", ckpt, "--dtype", "float32", "--backend", "torch", "-o", local, "-q"))
    b = rows(local)
    for wire in ("raw", "webp"):
        remote = tmp_path / wire
        ok(cli("embed", library, "--server", served[layout].url, "--wire", wire, "-o", remote, "-q"))
        a = rows(remote)
        assert a.keys() == b.keys() and len(a) == 30
        cos = [float(np.dot(a[k]["embedding"], b[k]["embedding"])) for k in a]
        assert min(cos) >= 0.9999
        assert signature(remote) == signature(local)
        meta = json.loads(pq.read_schema(sorted(remote.glob("*.parquet"))[-1]).metadata[b"siglip"])
        assert meta["backend"] == "remote" and meta["server"] == served[layout].url
        assert KEY not in json.dumps(meta)


def test_remote_tags_equal_local_tags(cli, tmp_path, library, served, fixed_ckpt):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\ndog\ncar\ntree\nsky\nfish\nbird\n")
    common = ["tag", library, "--vocab", vocab, "--top-k", "3", "--threshold", "0", "-q"]
    ok(cli(*common, "--server", served["fixed"].url, "-o", tmp_path / "remote"))
    ok(cli(*common, "-m", fixed_ckpt, "--dtype", "float32", "-o", tmp_path / "local"))
    a, b = rows(tmp_path / "remote"), rows(tmp_path / "local")
    tags = {k: [t["tag"] for t in v["tags"]] for k, v in a.items()}
    assert tags == {k: [t["tag"] for t in v["tags"]] for k, v in b.items()}
    assert all(len(v) == 3 for v in tags.values())


def test_an_index_is_continued_by_a_local_run_and_by_a_remote_one(cli, tmp_path, photos, served, naflex_ckpt):
    names = sorted(os.listdir(photos))
    library = some_photos(photos, tmp_path / "lib", names[:12])
    index = tmp_path / "index"
    local = ["embed", library, "-m", naflex_ckpt, "--dtype", "float32", "-o", index]
    remote = ["embed", library, "--server", served["naflex"].url, "-o", index]

    ok(cli(*remote))
    some_photos(photos, library, names[12:18])
    r = ok(cli(*local))  # a local run takes up the remote run's index: only the new files are done
    assert "6 done" in r.stderr and "12 unchanged" in r.stderr
    some_photos(photos, library, names[18:22])
    r = ok(cli(*remote))  # and the other way round
    assert "4 done" in r.stderr and "18 unchanged" in r.stderr
    paths = pq.read_table(index).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 22  # every file once


def test_a_server_of_other_weights_is_refused_before_any_row(cli, tmp_path, photos, served, fixed_ckpt):
    names = sorted(os.listdir(photos))
    library = some_photos(photos, tmp_path / "lib", names[:5])
    index = tmp_path / "index"
    ok(cli("embed", library, "-m", fixed_ckpt, "--dtype", "float32", "-o", index, "-q"))
    before = sorted(os.listdir(index))
    some_photos(photos, library, names[5:8])
    r = cli("embed", library, "--server", served["naflex"].url, "-o", index)
    assert r.exit_code == 1
    assert "runs other settings than this index's" in r.stderr and "weights" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(index)) == before


def test_no_key_a_wrong_key_and_a_wrong_url_are_one_line(cli, tmp_path, library, served, monkeypatch):
    for key in (None, "wrong"):
        if key is None:
            monkeypatch.delenv("SIGLIP_API_KEY")
        else:
            monkeypatch.setenv("SIGLIP_API_KEY", key)
        r = cli("embed", library, "--server", served["fixed"].url, "-o", tmp_path / "i")
        assert r.exit_code == 1 and "HTTP 401" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and KEY not in r.stderr
    nobody = f"http://127.0.0.1:{free_port()}"
    r = cli("embed", library, "--server", nobody, "-o", tmp_path / "j")
    assert r.exit_code == 1 and nobody in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.glob("*/*.parquet"))


def test_plain_http_beyond_the_private_network_needs_insecure(cli, tmp_path, photos):
    r = cli("embed", photos, "--server", "http://8.8.8.8:8002", "-o", tmp_path / "i")
    assert r.exit_code == 1 and "--insecure" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_models_settings_are_the_servers(cli, tmp_path, photos):
    r = cli("embed", photos, "--server", "http://127.0.0.1:9", "--dtype", "float16", "-o", tmp_path / "i")
    assert r.exit_code == 2 and "--dtype is the server's setting" in r.stderr


def items_done(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10, headers={"Authorization": f"Bearer {KEY}"}).text
    lines = [line for line in text.splitlines() if line.startswith('siglip_items_total{kind="image"')]
    return sum(float(line.split()[-1]) for line in lines)


def cut_run(server, index, library, retry: str):
    """A run in a process of its own, and the server killed (SIGKILL) once it has embedded some images."""
    import subprocess
    import sys

    run = subprocess.Popen(
        [sys.executable, "-m", "siglip_cli", "embed", library, "--server", server.url, "-o", index]
        + ["--batch-size", "2", "--server-retry", retry],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while items_done(server) < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    return run


def test_a_server_killed_mid_run_costs_only_the_batches_in_flight(cli, tmp_path, library, fixed_ckpt):
    """Killed for good: exit 1 in one line, the finished rows kept. Restarted within --server-retry: the run
    goes on and does every file exactly once. Then, unchanged, a rerun sends nothing: it works with the server
    down."""
    port = free_port()
    index = tmp_path / "index"
    server = start(fixed_ckpt, "--max-wait-ms", "300", port=port)  # slow batches: the run is still going
    run = cut_run(server, index, library, "2")
    try:
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 1, err
    assert "Traceback" not in err and "gave up after retrying for 2 s" in err
    assert err.strip().splitlines()[-1].startswith("siglip: error: --server")
    kept = rows(index)
    assert 8 <= len(kept) < 30 and all(r["status"] == "ok" for r in kept.values())

    server = start(fixed_ckpt, "--max-wait-ms", "300", port=port)
    run = cut_run(server, index, library, "90")
    try:
        server = start(fixed_ckpt, port=port)
        _, err = run.communicate(timeout=180)
    finally:
        run.kill()
        stop(server)
    assert run.returncode == 0, err
    assert "retrying for up to 90 s" in err and f"{len(kept)} unchanged" in err
    paths = pq.read_table(index).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 30
    r = ok(cli("embed", library, "--server", server.url, "-o", index))  # the server is down now
    assert "30 unchanged" in r.stderr


class RefusesOneItem:
    """A proxy before a server that answers the first batch of pixels with a 422 naming its item `index`."""

    def __init__(self, target: str, index: int):
        import http.server
        import threading

        refused = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def forward(self, method):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if method == "POST" and self.path == "/v1/pixels" and not refused:
                    refused.append(self.path)
                    error = {"message": f"item {index}: refused here", "index": index, "code": 422}
                    answer = json.dumps({"error": error})
                    status, data, kind = 422, answer.encode(), "application/json"
                else:
                    headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                    r = httpx.request(method, target + self.path, content=body or None, headers=headers, timeout=60)
                    status, data, kind = r.status_code, r.content, r.headers.get("content-type", "")
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.forward("GET")

            def do_POST(self):
                self.forward("POST")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.parametrize("batch, index", [(4, 1), (1, 0)])  # (1, 0): a batch with nothing left to embed
def test_an_item_the_server_refuses_is_that_items_error_row(cli, tmp_path, library, served, batch, index):
    proxy = RefusesOneItem(served["fixed"].url, index)
    try:
        r = ok(cli("embed", library, "--server", proxy.url, "--batch-size", batch, "-o", tmp_path / "i"))
    finally:
        proxy.server.shutdown()
    assert "29 ok, 1 failed" in r.stderr
    failed = [v for v in rows(tmp_path / "i").values() if v["status"] != "ok"]
    assert [v["error"] for v in failed] == [f"the server refused it: item {index}: refused here"]


def test_a_model_named_on_the_command_line_must_be_the_servers(cli, tmp_path, library, served, naflex_ckpt):
    r = cli("embed", library, "--server", served["fixed"].url, "-m", naflex_ckpt, "-o", tmp_path / "i")
    assert r.exit_code == 1 and "leave --model out" in r.stderr and len(r.stderr.strip().splitlines()) == 1
