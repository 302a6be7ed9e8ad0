"""`siglip serve` over loopback, started as a user starts it: parity with `siglip embed`, bad input answered
4xx naming the item, the limits (413, 422, 429, 504, 401), and a bounded load test."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import socket
import struct
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import b64, free_port, jpeg, noise_photos, run_siglip, start, stop, table

httpx = pytest.importorskip("httpx", reason="the test extra's httpx")
pytest.importorskip("fastapi", reason="the serve extra")
pytest.importorskip("uvicorn", reason="the serve extra")


@pytest.fixture(scope="module")
def server(fixed_ckpt):
    s = start(fixed_ckpt, "--max-items", "16", "--max-body-mb", "1", "--vocab", VOCAB_FILE(fixed_ckpt))
    yield s
    stop(s)


def VOCAB_FILE(ckpt) -> str:
    path = ckpt / "vocab.txt"
    path.write_text("cat\ndog\ncar\ntree\nsky\n")
    return str(path)


def photo_files(photos, n: int):
    return sorted(photos.glob("*.JPEG"))[:n]


def png_header_bomb(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds a few bytes: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# -- parity -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["fixed", "naflex"])
def test_image_vectors_equal_embed_rows(cli, fixed_ckpt, naflex_ckpt, photos, tmp_path, layout, server):
    ckpt = fixed_ckpt if layout == "fixed" else naflex_ckpt
    files = photo_files(photos, 6)
    out = tmp_path / "rows.parquet"
    assert (
        cli(
            "embed", *files, "-o", out, "-m", ckpt, "--device", "cpu", "--dtype", "float32", "--backend", "torch", "-q"
        ).exit_code
        == 0
    )
    rows = dict(zip(table(out)["path"], table(out)["embedding"]))
    served = server if layout == "fixed" else start(naflex_ckpt)
    try:
        got = served.post("/img/embed", {"input": [b64(f.read_bytes()) for f in files]}).json()["embeddings"]
        one = served.post("/img/embed", {"input": b64(files[0].read_bytes())}).json()  # the plan's shape
    finally:
        if served is not server:
            stop(served)
    want = np.array([rows[str(f)] for f in files])
    assert (np.array(got) * want).sum(axis=1).min() >= 0.9999
    assert float(np.dot(one["embedding"], want[0])) >= 0.9999 and one["dim"] == len(one["embedding"])


def test_search_with_a_server_embeds_its_queries_there(cli, fixed_ckpt, photos, tmp_path, server):
    """`siglip search --server URL`: text and new-image queries embedded by the running service, exact over the
    index; a server of another model, or none, is a one-line error."""
    import json

    files = photo_files(photos, 12)
    idx = tmp_path / "idx"
    assert (
        cli(
            "embed",
            *files,
            "-o",
            idx,
            "-m",
            fixed_ckpt,
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--backend",
            "torch",
            "-q",
        ).exit_code
        == 0
    )
    t = table(idx)
    vecs = np.array(t["embedding"], np.float32)
    meta = json.loads(pq.read_schema(next(idx.glob("*.parquet"))).metadata[b"siglip"])
    new = tmp_path / "new.jpg"
    new.write_bytes(jpeg((80, 60), (20, 120, 220)))
    for query, route, body in (
        (["a red car"], "/txt/embed", "a red car"),
        (["--image", new], "/img/embed", b64(new.read_bytes())),
    ):
        r = cli("search", idx, *query, "-k", "5", "--json", "--server", server.url)
        assert r.exit_code == 0, r.stderr
        got = [json.loads(line) for line in r.stdout.splitlines()]
        q = np.array(server.post(route, {"input": body}).json()["embedding"], np.float32)
        cos = vecs @ (q / np.linalg.norm(q))
        want = np.argsort(-cos, kind="stable")[:5]
        assert [g["path"] for g in got] == [t["path"][i] for i in want]
        score = (
            1 / (1 + np.exp(-(cos[want] * meta["logit_scale"] + meta["logit_bias"])))
            if route == "/txt/embed"
            else cos[want]
        )
        np.testing.assert_allclose([g["score"] for g in got], score, atol=1e-5)
    # a text minus another: both sent before the index opens, combined as without a server
    r = cli("search", idx, "a red car", "--minus", "a blue boat", "-k", "3", "--json", "--server", server.url)
    assert r.exit_code == 0, r.stderr
    plus, minus = (
        np.array(server.post("/txt/embed", {"input": x}).json()["embedding"]) for x in ("a red car", "a blue boat")
    )
    q = (plus - minus) / np.linalg.norm(plus - minus)
    want = np.argsort(-(vecs @ q), kind="stable")[:3]
    assert [json.loads(line)["path"] for line in r.stdout.splitlines()] == [t["path"][i] for i in want]
    r = cli("search", idx, "a red car", "--server", server.url, "--model", "google/siglip2-base-patch16-224")
    assert r.exit_code == 1 and "runs" in r.stderr and "siglip2-base-patch16-224" in r.stderr
    r = cli("search", idx, "a red car", "--server", f"http://127.0.0.1:{free_port()}")
    assert r.exit_code == 1 and r.stderr.startswith("siglip: error: --server") and len(r.stderr.splitlines()) == 1
    r = cli("search", tmp_path / "none", "a red car", "--server", f"http://127.0.0.1:{free_port()}")
    assert r.exit_code == 1 and "no index at" in r.stderr  # the index's error, not the early request's


def test_a_server_that_never_answers_is_one_line_soon(cli, fixed_ckpt, tmp_path, monkeypatch):
    """A listener that takes the connection and never answers: one line after remote.ANSWER_S (it waited 300 s
    in silence; a served index's /search is given remote.SEARCH_S)."""
    from siglip_cli import remote

    idx = tmp_path / "idx.parquet"
    img = tmp_path / "a.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(img)
    assert cli("embed", img, "-o", idx, "-m", fixed_ckpt, "--backend", "torch", "-q").exit_code == 0
    monkeypatch.setattr(remote, "ANSWER_S", 1.0)
    monkeypatch.setattr(remote, "SEARCH_S", 1.0)  # the served index's search (300 s: it may rebuild a sidecar)
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        url = f"http://127.0.0.1:{mute.getsockname()[1]}"
        start = time.monotonic()
        r = cli("search", idx, "a red car", "--server", url)
        assert time.monotonic() - start < 30
    said = r.stderr.strip()
    assert (
        r.exit_code == 1
        and said.startswith(f"siglip: error: --server {url}/")
        and said.endswith("no answer within 1 s")
    ), said


def test_a_text_alone_equals_it_in_a_batch(server):
    texts = ["a red car", "This is a photo of a Great Grey Owl.", "two dogs", ""]
    batch = np.array(server.post("/txt/embed", {"input": texts}).json()["embeddings"])
    for i, t in enumerate(texts):
        alone = np.array(server.post("/txt/embed", {"input": t}).json()["embedding"])
        assert np.abs(alone - batch[i]).max() <= 1e-6
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1, atol=1e-5)


def test_openai_embeddings(server, photos):
    img = "data:image/jpeg;base64," + b64(photo_files(photos, 1)[0].read_bytes())
    r = server.post("/v1/embeddings", {"input": ["a red car", img], "model": "siglip", "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 1] and body["usage"]["prompt_tokens"] > 0
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")
    text = server.post("/txt/embed", {"input": "a red car"}).json()["embedding"]
    assert np.abs(vec - np.array(text)).max() <= 1e-6
    image = server.post("/img/embed", {"input": img}).json()["embedding"]
    plain = server.post("/v1/embeddings", {"input": img}).json()["data"][0]["embedding"]
    assert np.abs(np.array(plain) - np.array(image)).max() <= 1e-6
    # a text that starts with "data:" is a text (it was refused as a bad image); "dimensions" other than the
    # model's is refused (it was ignored)
    said = server.post("/v1/embeddings", {"input": ["data: is a word"]})
    assert said.status_code == 200, said.text
    as_text = server.post("/txt/embed", {"input": "data: is a word"}).json()["embedding"]
    assert np.abs(np.array(said.json()["data"][0]["embedding"]) - np.array(as_text)).max() <= 1e-6
    dim = len(as_text)
    assert server.post("/v1/embeddings", {"input": "x", "dimensions": dim}).status_code == 200
    short = server.post("/v1/embeddings", {"input": "x", "dimensions": 8})
    assert short.status_code == 422 and "dimensions" in short.text


def test_tag_and_classify_score_like_the_cli(cli, fixed_ckpt, photos, tmp_path, server):
    files = photo_files(photos, 3)
    out = tmp_path / "tags.parquet"
    assert (
        cli(
            "tag",
            *files,
            "--vocab",
            fixed_ckpt / "vocab.txt",
            "--threshold",
            "0",
            "-o",
            out,
            "-m",
            fixed_ckpt,
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--backend",
            "torch",
            "-q",
        ).exit_code
        == 0
    )
    want = table(out)["tags"]
    got = server.post("/tag", {"input": [b64(f.read_bytes()) for f in files], "threshold": 0}).json()["results"]
    for w, g in zip(want, got):
        assert [t["tag"] for t in w] == [t["tag"] for t in g["tags"]]
        np.testing.assert_allclose([t["score"] for t in w], [t["score"] for t in g["tags"]], atol=1e-5)
    top = server.post("/tag", {"input": b64(files[0].read_bytes()), "threshold": 0, "top_k": 2}).json()
    assert len(top["tags"]) == 2
    c = server.post("/classify", {"input": b64(files[0].read_bytes()), "labels": ["cat", "dog", "car"]}).json()
    assert c["label"] == c["top_k"][0]["label"] and len(c["top_k"]) == 3


# -- bad input --------------------------------------------------------------------------------------------
BAD = {
    "invalid base64": "!!not base64!!",
    "not an image": b64(b"hello, this is text"),
    "truncated image": b64(jpeg((400, 300))[:300]),
    "decompression bomb": b64(png_header_bomb(40000, 40000)),
    "remote url": "https://example.com/cat.jpg",
    "empty": "",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_item_is_a_400_naming_it(server, kind):
    good = b64(jpeg())
    r = server.post("/img/embed", {"input": [good, BAD[kind]]})
    assert r.status_code == 400, (kind, r.status_code, r.text)
    assert r.json()["error"]["index"] == 1
    assert server.post("/img/embed", {"input": good}).status_code == 200  # and the server goes on


def test_a_tiny_image_is_embedded_like_any_other(server):
    """A 1x1 image is a valid image (`siglip embed` gives it a row): a vector, never a stall."""
    r = server.post("/img/embed", {"input": b64(jpeg((1, 1)))})
    assert r.status_code == 200 and len(r.json()["embedding"]) == r.json()["dim"]


def test_limits(server):
    assert server.post("/img/embed", {"input": []}).status_code == 422
    assert server.post("/txt/embed", {"input": ["x"] * 17}).status_code == 422
    assert server.post("/txt/embed", {"nothing": 1}).status_code == 422
    assert server.post("/txt/embed", {"input": [1, 2]}).json()["error"]["index"] == 0
    JSON = {"Content-Type": "application/json"}
    big = httpx.post(
        server.url + "/img/embed", content=b'{"input": "' + b"A" * (2 << 20) + b'"}', timeout=30, headers=JSON
    )
    assert big.status_code == 413
    assert httpx.post(server.url + "/txt/embed", content=b"{not json", timeout=10, headers=JSON).status_code == 400
    assert server.post("/tag", {"input": b64(jpeg()), "threshold": 2}).status_code == 422
    assert server.get("/health").json() == {"status": "ok"}
    # a text that is not valid Unicode (a lone surrogate, as JSON allows): a 422 naming it, on every route that
    # takes texts, and it never reaches a batch (it failed every request in its batch with 500)
    lone = '"\\ud800"'.encode()
    for route, body in (
        ("/txt/embed", b'{"input": ["fine", %s]}' % lone),
        ("/v1/embeddings", b'{"input": ["fine", %s]}' % lone),
        ("/classify", b'{"input": "%s", "labels": ["a", %s]}' % (b64(jpeg()).encode(), lone)),
    ):
        bad = httpx.post(server.url + route, content=body, timeout=30, headers=JSON)
        assert bad.status_code == 422 and "not valid Unicode" in bad.json()["error"]["message"], (route, bad.text)
    assert server.post("/txt/embed", {"input": ["fine"]}).status_code == 200
    # labels count against --max-items, as texts do (a 429 "busy" answered more, which no retry would cure)
    many = server.post("/classify", {"input": b64(jpeg()), "labels": [f"l{i}" for i in range(17)]})
    assert many.status_code == 422 and "--max-items" in many.text


def test_queue_deadline_and_token(fixed_ckpt):
    s = start(
        fixed_ckpt,
        "--max-queue",
        "2",
        "--max-wait-ms",
        "1500",
        "--batch-size",
        "64",
        "--timeout",
        "0.4",
        "--api-key",
        "s3crét",
    )  # a key beyond ASCII, sent as UTF-8 (it could never match)
    try:
        auth = {"Authorization": "Bearer s3crét".encode()}
        assert s.post("/txt/embed", {"input": "x"}).status_code == 401
        assert s.post("/txt/embed", {"input": "x"}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert s.get("/health").status_code == 200 and s.get("/ready").status_code == 200  # probes need no token
        full = s.post("/txt/embed", {"input": ["a", "b", "c"]}, headers=auth)
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        late = s.post("/txt/embed", {"input": "x"}, headers=auth)  # waits 1.5 s for company; allowed 0.4
        assert late.status_code == 504
        metrics = s.get("/metrics", headers=auth).text
        assert 'siglip_requests_total{route="/txt/embed",status="504"} 1' in metrics
        assert "siglip_queue_depth 0" in metrics  # the late request's item was dropped from the queue
        # a client that goes away: its item leaves the queue before it runs
        body = b'{"input": "gone"}'
        with socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(
                b"POST /txt/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer s3cr\xc3\xa9t\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            time.sleep(0.1)
        time.sleep(0.3)
        metrics = s.get("/metrics", headers=auth).text
        assert "siglip_queue_depth 0" in metrics
        assert 'siglip_requests_total{route="/txt/embed",status="499"} 1' in metrics
        assert 'siglip_items_total{kind="text"} 1' in metrics  # the startup canary's only: neither ran
        # --timeout counts the body's arrival: a client that sends half and waits is answered 504 in time
        with socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(
                b"POST /txt/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer s3cr\xc3\xa9t\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body[:5])
            )
            sock.settimeout(10)
            assert sock.recv(4096).startswith(b"HTTP/1.1 504")
        # /metrics labels the app's own routes, every other path as "other": a client cannot grow it or break it
        for path in ("/nope", '/a"b%0Ac}', "/x1", "/x2"):
            assert s.get(path).status_code == 401
        metrics = s.get("/metrics", headers=auth).text
        assert 'route="other",status="401"' in metrics and "/nope" not in metrics and "/x1" not in metrics
    finally:
        stop(s)


# -- load -------------------------------------------------------------------------------------------------
def test_load(server, photos):
    """32 clients for about 10 s, texts and images mixed with 5% bad items: every good request answered 200
    with the right vector, every bad one a 4xx, no 5xx; ready afterwards; memory flat between the halves."""
    files = photo_files(photos, 8)
    images = [b64(f.read_bytes()) for f in files]
    texts = [f"a photo number {i}" for i in range(8)]
    want_img = np.array([server.post("/img/embed", {"input": i}).json()["embedding"] for i in images])
    want_txt = np.array(server.post("/txt/embed", {"input": texts}).json()["embeddings"])
    bad = list(BAD.values())
    problems, counts, rss = [], {"good": 0, "bad": 0}, []

    async def client(seed: int, until: float, http):
        rng = random.Random(seed)
        while time.monotonic() < until:
            i = rng.randrange(8)
            if rng.random() < 0.05:
                r = await http.post("/img/embed", json={"input": rng.choice(bad)})
                counts["bad"] += 1
                if not 400 <= r.status_code < 500:
                    problems.append(("bad", r.status_code, r.text[:200]))
            elif rng.random() < 0.5:
                r = await http.post("/img/embed", json={"input": images[i]})
                counts["good"] += 1
                if r.status_code != 200 or float(np.dot(r.json()["embedding"], want_img[i])) < 0.9999:
                    problems.append(("image", r.status_code, r.text[:200]))
            else:
                r = await http.post("/txt/embed", json={"input": texts[i]})
                counts["good"] += 1
                if r.status_code != 200 or np.abs(np.array(r.json()["embedding"]) - want_txt[i]).max() > 1e-5:
                    problems.append(("text", r.status_code, r.text[:200]))

    async def run(seconds: float):
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
            until = time.monotonic() + seconds
            await asyncio.gather(*(client(s, until, http) for s in range(32)))

    for _ in range(2):
        asyncio.run(run(5))
        rss.append(server.rss())
    assert not problems, problems[:5]
    assert counts["good"] > 100 and counts["bad"] > 0
    assert server.get("/ready").json()["ready"] is True
    assert rss[1] - rss[0] < 64 << 20, f"server memory grew {(rss[1] - rss[0]) >> 20} MB in the second half"


def test_served_texts_are_those_of_a_cli_run(cli, fixed_ckpt, tmp_path, server):
    """On a CPU with the openvino extra the server embeds texts with the OpenVINO text tower, as `embed --text`,
    `tag` and `classify` there do: the same vectors, and torch's to a cosine of 0.9999."""
    texts = ["a red car", "two dogs", "This is a photo of a Great Grey Owl."]
    served = np.array(server.post("/txt/embed", {"input": texts}).json()["embeddings"])
    for backend, out in (("auto", tmp_path / "cpu.parquet"), ("torch", tmp_path / "torch.parquet")):
        args = [a for t in texts for a in ("-t", t)]
        assert (
            cli(
                "embed",
                *args,
                "-o",
                out,
                "-m",
                fixed_ckpt,
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--backend",
                backend,
            ).exit_code
            == 0
        )
    for out, close in (
        (tmp_path / "cpu.parquet", lambda a, b: np.abs(a - b).max() <= 1e-6),
        (tmp_path / "torch.parquet", lambda a, b: (a * b).sum(axis=1).min() >= 0.9999),
    ):
        assert close(served, np.array(table(out)["embedding"])), out.name


def test_a_server_with_the_index_runs_the_search(cli, fixed_ckpt, photos, tmp_path):
    """`siglip serve --index INDEX`: POST /search searches it there (sidecar warm, model loaded), and
    `siglip search --server` on that index asks for it: the results of a local search. A search of another
    index still only has its texts embedded there; bad requests are 4xx."""
    import json

    files = photo_files(photos, 12)
    idx, other = tmp_path / "idx", tmp_path / "other"

    def embed(out, some):
        assert (
            cli(
                "embed",
                *some,
                "-o",
                out,
                "-m",
                fixed_ckpt,
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--backend",
                "torch",
                "-q",
            ).exit_code
            == 0
        )

    embed(idx, files[:8]), embed(other, files[:6])
    served = start(fixed_ckpt, "--index", idx)
    try:
        for where in (idx, other, "more", idx):  # more: the served index grows, and its next search sees it
            if where == "more":
                embed(idx, files)
                continue
            args = ["a red car", "--minus", "a blue boat", "-k", "10", "--path", "*", "--json"]
            local = cli("search", where, *args)
            remote = cli("search", where, *args, "--server", served.url)
            assert remote.exit_code == 0, remote.stderr
            got, want = ([json.loads(x) for x in r.stdout.splitlines()] for r in (remote, local))
            assert [g["path"] for g in got] == [w["path"] for w in want] and len(got) == min(
                10, len(table(where)["path"])
            )
            np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-5)
        assert len(got) == 10
        metrics = served.get("/metrics").text
        assert 'route="/search",status="200"} 2' in metrics  # idx by /search; other by /txt/embed
        assert 'route="/search",status="404"} 1' in metrics
        one = served.post("/search", {"query": "a red car", "k": 2}).json()
        assert [r["rank"] for r in one["rows"]] == [1, 2] and one["score"] == "sigmoid probability"
        for bad in ({"query": []}, {"query": "x", "k": 0}, {"query": [1]}, {"query": "x", "min_score": "high"}):
            assert served.post("/search", bad).status_code == 422, bad
        assert served.post("/search", {"query": "x", "min_score": 1.5}).json()["rows"] == []  # as the CLI: none
        assert served.post("/search", {"query": "x", "index": str(idx), "state": []}).status_code == 404
    finally:
        stop(served)
    gone = run_siglip("serve", "-m", fixed_ckpt, "--index", tmp_path / "none", "--port", free_port())
    assert gone.returncode == 1 and gone.stderr.strip().splitlines()[-1].endswith("no index there")


def test_a_checkpoint_saved_over_under_its_name_is_refused(cli, fixed_ckpt, naflex_ckpt, photos, tmp_path):
    """An index's model is its weights, not its name: a local folder saved over with another checkpoint (or a
    ./ckpt that is another one from another folder) is refused by a local search, by `search --server` of a
    server that loads that folder, and by `serve --index`, each in one line; the name alone had been trusted."""
    import shutil

    from siglip_cli.remote import same_model

    ck = tmp_path / "ck"
    shutil.copytree(fixed_ckpt, ck)
    idx = tmp_path / "idx"
    assert (
        cli(
            "embed",
            *photo_files(photos, 4),
            "-o",
            idx,
            "-m",
            ck,
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--backend",
            "torch",
            "-q",
        ).exit_code
        == 0
    )
    shutil.rmtree(ck)
    shutil.copytree(naflex_ckpt, ck)  # the same name and size, other weights
    env = {"SIGLIP_CACHE_DIR": str(tmp_path / "cache")}  # no converted text tower of the index's own model
    r = run_siglip("search", idx, "a dog", "--device", "cpu", env=env)
    assert r.returncode == 1 and "other weights" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    served = start(ck)
    try:
        r = cli("search", idx, "a dog", "--server", served.url)
        assert r.exit_code == 1 and "weights local:" in r.stderr, r.stderr
    finally:
        stop(served)
    r = run_siglip("serve", "-m", ck, "--index", idx, "--port", free_port())
    assert r.returncode == 1 and "was made with" in r.stderr.strip().splitlines()[-1], r.stderr
    # the rule: weights decide where both sides know them, names only where one does not
    assert not same_model(("ck", 32, None, "local:a"), ("ck", 32, None, "local:b"))
    assert same_model(("/x/ck", 32, None, "local:a"), ("ck", 32, None, "local:a"))
    assert not same_model(("ck", 32, None, "local:a"), ("ck", 16, None, "local:a"))
    assert same_model(("ck", 32, None, None), ("ck", 32, None, "local:a"))


def test_image_queries_are_embedded_with_the_index_s_max_patches(cli, naflex_ckpt, tmp_path):
    """An image query of a file outside the index, embedded by a server, is embedded as the index's images were:
    `serve --index` takes the index's --max-patches (another one is refused at start), and `search --server`
    refuses a server that embeds images with another one (an exact copy of an indexed photo scored below 1)."""
    import json

    lib = noise_photos(tmp_path / "lib", 3)
    idx = tmp_path / "idx.parquet"
    assert (
        cli("embed", lib, "-o", idx, "-m", naflex_ckpt, "--max-patches", "16", "--backend", "torch", "-q").exit_code
        == 0
    )
    copy = tmp_path / "copy.png"
    copy.write_bytes((lib / "p1.png").read_bytes())
    refused = run_siglip("serve", "-m", naflex_ckpt, "--index", idx, "--max-patches", "64", "--port", free_port())
    assert refused.returncode == 1 and "was embedded with --max-patches 16, not 64" in refused.stderr
    for args, fits in ((["--index", idx], True), ([], False)):
        served = start(naflex_ckpt, *args)
        try:
            r = cli("search", idx, "--image", copy, "-k", "1", "--json", "--server", served.url)
        finally:
            stop(served)
        if fits:
            assert r.exit_code == 0, r.stderr
            (top,) = [json.loads(line) for line in r.stdout.splitlines()]
            assert top["path"] == str(lib / "p1.png") and top["score"] > 0.9999
        else:
            assert r.exit_code == 1 and "embeds images with --max-patches the default" in r.stderr, r.stderr


def test_an_older_index_s_max_patches_reads_as_this_version_records_it(naflex_ckpt, fixed_ckpt, tmp_path):
    """An index written before --max-patches was normalized recorded the checkpoint's default as a number (or a
    value a fixed-resolution checkpoint ignores): serve --index and search --server read it as the default, not
    as another setting (it was refused: "was embedded with --max-patches 256, not 256")."""
    from siglip_cli.serve import index_patches
    from siglip_cli.weights import recorded_patches

    def meta(ckpt, value):
        return {"model": str(ckpt), "signature": {"max_patches": value}}

    assert recorded_patches(meta(naflex_ckpt, 256)) is None and recorded_patches(meta(naflex_ckpt, 64)) == 64
    assert recorded_patches(meta(fixed_ckpt, 64)) is None and recorded_patches(meta(naflex_ckpt, None)) is None
    assert recorded_patches(meta(tmp_path / "gone", 64)) == 64  # a config that cannot be read: the value stands
    idx = tmp_path / "old.parquet"
    table = pa.table({"a": [1]}).replace_schema_metadata({b"siglip": json.dumps(meta(naflex_ckpt, 256)).encode()})
    pq.write_table(table, idx)
    assert index_patches(str(idx), str(naflex_ckpt), None, None) is None
    assert index_patches(str(idx), str(naflex_ckpt), None, 256) == 256  # the same setting, by number
    with pytest.raises(Exception, match="was embedded with --max-patches the default, not 64"):
        index_patches(str(idx), str(naflex_ckpt), None, 64)


def test_a_port_in_use_or_a_bad_host_is_one_line_before_the_model_loads(fixed_ckpt):
    """serve binds first: a port in use or a host that is no address is one line and exit 1 at once (uvicorn
    said so after the model had loaded, with exit 3 and a "serving on" line before it). Options it cannot
    honour are said before: --api-key '' is a usage error (it turned the token off, silently), --max-patches
    on a fixed-resolution checkpoint and a list of devices are notes."""
    r = run_siglip("serve", "-m", fixed_ckpt, "--api-key", "", "--port", free_port())
    assert r.returncode == 2 and "an empty key" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        for args, said in (
            (["--port", port], f"cannot listen on 127.0.0.1:{port}:"),
            (["--host", "256.1.1.1", "--port", free_port()], "cannot listen on 256.1.1.1:"),
        ):
            r = run_siglip("serve", "-m", fixed_ckpt, *args)
            assert r.returncode == 1 and r.stderr.strip().startswith(f"siglip: error: {said}"), r.stderr
            assert len(r.stderr.strip().splitlines()) == 1 and "serving" not in r.stderr
        noted = run_siglip("serve", "-m", fixed_ckpt, "--port", port, "--max-patches", "64", "--device", "cpu,cpu")
        assert noted.returncode == 1 and "--max-patches is for NaFlex checkpoints" in noted.stderr
        assert "serve runs on one device: cpu" in noted.stderr
