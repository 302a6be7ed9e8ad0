"""Camera RAW files, with the `raw` extra (rawpy, which bundles LibRaw): the preview the camera rendered, or,
where a file has none large enough, its raw data developed at half size. Imports no torch."""

from __future__ import annotations

import importlib.util
import io

from PIL import Image, ImageOps

EXTENSIONS = (".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf", ".pef", ".srw")
SIBLINGS = (".jpg", ".jpeg", ".heic", ".heif")  # a camera's own JPEG (or HEIF) of the same shot
NEEDS_RAW = "RAW files need the raw extra: pip install 'siglip-cli[raw]'"
# LibRaw's `flip` (the camera's orientation) as PIL's transposition of an unrotated preview
_FLIP = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}


def available() -> bool:
    return importlib.util.find_spec("rawpy") is not None


def is_raw(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS)


def size(path: str) -> tuple[int, int]:
    """The developed image's (width, height), as the camera held it (its orientation applied): LibRaw reads the
    file's header and metadata, not its raw data."""
    import rawpy

    with rawpy.imread(path) as raw:
        s = raw.sizes
        return (s.height, s.width) if s.flip in (5, 6) else (s.width, s.height)


def image(data: bytes, least: tuple[int, int]) -> Image.Image:
    """The photo of a RAW file's bytes, upright: its embedded JPEG (or bitmap) preview where that is at least
    `least` (width, height), else the raw data developed at half size with the camera's white balance."""
    import rawpy

    with rawpy.imread(io.BytesIO(data)) as raw:
        preview = _preview(raw)
        if preview is not None and preview.width >= least[0] and preview.height >= least[1]:
            return preview
        return Image.fromarray(raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8))


def _preview(raw) -> Image.Image | None:
    import rawpy

    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        im = Image.open(io.BytesIO(thumb.data))
        if im.getexif().get(0x0112, 1) != 1:  # a preview that carries its own orientation
            return ImageOps.exif_transpose(im)
        im.load()
    else:
        im = Image.fromarray(thumb.data)
    turn = _FLIP.get(raw.sizes.flip)
    return im.transpose(turn) if turn is not None else im
