"""dedup you can act on: tiers kept apart (identical bytes, near-identical, similar), a keeper by a rule, and a
plan of moves into quarantine that --apply carries out only while the files are as planned. Nothing deleted."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from PIL import Image

TORCH = ["--device", "cpu", "--dtype", "float32", "--backend", "torch", "-q", "-j", "0"]


@pytest.fixture
def library(tmp_path, photos):
    """Planted copies of two photos: a byte copy, a recompressed one, a resized one; and a third photo alone."""
    lib = tmp_path / "library"
    (lib / "originals").mkdir(parents=True)
    (lib / "phone").mkdir()
    a, b, c = sorted(photos.glob("*.JPEG"))[:3]
    shutil.copy(a, lib / "originals" / "a.jpg")
    shutil.copy(a, lib / "phone" / "a copy.jpg")  # the same bytes
    Image.open(b).save(lib / "originals" / "b.jpg", quality=95)
    Image.open(b).save(lib / "phone" / "b recompressed.jpg", quality=60)
    im = Image.open(b)
    im.resize((im.width // 2, im.height // 2)).save(lib / "phone" / "b small.jpg", quality=90)
    shutil.copy(c, lib / "phone" / "c.jpg")
    return lib


def files(folder) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}


def test_exact_copies_planned_then_moved_never_deleted(cli, fixed_ckpt, library, tmp_path):
    index = tmp_path / "index.parquet"
    assert cli("embed", library, "-o", index, "-m", fixed_ckpt, *TORCH).exit_code == 0
    plan = tmp_path / "plan.jsonl"
    keep = f"path-prefix:{library / 'phone'}"
    r = cli("dedup", index, "--exact", "--keep", keep, "--plan", plan, "--json")
    assert r.exit_code == 0 and "1 moves planned" in r.stderr
    groups = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(g["group"], g["representative"], os.path.basename(g["path"])) for g in groups] == [
        (1, True, "a copy.jpg"),
        (1, False, "a.jpg"),
    ]
    (line,) = [json.loads(x) for x in plan.read_text().splitlines()]
    assert line["move"] == str(library / "originals" / "a.jpg") and line["keep"] == str(
        library / "phone" / "a copy.jpg"
    )
    assert line["to"] == str(tmp_path / "library.siglip-quarantine" / "originals" / "a.jpg")
    before = files(library)
    assert cli("dedup", "--apply", plan).exit_code == 0
    assert files(library) == before - {os.path.join("originals", "a.jpg")}
    assert files(tmp_path / "library.siglip-quarantine") == {os.path.join("originals", "a.jpg")}


def test_a_plan_whose_files_changed_is_refused_whole(cli, fixed_ckpt, library, tmp_path):
    index = tmp_path / "index.parquet"
    assert cli("embed", library, "-o", index, "-m", fixed_ckpt, *TORCH).exit_code == 0
    plan = tmp_path / "plan.jsonl"
    assert cli("dedup", index, "--plan", plan, "--json", "--quarantine", tmp_path / "q").exit_code == 0
    moves = [json.loads(x) for x in plan.read_text().splitlines()]
    # near-identical: the byte copy, and b's recompressed and resized copies; the largest of each group is kept
    assert sorted(os.path.basename(m["keep"]) for m in moves) == ["a copy.jpg", "b.jpg", "b.jpg"] or sorted(
        os.path.basename(m["keep"]) for m in moves
    ) == ["a.jpg", "b.jpg", "b.jpg"]
    assert {os.path.basename(m["move"]) for m in moves if os.path.basename(m["keep"]) == "b.jpg"} == {
        "b recompressed.jpg",
        "b small.jpg",
    }
    os.utime(moves[-1]["move"], ns=(1, 1))  # touched since the plan
    before = files(library)
    r = cli("dedup", "--apply", plan)
    assert r.exit_code == 1 and "changed since the plan" in r.stderr and files(library) == before
    assert not (tmp_path / "q").exists()


def shot(source, path, when: str, **save):
    """A copy of a photo with an EXIF capture time (DateTimeOriginal and its sub-seconds)."""
    from PIL import Image

    im = Image.open(source).convert("RGB")
    exif = Image.Exif()
    stamp, _, subsec = when.partition(".")
    exif.get_ifd(0x8769)[36867] = stamp
    if subsec:
        exif.get_ifd(0x8769)[37521] = subsec
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, exif=exif, **save)


def test_bursts_are_shots_of_one_folder_close_in_time_that_look_alike(cli, fixed_ckpt, photos, tmp_path):
    b, c = sorted(photos.glob("*.JPEG"))[1:3]
    lib = tmp_path / "library"
    shot(b, lib / "day" / "1.jpg", "2024:05:01 10:00:00", quality=95)
    shot(b, lib / "day" / "2.jpg", "2024:05:01 10:00:01", quality=80)
    shot(c, lib / "day" / "3.jpg", "2024:05:01 10:00:01.5", quality=95)  # in the window, another scene
    shot(b, lib / "day" / "4.jpg", "2024:05:01 10:00:02.25", quality=70)  # 1.25 s after 2: in through it
    shot(b, lib / "day" / "5.jpg", "2024:05:01 10:05:00", quality=95)  # the same scene, minutes later
    shot(b, lib / "other" / "6.jpg", "2024:05:01 10:00:01", quality=95)  # the same moment, another folder
    Image.open(b).save(lib / "day" / "7.jpg", quality=90)  # no capture time
    index = tmp_path / "index.parquet"
    assert cli("embed", lib, "-o", index, "-m", fixed_ckpt, *TORCH).exit_code == 0
    plan = tmp_path / "plan.jsonl"
    r = cli("dedup", index, "--bursts", "1.5", "--threshold", "0.99", "--json", "--plan", plan)
    assert r.exit_code == 0, r.stderr
    found = [json.loads(line) for line in r.stdout.splitlines()]
    assert {os.path.relpath(g["path"], lib) for g in found} == {"day/1.jpg", "day/2.jpg", "day/4.jpg"}
    assert {g["group"] for g in found} == {1} and sum(g["representative"] for g in found) == 1
    assert {json.loads(x)["tier"] for x in plan.read_text().splitlines()} == {"bursts"}
    both = cli("dedup", index, "--bursts", "2", "--similar")
    assert both.exit_code == 2 and "one tier at a time" in both.stderr
