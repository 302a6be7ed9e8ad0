"""The sidecar's page reader (index/pages.py) gives exactly pyarrow's vectors and null rows, for every way the
column can be written that it claims to read, and declines the rest."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from siglip_cli.index import pages

pytestmark = pytest.mark.deps  # also run on the lowest declared versions (.ci/lowest.txt)


def write(path, dtype, nulls, dim=24, rows=3000, **options):
    rng = np.random.default_rng(len(nulls))
    x = rng.standard_normal((rows, dim)).astype(dtype)
    mask = np.zeros(rows, bool)
    mask[list(nulls)] = True
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim, mask=pa.array(mask))
    table = pa.table({"path": [f"p{i}" for i in range(rows)], "embedding": vectors})
    pq.write_table(table, path, **options)
    return x, mask


NULLS = {
    "none": [],
    "first and last": [0, 2999],
    "runs": list(range(5, 40)) + [41, 43, 44] + list(range(1000, 1300)),
    "scattered": list(range(0, 3000, 7)),
}
WAYS = {
    "as siglip writes": dict(use_dictionary=["path"]),
    "small pages and groups": dict(use_dictionary=False, data_page_size=4096, row_group_size=700),
    "no compression": dict(use_dictionary=False, compression="none"),
    "zstd": dict(use_dictionary=False, compression="zstd"),
    "gzip": dict(use_dictionary=False, compression="gzip"),
    "data pages v2": dict(use_dictionary=False, data_page_version="2.0", data_page_size=8192),
}


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("nulls", list(NULLS))
@pytest.mark.parametrize("way", list(WAYS))
def test_pages_equal_pyarrow(tmp_path, dtype, nulls, way):
    path = str(tmp_path / "i.parquet")
    x, mask = write(path, dtype, NULLS[nulls], **WAYS[way])
    meta = pq.ParquetFile(path).metadata
    start = 0
    for g in range(meta.num_row_groups):
        present, got = pages.read_vectors(path, meta, g, "embedding", x.shape[1], np.dtype(dtype))
        n = meta.row_group(g).num_rows
        np.testing.assert_array_equal(present, ~mask[start : start + n])
        np.testing.assert_array_equal(got.view(np.uint8), x[start : start + n][present].view(np.uint8))
        start += n
    assert start == len(x)


def test_pages_decline_what_they_do_not_read(tmp_path):
    cases = {
        "dictionary": dict(use_dictionary=True),
        "byte stream split": dict(use_dictionary=False, use_byte_stream_split=["embedding.list.element"]),
    }
    for name, options in cases.items():
        path = str(tmp_path / f"{name}.parquet")
        write(path, np.float16, [3], **options)
        with pytest.raises(pages.Unsupported):
            pages.read_vectors(path, pq.ParquetFile(path).metadata, 0, "embedding", 24, np.dtype(np.float16))
    path = str(tmp_path / "f32.parquet")
    write(path, np.float32, [])
    with pytest.raises(pages.Unsupported):  # not the dtype the caller expects
        pages.read_vectors(path, pq.ParquetFile(path).metadata, 0, "embedding", 24, np.dtype(np.float16))
    # a null inside a vector
    arr = pa.FixedSizeListArray.from_arrays(pa.array([1.0, None, 3.0, 4.0], pa.float32()), 2)
    pq.write_table(pa.table({"embedding": arr}), tmp_path / "n.parquet", use_dictionary=False)
    with pytest.raises(pages.Unsupported):
        pages.read_vectors(
            str(tmp_path / "n.parquet"),
            pq.ParquetFile(tmp_path / "n.parquet").metadata,
            0,
            "embedding",
            2,
            np.dtype(np.float32),
        )
    # a plain list whose rows hold 7 and 9 values: read as vectors of 8 it would shift them
    ragged = pa.array([[1.0] * 7, [2.0] * 9], pa.list_(pa.float32()))
    pq.write_table(pa.table({"embedding": ragged}), tmp_path / "r.parquet", use_dictionary=False)
    meta = pq.ParquetFile(tmp_path / "r.parquet").metadata
    with pytest.raises(pages.Unsupported):
        pages.read_vectors(str(tmp_path / "r.parquet"), meta, 0, "embedding", 8, np.dtype(np.float32))


def test_damaged_pages_are_declined_not_crashed_on(tmp_path):
    """Bytes overwritten inside the vector column's pages: Unsupported (the caller falls back to pyarrow, which
    reports the damage), never an IndexError or a wrong vector."""
    path = str(tmp_path / "i.parquet")
    write(path, np.float16, [5], use_dictionary=False, compression="none", data_page_size=1024)
    meta = pq.ParquetFile(path).metadata
    chunk = meta.row_group(0).column(1)
    good = open(path, "rb").read()
    rng = np.random.default_rng(0)
    for _ in range(40):
        bad = bytearray(good)
        at = chunk.data_page_offset + int(rng.integers(0, 64))  # the first page's header and levels
        bad[at : at + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        open(path, "wb").write(bad)
        try:
            present, got = pages.read_vectors(path, meta, 0, "embedding", 24, np.dtype(np.float16))
        except pages.Unsupported:
            continue
        # read anyway: then it is what pyarrow reads from the same bytes, where pyarrow can read them
        try:
            column = pq.read_table(path, columns=["embedding"]).column(0).combine_chunks()
        except (OSError, pa.ArrowException):
            continue
        np.testing.assert_array_equal(present, column.is_valid().to_numpy(zero_copy_only=False))
        theirs = np.stack([np.array(v, np.float16) for v in column.to_pylist() if v is not None])
        np.testing.assert_array_equal(got.view(np.uint16), theirs.view(np.uint16))
