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
