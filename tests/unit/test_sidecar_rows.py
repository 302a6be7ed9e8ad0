"""The sidecar's rows, from Parquet files written here: exactly the ok rows and their vectors, each path's newest
row, exact names that are not UTF-8 (siglip_cli/sidecar.py, vectors.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from siglip_cli.vectors import top_k


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_sidecar_keeps_exactly_the_ok_rows(tmp_path, dtype):
    """Error rows (no vector) between ok ones, across row groups: the sidecar holds the ok rows' vectors, paths
    and sizes in order, whether a group's kept rows are one span (a view) or scattered (a copy)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from siglip_cli.index.files import METADATA_KEY
    from siglip_cli.vectors import load

    n, d = 40, 8
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, d)).astype(dtype)
    ok = np.ones(n, bool)
    ok[[3, 4, 11, 25, 39]] = False  # groups of 10: 0-9 and 10-19 scattered, 20-29 too, 30-39 a span
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), d)
    emb = pa.array([v if k else None for v, k in zip(emb.to_pylist(), ok)], emb.type)
    meta = {"tool": "siglip", "model": "m", "dim": d, "task": "embed"}
    table = pa.table(
        {
            "path": [f"/p/{i:02d}.jpg" for i in range(n)],
            "status": ["ok" if k else "error" for k in ok],
            "width": pa.array(range(n), pa.int32()),
            "height": pa.array([5] * n, pa.int32()),
            "size": pa.array(range(100, 100 + n), pa.int64()),
            "embedding": emb,
        }
    )
    index = tmp_path / "i.parquet"
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), index, row_group_size=10)
    v = load(str(index))
    np.testing.assert_array_equal(np.asarray(v.matrix), vecs[ok])
    assert v.rows.paths() == [f"/p/{i:02d}.jpg" for i in np.flatnonzero(ok)] and v.meta == meta
    assert [v.rows.record(j)["size"] for j in range(len(v.rows))] == (100 + np.flatnonzero(ok)).tolist()
    kept = load(str(index), resident=True)  # as `serve --index` opens it: its int8 copy mapped and scanned in place
    assert type(kept.fast.values) is np.ndarray and np.array_equal(kept.fast.values, v.fast.values)
    q = (vecs[7] / np.linalg.norm(vecs[7])).astype(np.float32)
    for a, b in zip(top_k(kept.matrix, q, 5, fast=kept.fast), top_k(v.matrix, q, 5, fast=v.fast)):
        np.testing.assert_array_equal(a, b)


def test_sidecar_rows_find_exact_paths(tmp_path):
    """Paths are found whole: not as a prefix, a suffix or a piece spanning two neighbours; in any script."""
    import pyarrow as pa

    from siglip_cli.sidecar import _write_rows
    from siglip_cli.vectors import _open

    paths = [
        "/a/b.jpg",
        "/a/b.jpg.jpg",
        "/x/a/b.jpg",
        "/p/caf\u00e9 \u5199\u771f.jpg",
        "/a/b",
        ".jpg/a/b.jpg",
        "/q",
        os.fsdecode(b"/p/caf\xe9.jpg"),
        os.fsdecode(b"/p/caf\xe8.jpg"),
    ]  # two names that are not UTF-8
    exact = [None] * 7 + [b"/p/caf\xe9.jpg", b"/p/caf\xe8.jpg"]
    light = pa.table(
        {
            "path": [p.encode(errors="surrogateescape").decode(errors="replace") for p in paths],
            "width": pa.array([1, None, 3, 4, 5, 6, 7, 8, 9], pa.int32()),
            "height": pa.array([2] * 9, pa.int32()),
            "size": pa.array([10] * 9, pa.int64()),
            "path_bytes": pa.array(exact, pa.binary()),
        }
    )
    for folder, rows in ((tmp_path / "all", light), (tmp_path / "none", light.slice(0, 0))):
        folder.mkdir()
        _write_rows(rows, str(folder))
        np.save(folder / "vectors.npy", np.zeros((rows.num_rows, 2), np.float32))
        np.save(folder / "fast.npy", np.zeros((rows.num_rows, 2), np.int8))
        np.save(folder / "bounds.npy", np.zeros((rows.num_rows, 2), np.float32))
        np.save(folder / "columns.npy", np.ones(2, np.float32))
        (folder / "meta.json").write_text("{}")
    rows = _open(str(tmp_path / "all")).rows
    assert rows.paths() == light.column("path").to_pylist() and [rows.find(p) for p in paths] == list(range(len(paths)))
    assert rows.record(8) == {
        "path": "/p/caf\ufffd.jpg",
        "width": 9,
        "height": 2,
        "size": 10,
        "path_bytes": b"/p/caf\xe8.jpg",
    }
    for absent in ("/a", "b.jpg", "/a/b.jpg.", "/a/b.jpg/a", "jpg/a", "/p/caf\u00e9", "", "/\udce9.jpg"):
        assert rows.find(absent) == -1, absent
    assert rows.record(1) == {"path": "/a/b.jpg.jpg", "width": None, "height": 2, "size": 10, "path_bytes": None}
    empty = _open(str(tmp_path / "none")).rows
    assert len(empty) == 0 and empty.paths() == [] and empty.find("/a/b.jpg") == -1


@pytest.mark.parametrize("odd_names", [False, True])
def test_sidecar_keeps_each_paths_newest_ok_row(tmp_path, odd_names):
    """Across the files of an index, oldest first, each path's newest row counts (an error row hides the older
    ok one); names that are not UTF-8 are told apart by their exact bytes (path_bytes), not their display."""
    import pyarrow as pa

    from siglip_cli.sidecar import _current

    rng = np.random.default_rng(0)
    files, seen = [], []
    for f in range(3):
        n = 500
        paths = [f"/p/{i}.jpg" for i in rng.integers(0, 300, n)]
        raw = [None] * n
        if odd_names:  # three names that show the same (U+FFFD for the bad byte) with different bytes
            raw = [
                bytes([0x2F, 0xFF - (i % 3)]) if p.endswith(("7.jpg", "3.jpg")) else None for i, p in enumerate(paths)
            ]
            paths = ["/\ufffd" if b else p for p, b in zip(paths, raw)]
        status = ["ok" if s else "error" for s in rng.random(n) > 0.1]
        columns = {"path": paths, "width": list(range(n)), "height": [1] * n, "size": [f] * n, "status": status}
        if odd_names:
            columns["path_bytes"] = pa.array(raw, pa.binary())
        pq.write_table(pa.table(columns), tmp_path / f"part-{f}.parquet", row_group_size=128)
        files.append(str(tmp_path / f"part-{f}.parquet"))
        seen += list(zip(paths, raw, status))
    newest = {}
    for i, (path, raw, status) in enumerate(seen):
        newest[(path, raw)] = (i, status)
    want = sorted(i for i, status in newest.values() if status == "ok")
    rows, light = _current(files)
    assert rows.tolist() == want
    assert light.column("path").to_pylist() == [seen[i][0] for i in want]
    if odd_names:
        assert light.column("path").to_pylist().count("/\ufffd") == 3


def test_sidecar_tells_apart_many_names_that_show_the_same(tmp_path):
    """More names that show the same than there are distinct paths: each keeps its row."""
    import pyarrow as pa

    from siglip_cli.sidecar import _current

    raw = [b"/caf\xe8.jpg", b"/caf\xe9.jpg", b"/caf\xea.jpg", None]
    pq.write_table(
        pa.table(
            {
                "path": ["/caf\ufffd.jpg"] * 3 + ["/dog.jpg"],
                "width": [1] * 4,
                "height": [1] * 4,
                "size": [1] * 4,
                "status": ["ok"] * 4,
                "path_bytes": pa.array(raw, pa.binary()),
            }
        ),
        tmp_path / "part.parquet",
    )
    assert _current([str(tmp_path / "part.parquet")])[0].tolist() == [0, 1, 2, 3]
