"""dedup's burst tier: shots of one folder taken within a few seconds of each other (the EXIF capture time) that
look alike. A photo without a capture time (or that cannot be read now) is in no burst."""

from __future__ import annotations

import datetime
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .heads import linked

EXIF_IFD = 0x8769
ORIGINAL, DIGITIZED, SUBSEC_ORIGINAL, CHANGED = 36867, 36868, 37521, 306


def capture_time(path: str) -> float | None:
    """Seconds (as the camera's clock reads them, with its sub-seconds) when the photo was taken, or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:  # the header only: nothing is decoded
            exif = im.getexif()
            sub = exif.get_ifd(EXIF_IFD)
            text = sub.get(ORIGINAL) or sub.get(DIGITIZED) or exif.get(CHANGED)
            subsec = sub.get(SUBSEC_ORIGINAL)
        when = datetime.datetime.strptime(str(text).strip().rstrip("\x00"), "%Y:%m:%d %H:%M:%S")
    except Exception:  # noqa: BLE001 - no file, no image, no EXIF, a date a camera wrote badly: no time
        return None
    seconds = when.replace(tzinfo=datetime.timezone.utc).timestamp()
    digits = str(subsec or "").strip().rstrip("\x00")
    return seconds + (float("0." + digits) if digits.isdigit() else 0.0)


def burst_groups(paths: list[str], matrix, window: float, threshold: float) -> list[list[int]]:
    """Groups (row numbers, two or more) of shots in one folder within `window` seconds of one another, directly
    or through the shots between them, whose embeddings' cosine reaches `threshold`."""
    with ThreadPoolExecutor(8) as pool:  # header reads: a network share's latency, not the CPU, bounds them
        times = list(pool.map(capture_time, paths))
    shots = sorted((os.path.dirname(p), t, i) for i, (p, t) in enumerate(zip(paths, times)) if t is not None)

    def unit(i: int) -> np.ndarray:
        u = np.asarray(matrix[i], np.float32)
        return u / np.linalg.norm(u)

    def alike():
        for a, (folder, t, i) in enumerate(shots):
            for other_folder, u, j in shots[a + 1 :]:
                if other_folder != folder or u - t > window:  # sorted: every later shot is past it too
                    break
                if float(np.dot(unit(i), unit(j))) >= threshold:
                    yield i, j

    return linked(alike())
