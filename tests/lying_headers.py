"""A generated corpus of files whose headers lie: sizes, bit depths, channel counts and chunk lengths out of range.

For every format Pillow both writes and reads, a small image is saved with a distinctive size; each place its
width or height is stored (little or big endian, 8, 16, 24 or 32 bits, or as text) is then overwritten with
values a reader must not trust: 0, 1, the largest signed value, the largest unsigned value and that minus 126.
A few format-specific fields (bit depths, channel counts, chunk lengths) are patched the same way.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

from PIL import Image

WIDTH, HEIGHT = 197, 131  # distinctive, so that their places in a header can be found


def _values(bits: int) -> list[int]:
    top = (1 << bits) - 1
    return sorted({0, 1, (1 << (bits - 1)) - 1, top, top - 126})


def _formats() -> dict[str, str]:
    """{format: file extension} of the formats this Pillow can write and read back."""
    out = {}
    for ext, fmt in sorted(Image.registered_extensions().items()):
        if fmt in Image.SAVE and fmt in Image.OPEN and fmt not in out.values() and fmt not in ("PDF", "EPS", "PALM"):
            out[fmt] = ext
    return out


def _sample(fmt: str) -> bytes | None:
    im = Image.new("RGB", (WIDTH, HEIGHT), (120, 40, 200))
    for mode in ("RGB", "L", "1", "P"):
        buf = io.BytesIO()
        try:
            (im if mode == "RGB" else im.convert(mode)).save(buf, fmt)
        except Exception:
            continue
        return buf.getvalue()
    return None


def _size_fields(data: bytes, head: int = 96) -> list[tuple[int, int, str]]:
    """(offset, bits, struct endianness) of every place in the header that holds WIDTH or HEIGHT."""
    found = []
    for value in (WIDTH, HEIGHT):
        for bits, code in ((16, "H"), (32, "I")):
            for order in "<>":
                raw = struct.pack(order + code, value)
                start = 0
                while (i := data.find(raw, start, head)) >= 0:
                    found.append((i, bits, order + code))
                    start = i + 1
    return found


def _png_fix(data: bytes) -> bytes:
    """Recompute the IHDR CRC, so that a reader gets past it to the values it must not trust."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return data
    crc = struct.pack(">I", zlib.crc32(data[12:29]))
    return data[:29] + crc + data[33:]


def _specific(fmt: str, data: bytes) -> dict[str, bytes]:
    """Bit depths, channel counts and chunk lengths out of range, for the formats whose layout is known."""
    out: dict[str, bytes] = {}

    def put(name: str, offset: int, code: str, values) -> None:
        size = struct.calcsize(code)
        for v in values:
            patched = data[:offset] + struct.pack(code, v) + data[offset + size :]
            out[f"{name}-{v}"] = _png_fix(patched) if fmt == "PNG" else patched

    if fmt == "PNG":
        put("bitdepth", 24, ">B", (0, 3, 17, 255))
        put("colortype", 25, ">B", (1, 5, 255))
        put("ihdrlen", 8, ">I", _values(32))
        idat = data.find(b"IDAT")
        put("idatlen", idat - 4, ">I", _values(32))
    elif fmt in ("BMP", "DIB"):
        base = 14 if fmt == "BMP" else 0
        put("bitcount", base + 14, "<H", (0, 3, 33, 65535))
        put("planes", base + 12, "<H", (0, 2, 65535))
        put("headersize", base, "<I", _values(32))
        if fmt == "BMP":
            put("pixeloffset", 10, "<I", _values(32))
            put("filesize", 2, "<I", _values(32))
    elif fmt == "JPEG":
        sof = data.find(b"\xff\xc0")
        put("precision", sof + 4, ">B", (0, 1, 12, 255))
        put("components", sof + 9, ">B", (0, 2, 4, 255))
        put("sofsegment", sof + 2, ">H", _values(16))
        put("app0segment", 4, ">H", _values(16))
    elif fmt == "GIF":
        put("flags", 10, "<B", (0x87, 0xFF))
    elif fmt == "TGA":
        put("bits", 16, "<B", (0, 1, 33, 255))
        put("idlength", 0, "<B", (255,))
    elif fmt == "WEBP":
        put("riffsize", 4, "<I", _values(32))
        put("chunksize", 16, "<I", _values(32))
    elif fmt == "TIFF" and data[:2] == b"II":
        ifd = struct.unpack("<I", data[4:8])[0]
        for k in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
            entry = ifd + 2 + 12 * k
            tag = struct.unpack("<H", data[entry : entry + 2])[0]
            names = {258: "bitspersample", 277: "samplesperpixel", 279: "stripbytecounts", 273: "stripoffsets"}
            if tag in names:
                put(names[tag] + "-count", entry + 4, "<I", (0, 0xFFFFFFFF))
                put(
                    names[tag], entry + 8, "<I" if tag in (273, 279) else "<H", _values(32 if tag in (273, 279) else 16)
                )
    return out


def build(root: str) -> list[str]:
    """Write the corpus under root; returns the file names written."""
    os.makedirs(root, exist_ok=True)
    names = []

    def write(name: str, blob: bytes) -> None:
        with open(os.path.join(root, name), "wb") as f:
            f.write(blob)
        names.append(name)

    for fmt, ext in _formats().items():
        data = _sample(fmt)
        if data is None:
            continue
        tag = fmt.lower()
        for offset, bits, code in _size_fields(data):
            for v in _values(bits):
                patched = data[:offset] + struct.pack(code, v) + data[offset + bits // 8 :]
                write(f"{tag}-size{offset}-{bits}-{v}{ext}", _png_fix(patched) if fmt == "PNG" else patched)
        if fmt == "PPM":  # sizes and the maximum value are text
            body = data.split(b"\n", 3)[-1]
            for w, h, top in ((0, 1, 255), (4294967169, 1, 255), (2147483647, 2, 255), (1, 1, 0), (2, 2, 65536)):
                write(f"ppm-text-{w}x{h}-{top}{ext}", b"P6\n%d %d\n%d\n" % (w, h, top) + body)
        for name, blob in _specific(fmt, data).items():
            write(f"{tag}-{name}{ext}", blob)
        write(f"{tag}-header-only{ext}", data[: min(len(data) - 1, 64)])  # every length points past the end
    return names
