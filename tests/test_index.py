"""The index is never silently wrong: prune safety, path identity, exact weights, text outputs, moves, readers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from siglip_cli.index import read_index

from helpers import make_library, run_siglip


def paths(out) -> list[str]:
    return sorted(pq.read_table(out, columns=["path"]).column("path").to_pylist())


def by_path(table) -> dict:
    return {r["path"]: r for r in table.to_pylist()}


# -- 1. prune never empties an index because a share is not mounted ----------------------------------------
@pytest.mark.parametrize("layout", ["lib", "lib.parquet"])
def test_prune_refuses_a_missing_or_empty_root(cli, fixed_ckpt, tmp_path, layout):
    mnt = make_library(tmp_path / "mnt" / "photos", 10)
    out = tmp_path / layout
    assert cli("embed", mnt, "-o", out, "-m", fixed_ckpt, "-j", "0").exit_code == 0
    shutil.rmtree(mnt)
    mnt.mkdir()  # the share is not mounted: an empty mountpoint
    empty = cli("embed", mnt, "-o", out, "-m", fixed_ckpt, "--prune")
    assert empty.exit_code == 1
    assert f"not pruning: {mnt} holds no images" in empty.stderr and "--prune-anyway" in empty.stderr
    assert len(paths(out)) == 10
    mnt.rmdir()  # not even the mountpoint
    missing = cli("embed", mnt, "-o", out, "-m", fixed_ckpt, "--prune")
    assert missing.exit_code == 1 and f"{mnt}: no such file or folder" in missing.stderr
    assert "not pruning" in missing.stderr and "--prune-anyway" in missing.stderr
    beside = cli("embed", mnt, tmp_path, "-o", out, "-m", fixed_ckpt, "--prune")  # and with a path that is there
    assert beside.exit_code == 1 and f"not pruning: {mnt} is missing, but the index has 10 rows" in beside.stderr
    assert len(paths(out)) == 10
    mnt.mkdir()
    anyway = cli("embed", mnt, "-o", out, "-m", fixed_ckpt, "--prune", "--prune-anyway")
    assert anyway.exit_code == 0 and "10 pruned" in anyway.stderr
    if layout == "lib":
        assert not [n for n in os.listdir(out) if n.endswith(".parquet")]
    else:
        assert pq.read_table(out).num_rows == 0


def test_a_path_given_that_is_not_there_gets_no_row_and_fails_the_run(cli, fixed_ckpt, tmp_path, monkeypatch):
    """A share not mounted (or a link to one), or a typo: told on stderr, exit 1, and no row for it (a row of a
    path that is no file would stay in the index for good); the other paths are done. Only --prune --prune-anyway
    takes it as gone."""
    photos = flat_library(tmp_path / "photos", 3)
    nas = flat_library(tmp_path / "nas", 2)
    out = tmp_path / "lib"
    assert cli("embed", photos, nas, "-o", out, "-m", fixed_ckpt, "-j", "0").exit_code == 0
    shutil.rmtree(nas)
    partly = cli("embed", photos, nas, tmp_path / "typo.jpg", "-o", out, "-m", fixed_ckpt, "-j", "0")
    assert partly.exit_code == 1
    assert f"{nas}: no such file or folder" in partly.stderr and "typo.jpg: no such file" in partly.stderr
    assert "3 unchanged" in partly.stderr and "2 of the paths given do not exist" in partly.stderr
    assert len(paths(out)) == 5

    def forbidden(*a, **k):
        raise AssertionError("nothing to read: neither the model nor the output is touched")

    with monkeypatch.context() as m:
        m.setattr("siglip_cli.pipeline.Encoder.load_all", forbidden)
        m.setattr("siglip_cli.pipeline.Store.open", forbidden)
        link = tmp_path / "nas-link"
        os.symlink(tmp_path / "unmounted" / "photos", link)
        for o, given in ((out, nas), ("-", nas), (out, link)):
            alone = cli("embed", given, "-o", o, "-m", fixed_ckpt)
            assert alone.exit_code == 1 and alone.stdout == ""
            assert (
                alone.stderr == f"siglip: error: {given}: no such file or folder (an unmounted share?); nothing done\n"
            )
    anyway_alone = cli("embed", photos, nas, "-o", out, "-m", fixed_ckpt, "--prune-anyway")  # it needs --prune
    assert anyway_alone.exit_code == 1 and "no such file or folder" in anyway_alone.stderr
    gone = cli("embed", photos, nas, "-o", out, "-m", fixed_ckpt, "--prune", "--prune-anyway")
    assert gone.exit_code == 0 and "2 pruned" in gone.stderr and len(paths(out)) == 3


def test_a_listed_file_that_is_not_there_keeps_its_row(cli, fixed_ckpt, tmp_path, monkeypatch):
    """--files-from over a share that is not mounted: the good rows stay (an error row replaced each), with a
    note, and nothing is loaded; back again, nothing changed."""
    share = flat_library(tmp_path / "mnt" / "photos", 3)
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{p}\n" for p in sorted(share.iterdir())))
    out = tmp_path / "lib.parquet"
    assert cli("embed", "--files-from", listed, "-o", out, "-m", fixed_ckpt, "-j", "0").exit_code == 0
    before = by_path(pq.read_table(out))
    share.rename(tmp_path / "mnt" / "unmounted")

    def forbidden(*a, **k):
        raise AssertionError("nothing to do: no model")

    with monkeypatch.context() as m:
        m.setattr("siglip_cli.pipeline.Encoder.load_all", forbidden)
        away = cli("embed", "--files-from", listed, "-o", out, "-m", fixed_ckpt, "-j", "0")
    assert away.exit_code == 0 and "3 files with rows in the index are not there now" in away.stderr, away.stderr
    assert by_path(pq.read_table(out)) == before
    (tmp_path / "mnt" / "unmounted").rename(share)
    back = cli("embed", "--files-from", listed, "-o", out, "-m", fixed_ckpt, "-j", "0")
    assert back.exit_code == 0 and "3 unchanged" in back.stderr and "not there" not in back.stderr


def flat_library(folder, n: int):
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"p{i:02d}.png")
    return folder


def test_prune_refuses_to_remove_most_rows_and_only_prunes_under_its_roots(cli, fixed_ckpt, tmp_path):
    a = flat_library(tmp_path / "a", 10)
    b = flat_library(tmp_path / "b", 4)
    out = tmp_path / "lib"
    assert cli("embed", a, b, "-o", out, "-m", fixed_ckpt, "-j", "0").exit_code == 0
    for p in sorted(a.rglob("*.png"))[:6]:
        p.unlink()
    most = cli("embed", a, "-o", out, "-m", fixed_ckpt, "--prune")
    assert most.exit_code == 1 and "6 of the 10 rows" in most.stderr and "more than half" in most.stderr
    assert len(paths(out)) == 14
    for p in sorted(b.rglob("*.png"))[:1]:
        p.unlink()
    only_a = cli("embed", a, "-o", out, "-m", fixed_ckpt, "--prune", "--prune-anyway")
    assert only_a.exit_code == 0 and "6 pruned" in only_a.stderr
    assert len(paths(out)) == 8  # b's deleted file is not under this run's root: kept
    assert cli("embed", b, "-o", out, "-m", fixed_ckpt, "--prune").exit_code == 0
    assert len(paths(out)) == 7


def test_nightly_example_survives_a_missing_share(fixed_ckpt, tmp_path):
    lib = make_library(tmp_path / "photos", 6)
    (tmp_path / "v.txt").write_text("red\nsky\n")
    env = {
        **os.environ,
        "SIGLIP_MODEL": str(fixed_ckpt),
        "SIGLIP_VOCAB": str(tmp_path / "v.txt"),
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "nightly.sh")
    assert (
        subprocess.run(["bash", script, str(lib), str(tmp_path / "index")], env=env, capture_output=True).returncode
        == 0
    )
    shutil.rmtree(lib)
    lib.mkdir()
    night = subprocess.run(["bash", script, str(lib), str(tmp_path / "index")], env=env, capture_output=True, text=True)
    assert night.returncode == 1 and "not pruning" in night.stderr
    assert len(paths(tmp_path / "index" / "embeddings")) == 6


def test_prune_refuses_an_empty_share_mounted_inside_a_root(cli, fixed_ckpt, tmp_path):
    photos = tmp_path / "photos"
    flat_library(photos / "local", 160)
    nas = flat_library(photos / "nas", 100)
    album = flat_library(photos / "album", 2)
    out = tmp_path / "lib"
    assert cli("embed", photos, "-o", out, "-m", fixed_ckpt).exit_code == 0
    shutil.rmtree(nas)
    nas.mkdir()  # the share is not mounted: its mountpoint is empty
    refused = cli("embed", photos, "-o", out, "-m", fixed_ckpt, "--prune")
    assert refused.exit_code == 1 and f"not pruning: {nas} is empty, but the index has 100 rows" in refused.stderr
    assert len(paths(out)) == 262
    shutil.rmtree(nas)
    shutil.copytree(tmp_path / "photos" / "local", nas)  # mounted again (other photos); an album emptied by hand
    for p in album.iterdir():
        p.unlink()
    result = cli("embed", photos, "-o", out, "-m", fixed_ckpt, "--prune")
    assert result.exit_code == 0 and "2 pruned" in result.stderr, result.stderr


# -- 2. one row per file, however it is named ---------------------------------------------------------------
def test_symlinks_and_dotdot_are_one_row_per_file(cli, fixed_ckpt, tmp_path):
    real = flat_library(tmp_path / "real", 3)
    lib = tmp_path / "lib"
    lib.mkdir()
    os.symlink(real, lib / "a_link")  # a symlinked subfolder inside the root
    os.symlink(real, tmp_path / "alias")
    out = tmp_path / "out"
    listed = tmp_path / "list.txt"
    listed.write_text(f"{tmp_path}/alias/../real/p00.png\n{real}/p01.png\n")  # `..` after a symlink: beside its target
    for args in ([lib], [real], [real / "p02.png"], ["--files-from", listed]):
        result = cli("embed", *args, "-o", out, "-m", fixed_ckpt)
        assert result.exit_code == 0, result.stderr
    assert paths(out) == sorted(str(real / f"p{i:02d}.png") for i in range(3))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_an_output_that_is_not_a_file_is_refused_and_left_alone(cli, fixed_ckpt, tmp_path):
    """A device, pipe or socket named as an output (-o /dev/null) is refused, not replaced by a file: outputs are
    written whole and renamed into place, and as root `search -o /dev/null` put a file where /dev/null was.
    Also an empty name. For every option naming what siglip writes, and for the writer itself."""
    import pyarrow as pa

    from siglip_cli.errors import RunError
    from siglip_cli.index import write_atomic

    lib = make_library(tmp_path / "lib", 2)
    index = tmp_path / "idx.parquet"
    assert cli("embed", lib, "-o", index, "-m", fixed_ckpt).exit_code == 0
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    link = tmp_path / "link.parquet"
    link.symlink_to(pipe)
    query = ["--image", next(lib.rglob("*.png"))]
    for name in (pipe, link, ""):
        for args in (
            ["embed", lib, "-m", fixed_ckpt, "-o", name],
            ["tag", lib, "-m", fixed_ckpt, "--vocab", index, "-o", name],
            ["search", index, *query, "-o", name],
            ["search", index, *query, "--html", name],
            ["dedup", index, "-o", name],
            ["dedup", index, "--html", name],
        ):
            result = cli(*args)
            assert result.exit_code == 2 and (
                "not a file or a folder" in result.stderr or "an empty name" in result.stderr
            ), (args, result.stderr)
    table = pa.table({"a": [1]})
    with pytest.raises(RunError, match="not a file or a folder"):
        write_atomic(str(link), [table], table.schema)
    assert pipe.is_fifo() and link.is_symlink()


def test_an_output_named_through_a_symlink_is_its_target(cli, fixed_ckpt, tmp_path):
    """-o link.parquet -> real.parquet: the run writes and locks real.parquet (the link had been replaced by a
    file of its own, and two runs through the two names took two locks and duplicated rows); results written
    through a link update its target too."""
    from siglip_cli.index.layouts import layout_for

    real, link = tmp_path / "real.parquet", tmp_path / "link.parquet"
    assert cli("embed", flat_library(tmp_path / "a", 2), "-o", real, "-m", fixed_ckpt).exit_code == 0
    link.symlink_to(real.name)
    assert layout_for(str(link)).lock_path == layout_for(str(real)).lock_path  # one output, one lock
    assert cli("embed", flat_library(tmp_path / "b", 3), "-o", link, "-m", fixed_ckpt).exit_code == 0
    assert link.is_symlink() and len(paths(real)) == 5 and paths(link) == paths(real)
    results, shown = tmp_path / "results.parquet", tmp_path / "shown.parquet"
    results.write_bytes(b"")
    shown.symlink_to(results.name)
    assert cli("search", link, "--image", tmp_path / "a" / "p00.png", "-k", "3", "-o", shown).exit_code == 0
    assert shown.is_symlink() and pq.read_table(results).num_rows == 3


def test_same_folder_given_three_ways_is_one_row_per_file(cli, fixed_ckpt, tmp_path, monkeypatch):
    lib = make_library(tmp_path / "photos", 5)
    os.symlink(lib, tmp_path / "link")
    out = tmp_path / "lib"
    for where, arg in (
        (tmp_path, "photos"),
        (tmp_path / "photos" / "d0", os.path.join("..", "..", "photos")),
        (tmp_path, str(lib) + "/"),
        (tmp_path, "link"),
    ):
        monkeypatch.chdir(where)
        result = cli("embed", arg, "-o", out, "-m", fixed_ckpt, "-j", "0")
        assert result.exit_code == 0, result.stderr
    got = paths(out)
    assert len(got) == 5 and all(os.path.isabs(p) and p.startswith(str(lib)) for p in got)
    gone = sorted(lib.rglob("*.png"))[0]
    gone.unlink()
    monkeypatch.chdir(lib)
    pruned = cli("embed", ".", "-o", out, "-m", fixed_ckpt, "--prune")  # yet another spelling
    assert pruned.exit_code == 0 and "1 pruned" in pruned.stderr
    assert len(paths(out)) == 4


# -- 3. rows of other weights, dtype or preprocessing are never mixed in -----------------------------------
def test_changed_local_weights_or_dtype_are_refused(cli, fixed_ckpt, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(fixed_ckpt, model)
    lib = make_library(tmp_path / "lib", 3)
    out = tmp_path / "out"
    assert cli("embed", lib, "-o", out, "-m", model, "--dtype", "float32").exit_code == 0
    other = cli("embed", lib, "-o", out, "-m", model, "--dtype", "bfloat16")
    assert other.exit_code == 1 and "dtype: 'float32' there, 'bfloat16' now" in other.stderr
    exact = cli("embed", lib, "-o", out, "-m", model, "--dtype", "float32", "--exact")
    assert exact.exit_code == 1 and "exact: False there, True now" in exact.stderr
    copied = tmp_path / "elsewhere" / "model-copy"
    shutil.copytree(model, copied, copy_function=shutil.copy)  # another path, new mtimes, same weights
    assert "3 unchanged" in cli("embed", lib, "-o", out, "-m", copied, "--dtype", "float32").stderr
    from safetensors.torch import load_file, save_file

    weights = model / "model.safetensors"
    tensors = load_file(weights)
    tensors["logit_bias"] = tensors["logit_bias"] + 0.5  # fine-tuned weights, saved over the old
    save_file(tensors, weights, metadata={"format": "pt"})
    changed = cli("embed", lib, "-o", out, "-m", model, "--dtype", "float32")
    assert changed.exit_code == 1 and "weights: 'local:" in changed.stderr and "--overwrite" in changed.stderr
    rebuilt = cli("embed", lib, "-o", out, "-m", model, "--dtype", "float32", "--overwrite")
    assert rebuilt.exit_code == 0 and "3 done" in rebuilt.stderr and len(paths(out)) == 3


def hub_cache(root, repo: str, commit: str, ckpt) -> None:
    """A Hugging Face cache holding repo at commit, with `main` pointing there (as a download leaves it)."""
    folder = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(ckpt, folder / "snapshots" / commit)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)


def test_a_hub_repo_that_moved_on_is_refused_without_loading(fixed_ckpt, tmp_path):
    cache, repo = tmp_path / "hub", "someone/tiny-siglip"
    hub_cache(cache, repo, "a" * 40, fixed_ckpt)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    lib = make_library(tmp_path / "lib", 3)
    out = tmp_path / "out.parquet"
    first = run_siglip("embed", lib, "-o", out, "-m", repo, env=env)
    assert first.returncode == 0, first.stderr
    meta = json.loads(pq.read_schema(out).metadata[b"siglip"])
    assert meta["commit"] == "a" * 40 and meta["signature"]["weights"] == "a" * 40
    hub_cache(cache, repo, "b" * 40, fixed_ckpt)  # the repo was updated; main now points at b
    moved_on = run_siglip("embed", lib, "-o", out, "-m", repo, env=env)
    assert moved_on.returncode == 1 and f"weights: '{'a' * 40}' there, '{'b' * 40}' now" in moved_on.stderr
    pinned = run_siglip("embed", lib, "-o", out, "-m", repo, "--revision", "a" * 40, env=env)
    assert pinned.returncode == 0 and "3 unchanged" in pinned.stderr


# -- 4. text output follows the same rules -------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["lib", "lib.parquet"])
def test_text_output_never_replaces_an_image_index(cli, fixed_ckpt, tmp_path, layout):
    lib = make_library(tmp_path / "photos", 10)
    out = tmp_path / layout
    assert cli("embed", lib, "-o", out, "-m", fixed_ckpt).exit_code == 0
    refused = cli("embed", "--text", "a red car", "-o", out, "-m", fixed_ckpt)
    assert refused.exit_code == 1 and "task: 'EmbedSpec' there, 'texts' now" in refused.stderr
    assert len(paths(out)) == 10
    texts = tmp_path / ("texts" if layout == "lib" else "texts.parquet")
    for words in (["a red car", "a cat"], ["a dog"]):
        result = cli("embed", *[a for w in words for a in ("--text", w)], "-o", texts, "-m", fixed_ckpt)
        assert result.exit_code == 0, result.stderr
    assert pq.read_table(texts).column("text").to_pylist() == ["a dog"]  # a text output is rewritten whole
    assert cli("embed", "--text", "x", "-o", out, "-m", fixed_ckpt, "--overwrite").exit_code == 0


# -- 5. moves are not encoded again ---------------------------------------------------------------------------
def test_moved_folder_reuses_rows_without_the_model(cli, fixed_ckpt, tmp_path, monkeypatch):
    lib = tmp_path / "photos"
    make_library(lib / "2023", 100)
    out = tmp_path / "lib"
    assert cli("embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "0").exit_code == 0
    before = {os.path.relpath(p, lib / "2023"): r for p, r in by_path(pq.read_table(out)).items()}
    os.rename(lib / "2023", lib / "holidays-2023")

    def forbidden(*a, **k):
        raise AssertionError("a moved file must not be decoded or encoded")

    monkeypatch.setattr("siglip_cli.pipeline.Encoder.load", forbidden)
    monkeypatch.setattr("siglip_cli.loader.decoded_chunks", forbidden)
    result = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "--prune")  # moves are not "gone": no refusal
    assert result.exit_code == 0, result.stderr
    assert "100 moved" in result.stderr and "100 pruned" in result.stderr and " 0 done" in result.stderr
    after = by_path(pq.read_table(out))
    assert len(after) == 100
    for path, row in after.items():
        old = before[os.path.relpath(path, lib / "holidays-2023")]
        assert row["embedding"] == old["embedding"] and row["sha256"] == old["sha256"]
        assert row["size"] == os.path.getsize(path)


# -- 6. readers never see duplicates ----------------------------------------------------------------------
KILL_AT = """
import os, signal
_replace, _unlink, _count = os.replace, os.unlink, [0]
def _step(path):
    if str(path).endswith(".parquet") and os.environ.get("SIGLIP_TEST_KILL_AT"):
        _count[0] += 1
        if _count[0] == int(os.environ["SIGLIP_TEST_KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
def replace(src, dst, *a, **k):
    if os.path.exists(dst):  # a rewrite of a part, or the merge: a step of the end of the run
        _step(dst)  # killed before the step: step 1 is the state during the run, with every new part in
    _replace(src, dst, *a, **k)
def unlink(path, *a, **k):
    _step(path)
    _unlink(path, *a, **k)
os.replace, os.unlink = replace, unlink
"""


@pytest.mark.parametrize("layout", ["lib", "lib.parquet"])
def test_readers_see_one_row_per_file_at_every_step_of_the_end(cli, fixed_ckpt, tmp_path, layout):
    from PIL import Image

    # (torch: OpenVINO's compile at every one of the ~60 runs cost this test a minute, and the index is the point)
    lib = make_library(tmp_path / "photos", 40)
    base = tmp_path / "base"
    base.mkdir()
    env = {"SIGLIP_FLUSH_ROWS": "8"}  # several parts
    assert (
        run_siglip(
            "embed", lib, "-o", base / layout, "-m", fixed_ckpt, "--backend", "torch", "-j", "0", env=env
        ).returncode
        == 0
    )
    old = by_path(read_index(str(base / layout)))
    files = sorted(lib.rglob("*.png"))
    for p in files[::5]:  # changed: their rows are superseded in old parts
        Image.new("RGB", (20, 20), (0, 0, 200)).save(p)
        os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))
    for p in files[1:8:3]:
        p.unlink()  # pruned
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILL_AT)
    final = None
    for step in range(1, 30):
        work = tmp_path / f"kill{step}"
        shutil.copytree(base, work)
        out = work / layout
        run = run_siglip(
            "embed",
            lib,
            "-o",
            out,
            "-m",
            fixed_ckpt,
            "--backend",
            "torch",
            "-j",
            "0",
            "--prune",
            env={**env, "PYTHONPATH": str(hooks), "SIGLIP_TEST_KILL_AT": str(step)},
        )
        seen = read_index(str(out))
        keys = seen.column("path").to_pylist()
        assert len(keys) == len(set(keys)), f"duplicates after a kill at step {step}"
        for path, row in by_path(seen).items():  # each row is the file's old row or its new one
            if path in old and row["sha256"] == old[path]["sha256"]:
                assert row["embedding"] == old[path]["embedding"]
            else:
                assert os.path.exists(path) and row["size"] == os.path.getsize(path)
        assert set(keys) >= {str(p) for p in files if p.exists()}  # nothing missing
        rerun = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "--backend", "torch", "-j", "0", "--prune")
        assert rerun.exit_code == 0, rerun.stderr  # (in this process: only the killed runs need one of their own)
        done = pq.read_table(out)  # a plain reader, after the next run: every file once
        assert sorted(done.column("path").to_pylist()) == sorted(str(p) for p in files if p.exists())
        final = final or done.sort_by("path")
        assert done.sort_by("path").column("embedding").equals(final.column("embedding"))
        if run.returncode == 0:  # the kill came after the last step: every step has been tried
            break
    assert step > 2


def test_a_move_after_a_killed_run_copies_the_row_of_its_content(cli, fixed_ckpt, tmp_path):
    from PIL import Image

    lib = flat_library(tmp_path / "photos", 6)
    out = tmp_path / "lib"
    assert cli("embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "0").exit_code == 0
    first = by_path(read_index(str(out)))
    target = lib / "p00.png"
    original = target.read_bytes()
    Image.new("RGB", (8, 8), (0, 0, 250)).save(target)  # p00 changes...
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILL_AT)
    killed = run_siglip(
        "embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "0", env={"PYTHONPATH": str(hooks), "SIGLIP_TEST_KILL_AT": "1"}
    )  # ...and the run dies at its end
    assert killed.returncode != 0
    (lib / "restored.png").write_bytes(original)  # the old p00, back under another name
    result = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "-j", "0")
    assert result.exit_code == 0 and "1 moved" in result.stderr, result.stderr
    now = by_path(pq.read_table(out))
    assert now[str(lib / "restored.png")]["embedding"] == first[str(target)]["embedding"]
    assert now[str(lib / "restored.png")]["sha256"] == first[str(target)]["sha256"]


def test_an_output_folder_that_vanishes_mid_run_is_not_made_again(tmp_path):
    """A share unmounted during a run: writing the next part fails with one line, and neither the index folder
    nor a file's staging folder is made again on the bare mount point."""
    from siglip_cli.errors import RunError
    from siglip_cli.index.layouts import FileLayout, FolderLayout

    mount = tmp_path / "share"
    folder = FolderLayout(str(mount / "index"))
    folder.prepare()
    single = FileLayout(str(mount / "one" / "index.parquet"))
    (mount / "one").mkdir()
    assert folder.next_part().endswith("part-00000000.parquet") and single.next_part().endswith("part-00000000.parquet")
    for p in mount.iterdir():  # unmounted: the mount point stays, empty
        shutil.rmtree(p)
    for layout, said in ((folder, "its folder has vanished"), (single, f"folder {mount / 'one'} does not exist")):
        with pytest.raises(RunError, match=said + r" \(an unmounted share\?\)"):
            layout.next_part()
    assert list(mount.iterdir()) == []


def test_an_index_rewritten_by_another_tool_is_read_without_loss(cli, fixed_ckpt, tmp_path):
    """An index file another tool rewrote, siglip's metadata kept: a path written twice (a naive append) keeps
    its row (both copies were removed and the row lost), an mtime column in nanoseconds is the same mtime (every
    file looked changed), and a column dropped is one line, or rebuilt with --overwrite (a traceback)."""
    import pyarrow as pa

    lib = make_library(tmp_path / "lib", 4)
    out = tmp_path / "idx.parquet"
    assert cli("embed", lib, "-o", out, "-m", fixed_ckpt).exit_code == 0
    original = pq.read_table(out)
    files = sorted(str(p) for p in lib.rglob("*.png"))

    pq.write_table(pa.concat_tables([original, original.slice(0, 2)]), out)  # metadata kept
    again = cli("embed", lib, "-o", out, "-m", fixed_ckpt)
    assert again.exit_code == 0 and "0 done" in again.stderr, again.stderr
    assert sorted(set(read_index(str(out)).column("path").to_pylist())) == files

    i = original.schema.get_field_index("mtime")
    ns = original.set_column(
        i, pa.field("mtime", pa.timestamp("ns", tz="UTC")), original.column("mtime").cast(pa.timestamp("ns", tz="UTC"))
    )
    pq.write_table(ns.replace_schema_metadata(original.schema.metadata), out)
    again = cli("embed", lib, "-o", out, "-m", fixed_ckpt)
    assert again.exit_code == 0 and "0 done" in again.stderr, again.stderr

    pq.write_table(original.drop_columns(["path_bytes"]).replace_schema_metadata(original.schema.metadata), out)
    refused = cli("embed", lib, "-o", out, "-m", fixed_ckpt)
    assert refused.exit_code == 1 and "cannot be read as a siglip output" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    rebuilt = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "--overwrite")
    assert rebuilt.exit_code == 0 and sorted(read_index(str(out)).column("path").to_pylist()) == files


def test_a_file_that_became_a_folder_is_pruned(cli, fixed_ckpt, tmp_path):
    """--prune removes the row of a path that is now a folder (its old vector stayed for good), as it removes
    the row of one that is gone; the folder's own images get rows."""
    lib = make_library(tmp_path / "lib", 6)
    out = tmp_path / "out"
    assert cli("embed", lib, "-o", out, "-m", fixed_ckpt).exit_code == 0
    was = sorted(lib.rglob("*.png"))[0]
    inner = was.read_bytes()
    was.unlink()
    was.mkdir()
    (was / "inner.png").write_bytes(inner)
    result = cli("embed", lib, "-o", out, "-m", fixed_ckpt, "--prune")
    assert result.exit_code == 0, result.stderr
    paths = read_index(str(out)).column("path").to_pylist()
    assert str(was) not in paths and str(was / "inner.png") in paths and len(paths) == 6
