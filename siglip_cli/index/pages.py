"""An index's vector column read straight from its Parquet pages, for the sidecar's build.

Arrow rebuilds a list column from its repetition and definition levels one value at a time: for a row group of
50,000 vectors of 1152 that is 0.36-0.9 s on a slow CPU, against milliseconds for the same values stored flat,
and it was most of a first search over a large index. The vectors as siglip writes them (PLAIN values, levels
in RLE, no dictionary) need none of that: each data page holds its levels and then its present values, packed.
This reads the pages, decompresses them with Arrow's codecs, decodes the definition levels (a few long runs)
to find the null rows (error rows have no vector), and hands back the values as they lie. Anything else (a
dictionary, another encoding or codec, a nested null) raises Unsupported, and the caller uses pyarrow.
"""

from __future__ import annotations

import os

import numpy as np

# Parquet's PageHeader (Thrift): type, sizes, and the data page headers of version 1 and 2
DATA_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2 = 0, 2, 3
PLAIN, RLE = 0, 3
CODECS = {"SNAPPY": "snappy", "GZIP": "gzip", "ZSTD": "zstd", "BROTLI": "brotli", "LZ4_RAW": "lz4_raw"}
PHYSICAL = {np.dtype(np.float16): ("FIXED_LEN_BYTE_ARRAY", 2), np.dtype(np.float32): ("FLOAT", 4)}


class Unsupported(Exception):
    """A column this reader does not handle; read it with pyarrow."""


def _varint(data, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = data[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += 7


def _value(data, pos: int, kind: int):
    """One value of Thrift's compact protocol of this type: (value, next position)."""
    if kind in (1, 2):  # a boolean field: the type is the value
        return kind == 1, pos
    if kind == 3:
        return data[pos], pos + 1
    if kind in (4, 5, 6):  # zigzag varints
        n, pos = _varint(data, pos)
        return (n >> 1) ^ -(n & 1), pos
    if kind == 7:
        return bytes(data[pos : pos + 8]), pos + 8
    if kind == 8:
        n, pos = _varint(data, pos)
        return bytes(data[pos : pos + n]), pos + n
    if kind in (9, 10):  # list, set
        head = data[pos]
        pos += 1
        n, inner = head >> 4, head & 0x0F
        if n == 15:
            n, pos = _varint(data, pos)
        out = []
        for _ in range(n):
            if inner in (1, 2):  # booleans in a list take a byte each
                item, pos = data[pos] == 1, pos + 1
            else:
                item, pos = _value(data, pos, inner)
            out.append(item)
        return out, pos
    if kind == 12:
        return _struct(data, pos)
    raise Unsupported(f"Thrift type {kind} in a page header")


def _struct(data, pos: int) -> tuple[dict, int]:
    """A Thrift compact struct: {field id: value}, and the position after it."""
    out, last = {}, 0
    while True:
        head = data[pos]
        pos += 1
        if head == 0:
            return out, pos
        delta, kind = head >> 4, head & 0x0F
        if delta:
            last += delta
        else:
            last, pos = _value(data, pos, 4)
        out[last], pos = _value(data, pos, kind)


def _levels(data, width: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n levels of Parquet's RLE / bit-packed hybrid encoding, as runs: (level, count) arrays. A column of
    vectors has a few long runs per page; bit-packed groups become runs of one."""
    levels, counts, got, pos, size = [], [], 0, 0, (width + 7) // 8
    while got < n:
        if pos >= len(data):
            raise Unsupported("levels shorter than the page says")
        head, pos = _varint(data, pos)
        if head & 1:  # bit-packed, groups of 8
            count = min((head >> 1) * 8, n - got)
            bits = np.unpackbits(np.frombuffer(data, np.uint8, (head >> 1) * width, pos), bitorder="little")
            part = (bits.reshape(-1, width).astype(np.uint8) << np.arange(width, dtype=np.uint8)).sum(1, dtype=np.uint8)
            levels.append(part[:count])
            counts.append(np.ones(count, np.int64))
            pos += (head >> 1) * width
        else:
            count = min(head >> 1, n - got)
            levels.append(np.array([int.from_bytes(bytes(data[pos : pos + size]), "little")], np.uint8))
            counts.append(np.array([count], np.int64))
            pos += size
        got += count
    return np.concatenate(levels), np.concatenate(counts)


def leaf(schema, name: str):
    """The Parquet leaf column of a list column `name` (its index and description)."""
    for i in range(len(schema)):
        c = schema.column(i)
        if c.path.split(".")[0] == name:
            return i, c
    raise Unsupported(f"no column {name}")


def _fixed(metadata, name: str, dim: int):
    """The column's Arrow field, where it is a fixed-size list of dim (a plain list's rows may hold any number of
    values: only Arrow's own reader may rebuild those)."""
    import pyarrow as pa

    field = metadata.schema.to_arrow_schema().field(name)
    if not pa.types.is_fixed_size_list(field.type) or field.type.list_size != dim:
        raise Unsupported(f"{name} is not a fixed-size list of {dim}")
    return field


def read_vectors(path: str, metadata, group: int, name: str, dim: int, dtype: np.dtype):
    """(present, vectors) of one row group's fixed-size list column: which rows have a vector (bool, one per
    row), and those vectors (n present, dim) in the stored dtype, read from the pages; or Unsupported (a page
    this reader does not expect, damaged ones too)."""
    try:
        return _read_vectors(path, metadata, group, name, dim, dtype)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as e:
        raise Unsupported(f"a page not as expected ({type(e).__name__}: {e})") from None


def _read_vectors(path: str, metadata, group: int, name: str, dim: int, dtype: np.dtype):
    import pyarrow as pa

    index, column = leaf(metadata.schema, name)
    chunk, rows = metadata.row_group(group).column(index), metadata.row_group(group).num_rows
    want = PHYSICAL.get(np.dtype(dtype))
    if want is None or (column.physical_type, column.length if want[0] == "FIXED_LEN_BYTE_ARRAY" else 4) != want:
        raise Unsupported("not float16 or float32 values")
    if chunk.has_dictionary_page or column.max_repetition_level != 1 or column.path.count(".") != 2:
        raise Unsupported("a dictionary, or not a plain list")
    codec = None if chunk.compression == "UNCOMPRESSED" else CODECS.get(chunk.compression)
    if chunk.compression != "UNCOMPRESSED" and codec is None:
        raise Unsupported(f"codec {chunk.compression}")
    codec = codec and pa.Codec(codec)
    top, width, item = column.max_definition_level, column.max_definition_level.bit_length(), want[1]
    nullable = _fixed(metadata, name, dim).nullable
    raw, fd = bytearray(chunk.total_compressed_size), os.open(path, os.O_RDONLY)
    try:
        view, got = memoryview(raw), 0
        while got < len(raw):
            more = os.preadv(fd, [view[got:]], chunk.data_page_offset + got)
            if not more:
                raise Unsupported("the file is shorter than its metadata says")
            got += more
    finally:
        os.close(fd)
    values = np.empty(rows * dim, dtype)
    out = memoryview(values).cast("B")
    levels, pos, filled = [], 0, 0
    while pos < len(raw):
        header, pos = _struct(raw, pos)
        kind, full, size = header.get(1), header.get(2), header.get(3)
        body, pos = memoryview(raw)[pos : pos + size], pos + size
        if kind == DATA_PAGE:
            page = header[5]
            if page.get(2) != PLAIN or page.get(3) != RLE or page.get(4) != RLE:
                raise Unsupported("not PLAIN values with RLE levels")
            data = memoryview(codec.decompress(body, full)).cast("B") if codec else body
            n, at = page[1], 0
            at += 4 + int.from_bytes(data[at : at + 4], "little")  # repetition levels: not needed
            length = int.from_bytes(data[at : at + 4], "little")
            defs, data = _levels(data[at + 4 : at + 4 + length], width, n), data[at + 4 + length :]
        elif kind == DATA_PAGE_V2:
            page = header[8]
            if page.get(4) != PLAIN:
                raise Unsupported("not PLAIN values")
            n, dl, rl = page[1], page[5], page[6]
            defs, data = _levels(body[rl : rl + dl], width, n), body[rl + dl :]
            if codec and page.get(7, True):
                data = memoryview(codec.decompress(data, full - rl - dl)).cast("B")
        elif kind == DICTIONARY_PAGE:
            raise Unsupported("a dictionary page")
        else:  # an index page: nothing of ours
            continue
        count = int(defs[1][defs[0] == top].sum())
        if count * item != len(data) or filled + len(data) > len(out):
            raise Unsupported("values and levels disagree")
        out[filled : filled + len(data)] = data
        filled += len(data)
        levels.append(defs)
    runs = np.concatenate([d[0] for d in levels]) if levels else np.zeros(0, np.uint8)
    counts = np.concatenate([d[1] for d in levels]) if levels else np.zeros(0, np.int64)
    starts, other = np.cumsum(counts) - counts, runs != top
    if (runs[other] != 0).any():
        raise Unsupported("an empty vector, or a null inside one")
    # rows without a vector (one level 0 each): their positions among the levels
    lengths = counts[other]
    nulls = np.repeat(starts[other] - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    before = nulls - np.arange(len(nulls))  # values before each
    if (before % dim).any() or filled != (rows - len(nulls)) * dim * item or (len(nulls) and not nullable):
        raise Unsupported("nulls inside a vector, or vectors of another length")
    present = np.ones(rows, bool)
    present[np.arange(len(nulls)) + before // dim] = False
    return present, values[: filled // item].reshape(-1, dim)
