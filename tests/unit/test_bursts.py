"""dedup --bursts: a photo's capture time from its EXIF header, and shots grouped by folder, time and look."""

from __future__ import annotations

import numpy as np
from PIL import Image

from siglip_cli.bursts import burst_groups, capture_time


def jpeg(path, original=None, subsec=None, changed=None):
    exif = Image.Exif()
    if original:
        exif.get_ifd(0x8769)[36867] = original
    if subsec:
        exif.get_ifd(0x8769)[37521] = subsec
    if changed:
        exif[306] = changed
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path, exif=exif)
    return str(path)


def test_the_capture_time_is_the_cameras_with_its_sub_seconds(tmp_path):
    a = capture_time(jpeg(tmp_path / "a.jpg", "2024:05:01 10:00:00", "25"))
    b = capture_time(jpeg(tmp_path / "b.jpg", "2024:05:01 10:00:01"))
    assert b - a == 0.75
    assert capture_time(jpeg(tmp_path / "c.jpg", changed="2024:05:01 10:00:03")) - a == 2.75  # DateTime, no better
    assert capture_time(jpeg(tmp_path / "d.jpg", "0000:00:00 00:00:00")) is None  # as cameras without a clock say
    assert capture_time(jpeg(tmp_path / "e.jpg")) is None
    assert capture_time(str(tmp_path / "gone.jpg")) is None


def test_shots_join_through_the_shots_between_them_within_one_folder(tmp_path):
    times = ["2024:05:01 10:00:00", "2024:05:01 10:00:01", "2024:05:01 10:00:02", "2024:05:01 10:00:09"]
    paths = [jpeg(tmp_path / "f" / f"{i}.jpg", t) for i, t in enumerate(times)]
    paths.append(jpeg(tmp_path / "g" / "4.jpg", times[0]))  # another folder
    same = np.ones((5, 4), np.float32)
    assert burst_groups(paths, same, 1.0, 0.9) == [[0, 1, 2]]  # 0 and 2 are 2 s apart: joined through 1
    apart = same.copy()
    apart[1] = [1, -1, 1, -1]  # 1 looks like none of them
    assert burst_groups(paths, apart, 1.0, 0.9) == []
    assert burst_groups(paths, apart, 2.0, 0.9) == [[0, 2]]
