"""One file -> RGB pixels ready for the model, or an error record. Never raises, never returns None.

Runs in worker processes: imports only PIL and numpy so that workers start fast.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import stat
import threading
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from . import raw
from .sources import FileRecord

# We enforce our own, clearer pixel limit (ImageSpec.max_pixels) before decoding.
Image.MAX_IMAGE_PIXELS = None

try:  # HEIC/HEIF from phones, with the optional `heif` extra (Pillow reads AVIF itself)
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF = True
except ImportError:
    HEIF = False

NEEDS_HEIF = "HEIC/HEIF needs the heif extra: pip install 'siglip-cli[heif]'"
UNREADABLE = "permission denied: make the file readable by this user"
RAISE_LIMIT = "raise --max-pixels to read it"
READ_ERROR = "cannot read the file: "
VANISHED = "file disappeared before it could be read"
STALLED = (
    "reading or decoding took over {:g}s (a stalled disk or network mount?); raise --timeout if the file is just huge"
)
OUT_OF_MEMORY = "out of memory while decoding; lower --max-pixels or --workers, and rerun with --retry-errors"
# Errors of a file's own bytes: the same bytes fail the same way, so a file that has not changed is not tried again.
# (Out of memory is of the run's settings; --retry-errors is the way to try again.)
LASTING = (
    "empty file",
    "not a regular file",
    "not an image",
    "corrupt or truncated image",
    "the decoder crashed",
    "cannot decode",
    "cannot record",
    "the model gave",
    OUT_OF_MEMORY.split(";")[0],
)

# Smaller photos decode fast at full size, so they always take the exact path.
DRAFT_MIN_PIXELS = 4_000_000
HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


@dataclass(frozen=True)
class ImageSpec:
    """How the checkpoint wants its pixels: a fixed size, or NaFlex patches. Read from its processor config."""

    naflex: bool = False
    height: int = 224  # fixed resolution
    width: int = 224
    resample: int = Image.Resampling.BILINEAR
    patch_size: int = 16  # NaFlex
    max_patches: int = 256
    max_pixels: int = 100_000_000
    exact: bool = False  # True: always decode at full size, exactly as the reference processor sees the image


@dataclass
class Decoded:
    """A decoded image (uint8 pixels: HxWx3, or patches x (p*p*3) for NaFlex) or an error message."""

    record: FileRecord
    sha256: str | None = None
    width: int = -1
    height: int = -1
    pixels: np.ndarray | None = None
    grid: tuple[int, int] = (0, 0)  # NaFlex patch rows and columns
    error: str | None = None


def naflex_size(height: int, width: int, patch_size: int, max_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """Target (height, width), multiples of patch_size, with at most max_patches patches.

    The same binary search as transformers' Siglip2 image processor, so the sizes agree exactly.
    """

    def scaled(scale: float, size: int) -> int:
        return max(patch_size, int(math.ceil(size * scale / patch_size) * patch_size))

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (scaled(mid, height) / patch_size) * (scaled(mid, width) / patch_size) <= max_patches:
            lo = mid
        else:
            hi = mid
    return scaled(lo, height), scaled(lo, width)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency is composited onto white, as the Hugging Face processor does.

    16-bit and float grayscale are scaled to 8 bits (Pillow's own conversion clips them to white).
    """
    if image.mode in HIGH_BIT_DEPTH:
        a = np.asarray(image, dtype=np.float32)
        peak = float(a.max()) if a.size else 0.0
        scale = (
            255.0 / 65535.0
            if image.mode.startswith("I;16") or peak > 255
            else 255.0
            if peak <= 1 and image.mode == "F"
            else 1.0
        )
        image = Image.fromarray(np.clip(a * scale + 0.5, 0, 255).astype(np.uint8), "L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _patchify(pixels: np.ndarray, p: int) -> np.ndarray:
    """HxWx3 -> (rows*cols) x (p*p*3), patches in row-major order, each patch (y, x, channel)."""
    h, w, c = pixels.shape
    grid = pixels.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(grid.reshape((h // p) * (w // p), p * p * c))


def most_bytes(width: int, height: int) -> int:
    """The largest file an image of this size is taken from: 8 bytes a pixel (16-bit RGBA, uncompressed) and
    64 MiB of metadata, previews and appended video (motion photos). Past it, the file is refused unread."""
    return width * height * 8 + (64 << 20)


class Refused(Exception):
    """A file refused from its header and size alone (its message is the error row's)."""

    def __init__(self, message: str, width: int, height: int):
        super().__init__(message)
        self.width, self.height = width, height


def refusal(width: int, height: int, size: int, max_pixels: int) -> str | None:
    """Why an image of this size, in a file of `size` bytes, is refused unread: over `max_pixels`, or a file
    larger than such an image can be (most_bytes); None when it is not."""
    if width * height > max_pixels:
        return f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}; {RAISE_LIMIT}"
    if size > most_bytes(width, height):
        return (
            f"not an image, or a format Pillow cannot read: the file is {size:,} bytes, more than a "
            f"{width}x{height} image can take"
        )
    return None


def open_image(f, size: int, max_pixels: int) -> Image.Image:
    """The image of an open file, its header read and nothing more; Refused (see refusal) before anything more
    is read: a sparse or padded file is never read whole."""
    im = Image.open(f)
    if (why := refusal(*im.size, size, max_pixels)) is not None:
        raise Refused(why, *im.size)
    return im


def _sha256(f) -> str:
    """The file's content hash, read in chunks (for --rehash on later runs)."""
    f.seek(0)
    digest = hashlib.sha256()
    while chunk := f.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _load(record: FileRecord, spec: ImageSpec) -> Decoded:
    st = os.stat(record.path)
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block the read forever
        return Decoded(record, error="not a regular file")
    if st.st_size == 0:
        return Decoded(record, error="empty file (0 bytes)")
    if raw.is_raw(record.path):
        return _raw(record, spec, st.st_size)
    with open(record.path, "rb") as f:
        try:
            open_image(f, st.st_size, spec.max_pixels)  # the header alone, before anything is read whole
        except Refused as e:
            over = str(e).endswith(RAISE_LIMIT)  # the bytes are the image's: hashed, so --rehash sees a change
            return Decoded(record, _sha256(f) if over else None, e.width, e.height, error=str(e))
        f.seek(0)
        data = f.read()
    return _pixels(record, data, spec)


def _raw(record: FileRecord, spec: ImageSpec, size: int) -> Decoded:
    """A camera RAW file through raw.py: its size checked from its header, then read once, hashed, developed."""
    if not raw.available():
        return Decoded(record, error=raw.NEEDS_RAW)
    import rawpy

    try:
        width, height = raw.size(record.path)
    except (rawpy.LibRawError, ValueError) as e:
        return Decoded(record, error=f"not an image, or a RAW format LibRaw cannot read: {e}")
    if (why := refusal(width, height, size, spec.max_pixels)) is not None:
        return Decoded(record, None, width, height, error=why)
    data = _read(record.path)
    sha = hashlib.sha256(data).hexdigest()
    th, tw = _target(height, width, spec)
    try:
        rgb = to_rgb(raw.image(data, (tw, th)))
    except rawpy.LibRawError as e:
        return Decoded(record, sha, width, height, error=f"corrupt or truncated image: LibRaw: {e}")
    return _fit(record, sha, width, height, rgb, th, tw, spec)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _target(height: int, width: int, spec: ImageSpec) -> tuple[int, int]:
    """The (height, width) the model takes an image of this size at."""
    if spec.naflex:
        return naflex_size(height, width, spec.patch_size, spec.max_patches)
    return spec.height, spec.width


def _fit(record, sha, width, height, rgb: Image.Image, th: int, tw: int, spec: ImageSpec) -> Decoded:
    """An upright RGB image resized to the model's input: pixels, or NaFlex patches."""
    pixels = np.asarray(rgb.resize((tw, th), resample=spec.resample))
    if spec.naflex:
        p = spec.patch_size
        return Decoded(record, sha, width, height, _patchify(pixels, p), grid=(th // p, tw // p))
    return Decoded(record, sha, width, height, pixels)


def _pixels(record: FileRecord, data: bytes, spec: ImageSpec) -> Decoded:
    sha = hashlib.sha256(data).hexdigest()  # for --rehash on later runs
    try:
        im = open_image(io.BytesIO(data), len(data), spec.max_pixels)
    except Refused as e:
        return Decoded(record, sha, e.width, e.height, error=str(e))
    with im:
        width, height = im.size
        if im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # turned by a quarter
            width, height = height, width
        th, tw = _target(height, width, spec)
        if not spec.exact and width * height >= DRAFT_MIN_PIXELS:
            # JPEG only: decode straight to 1/2, 1/4 or 1/8 scale in the DCT, never below the target size.
            # Within 0.3/255 mean absolute difference of the full decode, and 2-3x faster on camera photos.
            im.draft(None, (max(th, tw), max(th, tw)))
        im.load()
        rgb = to_rgb(ImageOps.exif_transpose(im))
    return _fit(record, sha, width, height, rgb, th, tw, spec)


def may_work_now(error: str, path: str, pixels: int | None, max_pixels: int, timeout: float) -> bool:
    """Whether an unchanged file that failed with `error` in an earlier run may be read in this one, judged
    without decoding it: a cause that stays must not cost a nightly run the model's loading.

    Never when the error was of its bytes (LASTING). Otherwise when its cause is gone: the file opens now (a
    chmod), reads now (after EIO or a stale handle), the heif extra is installed, --max-pixels admits it, or
    --timeout is longer than the one it took over. A message this version does not write (an older version's) is
    tried once, and is then written as this version says it.
    """
    if error.startswith((READ_ERROR, "corrupt or truncated image: [Errno")):  # (older versions called it corrupt)
        return _reads(path, timeout, whole=True)
    if error.startswith(LASTING):
        return False
    if error in (UNREADABLE, VANISHED):  # not os.access: root on an NFS share with root_squash is refused anyway
        return _reads(path, timeout)
    if error == NEEDS_HEIF:
        return HEIF
    if error == raw.NEEDS_RAW:
        return raw.available()
    if error.endswith(RAISE_LIMIT):
        return pixels is not None and pixels <= max_pixels  # (a size past the column's range is past any limit)
    if stalled := re.match(re.escape(STALLED.split("{")[0]) + r"([0-9.e+-]+)s", error):
        return float(f"{timeout:g}") > float(stalled[1])  # as the message rounds it
    return True


def _reads(path: str, timeout: float, whole: bool = False) -> bool:
    """Whether the file's first MB (or all of it) reads now, within the run's --timeout: a read that hangs (a
    network mount) must not hang the run, which holds the output's lock."""
    done: list[bool] = []

    def read() -> None:
        try:
            with open(path, "rb") as f:
                while f.read(1 << 20) and whole:
                    pass
            done.append(True)
        except OSError:
            pass

    reader = threading.Thread(target=read, name="siglip-probe", daemon=True)
    reader.start()
    reader.join(timeout)
    return bool(done)


def decode(record: FileRecord, spec: ImageSpec, data: bytes | None = None) -> Decoded:
    """Read, orient, convert and resize one file (or the bytes given for it, as `siglip serve` receives them);
    any failure becomes an error with a readable message."""
    if record.error:
        return Decoded(record, error=record.error)
    try:
        return _load(record, spec) if data is None else _pixels(record, data, spec)
    except UnidentifiedImageError:
        if record.path.lower().endswith((".heic", ".heif")) and not HEIF:
            return Decoded(record, error=NEEDS_HEIF)
        return Decoded(record, error="not an image, or a format Pillow cannot read")
    except FileNotFoundError:
        return Decoded(record, error=VANISHED)
    except PermissionError:
        return Decoded(record, error=UNREADABLE)
    except OSError as e:
        if e.errno is not None:  # the disk or the network failed the read (EIO, a stale handle): not the bytes
            return Decoded(record, error=READ_ERROR + (e.strerror or str(e)))
        return Decoded(record, error=f"corrupt or truncated image: {e}")
    except (SyntaxError, ValueError) as e:
        return Decoded(record, error=f"corrupt or truncated image: {e}")
    except MemoryError:
        return Decoded(record, error=OUT_OF_MEMORY)
    except Exception as e:  # a decoder bug must cost one row, not the run
        return Decoded(record, error=f"cannot decode: {type(e).__name__}: {e}")


def decode_photos(records: list[FileRecord], spec: ImageSpec) -> np.ndarray | None:
    """The records' photos that decode, at the model's fixed input size, stacked (None for NaFlex or none): real
    inputs for calibrating int8 and for benchmarks."""
    if spec.naflex:
        return None
    pixels = [d.pixels for r in records if (d := decode(r, spec)).error is None]
    return np.stack(pixels) if pixels else None
