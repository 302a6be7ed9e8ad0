"""The model's input over the network: a batch of decoded images as `siglip serve`'s POST /v1/pixels takes it.

A body is one line of JSON (the header) and the images' bytes after it. Fixed-resolution images go whole
(H x W x 3); NaFlex images as their real patches only (rows x columns of p*p*3), never the padding. `raw` sends
the uint8 values as they are; `webp` each image as a lossless WebP (NaFlex patches laid out as the picture
they cut), about 45% of raw for 1.5-5 ms of encoding per image: worth it on a link slower than the decoder.
"""

from __future__ import annotations

import io
import json

import numpy as np

from .decode import ImageSpec

CONTENT_TYPE = "application/x-siglip-pixels"
ENCODINGS = ("raw", "webp")


class WireError(ValueError):
    """A body that does not fit the server's preprocessing or its limits: the message, and the item at fault."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def describe(spec: ImageSpec) -> dict:
    """What a client needs of the server's preprocessing to decode images as the server would."""
    if spec.naflex:
        return {
            "naflex": True,
            "patch_size": spec.patch_size,
            "max_patches": spec.max_patches,
            "resample": int(spec.resample),
        }
    return {"naflex": False, "height": spec.height, "width": spec.width, "resample": int(spec.resample)}


def spec_of(described: dict) -> ImageSpec:
    """The ImageSpec a server described (see describe)."""
    from PIL import Image

    given = {k: v for k, v in described.items() if k in ImageSpec.__dataclass_fields__}
    return ImageSpec(**{**given, "resample": Image.Resampling(int(given.get("resample", 2)))})


def _picture(patches: np.ndarray, grid: tuple[int, int], p: int) -> np.ndarray:
    h, w = grid
    return patches.reshape(h, w, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * p, w * p, 3)


def _patches(picture: np.ndarray, grid: tuple[int, int], p: int) -> np.ndarray:
    h, w = grid
    return picture.reshape(h, p, w, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, p * p * 3)


def pack(spec: ImageSpec, images: list[np.ndarray], grids: list[tuple[int, int]], encoding: str, expect: dict) -> bytes:
    """A body for /v1/pixels: `images` as the loader gives them (NaFlex: padded to max_patches; only the first
    rows x columns patches are sent), `expect` the signature the client's index needs (the server refuses
    another)."""
    from PIL import Image

    parts = []
    for pixels, grid in zip(images, grids):
        if spec.naflex:
            pixels = pixels[: grid[0] * grid[1]]
        if encoding == "raw":
            parts.append(np.ascontiguousarray(pixels).tobytes())
            continue
        picture = _picture(pixels, grid, spec.patch_size) if spec.naflex else pixels
        out = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(picture)).save(out, "WEBP", lossless=True, quality=0, method=0, exact=True)
        parts.append(out.getvalue())
    header = {
        "encoding": encoding,
        "layout": "naflex" if spec.naflex else "fixed",
        "shape": [spec.patch_size] if spec.naflex else [spec.height, spec.width],
        "grids": [list(g) for g in grids] if spec.naflex else None,
        "sizes": [len(b) for b in parts],
        "expect": expect,
    }
    return json.dumps(header).encode() + b"\n" + b"".join(parts)


def unpack(body: bytes, spec: ImageSpec, max_items: int) -> tuple[dict, list[tuple[np.ndarray, tuple[int, int]]]]:
    """The header and the (pixels, grid) of each image of a /v1/pixels body, checked against the server's
    preprocessing; a WireError names what does not fit."""
    end = body.find(b"\n")
    try:
        header = json.loads(body[:end]) if end > 0 else None
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("sizes"), list):
        raise WireError("the body must start with a JSON header line (see siglip_cli/wire.py)")
    encoding, sizes = header.get("encoding"), header["sizes"]
    if encoding not in ENCODINGS:
        raise WireError(f"encoding must be one of {', '.join(ENCODINGS)}")
    layout = "naflex" if spec.naflex else "fixed"
    shape = [spec.patch_size] if spec.naflex else [spec.height, spec.width]
    if header.get("layout") != layout or header.get("shape") != shape:
        raise WireError(
            f"this server takes {layout} images of {'x'.join(map(str, shape))}; the body holds {header.get('layout')} "
            f"{header.get('shape')} (decode with the server's preprocessing: GET /v1/model)"
        )
    if not sizes or len(sizes) > max_items:
        raise WireError(f"a body holds 1 to {max_items} images (--max-items); this one {len(sizes)}")
    grids = header.get("grids") if spec.naflex else [(0, 0)] * len(sizes)
    if not isinstance(grids, list) or len(grids) != len(sizes):
        raise WireError("grids: one [rows, columns] per image")
    if any(not isinstance(n, int) or n < 0 for n in sizes) or end + 1 + sum(sizes) != len(body):
        raise WireError("sizes do not add up to the body's length")
    out, at = [], end + 1
    for i, (n, grid) in enumerate(zip(sizes, grids)):
        data = memoryview(body)[at : at + n]
        at += n
        out.append((_image(data, encoding, spec, grid, i), tuple(grid)))
    return header, out


def _image(data, encoding: str, spec: ImageSpec, grid, i: int) -> np.ndarray:
    if spec.naflex:
        ok = (
            isinstance(grid, list)
            and len(grid) == 2
            and all(isinstance(g, int) and g > 0 for g in grid)
            and grid[0] * grid[1] <= spec.max_patches
        )
        if not ok:
            raise WireError(f"item {i}: a grid of rows x columns, at most {spec.max_patches} patches", i)
        p = spec.patch_size
        shape = (grid[0] * grid[1], p * p * 3)
    else:
        shape = (spec.height, spec.width, 3)
    if encoding == "raw":
        if len(data) != int(np.prod(shape)):
            raise WireError(f"item {i}: {len(data)} bytes; its shape {shape} needs {int(np.prod(shape))}", i)
        return np.frombuffer(data, np.uint8).reshape(shape)
    from PIL import Image

    picture_shape = (grid[0] * spec.patch_size, grid[1] * spec.patch_size, 3) if spec.naflex else shape
    try:
        with Image.open(io.BytesIO(data), formats=["WEBP"]) as im:
            if im.mode != "RGB" or (im.height, im.width, 3) != picture_shape:
                raise WireError(f"item {i}: a WebP of {im.width}x{im.height} {im.mode}; need {picture_shape}", i)
            picture = np.asarray(im)
    except (OSError, ValueError) as e:
        if isinstance(e, WireError):
            raise
        raise WireError(f"item {i}: not a WebP image", i) from None
    return _patches(picture, grid, spec.patch_size) if spec.naflex else picture
