"""Benchmark `siglip search` and `siglip dedup` on synthetic indexes of random unit vectors.

    python examples/search_bench.py /tmp/bench --rows 1000000 --dim 1152            # search
    python examples/search_bench.py /tmp/bench --rows 100000 --dim 1152 --dedup     # dedup
    python examples/search_bench.py /tmp/bench --rows 1000000 --dim 1152 --text     # text queries

Writes INDEX.parquet (float16 vectors, as `siglip embed --float16` stores them), then runs the CLI under
/usr/bin/time: the first search (builds the sidecar), a second one (maps it), or dedup; prints seconds and
peak memory. The query is an indexed image (its stored vector is reused), so no model is loaded.

--text times a text query three ways, on a random-weight checkpoint with so400m's text tower (27 layers, width
1152, a 256,000-token vocabulary; built once, offline): loading the model with torch, with `--server` against a
running `siglip serve` of it (and of it with `--index` on the index: the server embeds and scans; medians of
eleven), and (with the openvino extra) after converting the text tower as `tag` and
`classify` on a CPU do, reading it from the cache (medians of five).
"""

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from siglip_cli.index.files import dictionary_columns


def checkpoint(folder: str, dim: int) -> str:
    """so400m's text tower (random weights) with a minimal image tower, and a character-level Gemma tokenizer."""
    import string

    import torch
    from transformers import GemmaTokenizer, SiglipConfig, SiglipModel

    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for ch in "\u2581" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
    tok = GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=False, add_eos_token=True, padding_side="right")
    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=dict(
            vocab_size=256_000,
            hidden_size=dim,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            max_position_embeddings=64,
            projection_size=dim,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=dim,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=16,
            image_size=64,
            patch_size=16,
        ),
    )
    SiglipModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    processor = dict(
        image_processor_type="SiglipImageProcessor",
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        size={"height": 64, "width": 64},
        resample=2,
        rescale_factor=1 / 255,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    Path(folder, "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def make(path: str, rows: int, dim: int, model: str) -> None:
    rng = np.random.default_rng(0)
    meta = {
        "tool": "siglip",
        "model": model,
        "dim": dim,
        "dtype": "float32",
        "logit_scale": 10.0,
        "logit_bias": -10.0,
        "task": "embed",
        "embedding_dtype": "float16",
        "signature": None,
    }
    schema = pa.schema(
        [
            ("path", pa.string()),
            ("status", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("size", pa.int64()),
            ("embedding", pa.list_(pa.float16(), dim)),
        ],
        metadata={b"siglip": json.dumps(meta).encode()},
    )
    with pq.ParquetWriter(path, schema, use_dictionary=dictionary_columns(schema)) as w:  # as siglip writes
        for start in range(0, rows, 50_000):
            n = min(50_000, rows - start)
            v = rng.standard_normal((n, dim), dtype=np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            emb = pa.FixedSizeListArray.from_arrays(pa.array(v.astype(np.float16).ravel()), dim)
            w.write_table(
                pa.table(
                    {
                        "path": [f"/photos/{i:08d}.jpg" for i in range(start, start + n)],
                        "status": ["ok"] * n,
                        "width": pa.array([4000] * n, pa.int32()),
                        "height": pa.array([3000] * n, pa.int32()),
                        "size": [3_000_000] * n,
                        "embedding": emb,
                    },
                    schema=schema,
                )
            )


def timed(args: list[str]) -> tuple[float, float]:
    t = time.perf_counter()
    out = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "siglip_cli", *args], capture_output=True, text=True
    )
    took = time.perf_counter() - t
    if out.returncode:
        raise SystemExit(out.stderr)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) / 1024**2
    return took, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--dedup", action="store_true")
    ap.add_argument("--text", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.folder, exist_ok=True)
    model = os.path.abspath(os.path.join(a.folder, f"text-{a.dim}"))
    index = os.path.join(a.folder, f"index-{a.rows}.parquet")
    if not os.path.exists(index):
        make(index, a.rows, a.dim, model)
    if a.text:
        return text(index, checkpoint(model, a.dim), a)
    if a.dedup:
        timed(["search", index, "--image", "/photos/00000007.jpg"])  # the sidecar, if missing
        for label, extra in (("dedup", []), ("dedup --similar", ["--similar"])):
            took, rss = timed(["dedup", index, *extra, "-o", os.path.join(a.folder, "groups.parquet")])
            print(f"| {label} | {a.rows:,} x {a.dim} float16 | {took:.1f} s | {rss:.2f} GB |")
        return
    sidecar = os.path.join(a.folder, f".index-{a.rows}.parquet.vectors")
    subprocess.run(["rm", "-rf", sidecar])
    query = ["search", index, "--image", "/photos/00000007.jpg", "-k", "10", "--json"]
    for label in ("first search (builds the sidecar)", "later search"):
        took, rss = timed(query)
        print(f"| {label} | {a.rows:,} x {a.dim} float16 | {took:.2f} s | {rss:.2f} GB |")


@contextlib.contextmanager
def serving(model: str, extra: list[str]):
    """A `siglip serve` of the model on the CPU, ready; its URL and process id."""
    port = 8765
    t = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "siglip_cli", "serve", "-m", model, "--port", str(port), "--device", "cpu", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                urllib.request.urlopen(url + "/ready", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        print(f"(the server was ready in {time.perf_counter() - t:.0f} s)")
        yield url, server.pid
    finally:
        server.terminate()
        server.wait()


def peak_memory(pid: int) -> float:
    """A process's peak resident memory in GB (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 2**20


def text(index: str, model: str, a) -> None:
    query = ["search", index, "a photo of a dog", "-k", "10", "--json", "--device", "cpu"]
    timed(["search", index, "--image", "/photos/00000007.jpg"])  # the sidecar, if missing
    # a cache of its own: no converted text tower until the server (on OpenVINO, where installed) converts it
    os.environ["SIGLIP_CACHE_DIR"] = cache = os.path.join(a.folder, "text-cache")
    subprocess.run(["rm", "-rf", cache])
    took, rss = timed(query)
    print(f"| text search, loading the model with torch | {a.rows:,} x {a.dim} float16 | {took:.2f} s | {rss:.2f} GB |")
    for label, extra in (("--server", []), ("--server of a `serve --index` of this index", ["--index", index])):
        with serving(model, extra) as (url, pid):
            runs = [timed(query + ["--server", url]) for _ in range(12)][1:]  # the first warms the server
            server_rss = peak_memory(pid)
        took = sorted(r[0] for r in runs)
        print(
            f"| text search with {label} | {a.rows:,} x {a.dim} float16 | {took[0]:.2f}-{took[-1]:.2f} s, "
            f"median {statistics.median(took):.2f} s (11 runs) | {max(r[1] for r in runs):.2f} GB "
            f"(the server: {server_rss:.1f} GB) |"
        )
    from siglip_cli.config import ModelConfig
    from siglip_cli.encoders import ovtext
    from siglip_cli.model import Encoder

    if not ovtext.available():
        return
    t = time.perf_counter()  # what a `tag` or `classify` run on a CPU with the openvino extra does, once
    Encoder.load(ModelConfig(model, device="cpu", dtype="float32")).encode_texts(["a photo"])
    print(f"(converting the text tower for OpenVINO took {time.perf_counter() - t:.0f} s, once)")
    runs = [timed(query) for _ in range(5)]
    took, rss = statistics.median(r[0] for r in runs), max(r[1] for r in runs)
    print(
        f"| text search, the text tower converted (OpenVINO, from the cache) | {a.rows:,} x {a.dim} float16 | "
        f"{took:.2f} s | {rss:.2f} GB |"
    )


if __name__ == "__main__":
    main()
