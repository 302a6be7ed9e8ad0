"""Benchmark `siglip search` and `siglip dedup` on synthetic indexes of random unit vectors.

    python examples/search_bench.py /tmp/bench --rows 1000000 --dim 1152            # search
    python examples/search_bench.py /tmp/bench --rows 100000 --dim 1152 --dedup     # dedup

Writes INDEX.parquet (float16 vectors, as `siglip embed --float16` stores them), then runs the CLI under
/usr/bin/time: the first search (builds the sidecar), a second one (maps it), or dedup; prints seconds and
peak memory. The query is an indexed image (its stored vector is reused), so no model is loaded: a text
query adds only the model's load and one text embedding.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from siglip_cli.index.files import dictionary_columns


def make(path: str, rows: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    meta = {"tool": "siglip", "model": "random", "dim": dim, "dtype": "float32", "logit_scale": 10.0,
            "logit_bias": -10.0, "task": "embed", "embedding_dtype": "float16", "signature": None}
    schema = pa.schema([("path", pa.string()), ("status", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                        ("size", pa.int64()), ("embedding", pa.list_(pa.float16(), dim))],
                       metadata={b"siglip": json.dumps(meta).encode()})
    with pq.ParquetWriter(path, schema, use_dictionary=dictionary_columns(schema)) as w:  # as siglip writes
        for start in range(0, rows, 50_000):
            n = min(50_000, rows - start)
            v = rng.standard_normal((n, dim), dtype=np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            emb = pa.FixedSizeListArray.from_arrays(pa.array(v.astype(np.float16).ravel()), dim)
            w.write_table(pa.table({"path": [f"/photos/{i:08d}.jpg" for i in range(start, start + n)],
                                    "status": ["ok"] * n, "width": pa.array([4000] * n, pa.int32()),
                                    "height": pa.array([3000] * n, pa.int32()), "size": [3_000_000] * n,
                                    "embedding": emb}, schema=schema))


def timed(args: list[str]) -> tuple[float, float]:
    t = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "siglip_cli", *args],
                         capture_output=True, text=True)
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
    a = ap.parse_args()
    os.makedirs(a.folder, exist_ok=True)
    index = os.path.join(a.folder, f"index-{a.rows}.parquet")
    if not os.path.exists(index):
        make(index, a.rows, a.dim)
    if a.dedup:
        took, rss = timed(["dedup", index, "-o", os.path.join(a.folder, "groups.parquet")])
        print(f"| dedup | {a.rows:,} x {a.dim} float16 | {took:.1f} s | {rss:.2f} GB |")
        return
    sidecar = os.path.join(a.folder, f".index-{a.rows}.parquet.vectors")
    subprocess.run(["rm", "-rf", sidecar])
    query = ["search", index, "--image", "/photos/00000007.jpg", "-k", "10", "--json"]
    for label in ("first search (builds the sidecar)", "later search"):
        took, rss = timed(query)
        print(f"| {label} | {a.rows:,} x {a.dim} float16 | {took:.2f} s | {rss:.2f} GB |")


if __name__ == "__main__":
    main()
