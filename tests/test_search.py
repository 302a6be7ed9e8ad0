"""`siglip search` and `siglip dedup` on indexes made by `siglip embed`: exact against numpy, scores as `tag`
gives them, planted duplicates found and nothing else, the sidecar rebuilt when the index changes, outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from siglip_cli.index import read_index

from helpers import table

TORCH = ["--device", "cpu", "--dtype", "float32", "--backend", "torch", "-q"]


@pytest.fixture(scope="module")
def library(tmp_path_factory, photos):
    """The shared photos (linked), and resized + recompressed copies of the first ten."""
    lib = tmp_path_factory.mktemp("lib")
    src = sorted(photos.glob("*.JPEG"))
    for p in src:
        os.symlink(p, lib / p.name)
    for i, p in enumerate(src[:10]):
        im = Image.open(p).convert("RGB")
        im.resize((im.width // 2, im.height // 2)).save(lib / f"copy{i}_small.jpg", quality=60)
    return lib


@pytest.fixture(scope="module")
def indexes(library, fixed_ckpt, tmp_path_factory):
    from typer.testing import CliRunner

    from siglip_cli.cli import app

    out = tmp_path_factory.mktemp("idx")
    made = {}
    for kind, extra in (("float32", []), ("float16", ["--float16"])):
        made[kind] = out / kind
        r = CliRunner().invoke(
            app, ["embed", str(library), "-o", str(made[kind]), "-m", str(fixed_ckpt), *TORCH, *extra]
        )
        assert r.exit_code == 0, r.output
    return made


def stored(index) -> tuple[list[str], np.ndarray]:
    t = read_index(str(index))
    return t.column("path").to_pylist(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(
        np.float32
    )


@pytest.mark.parametrize("kind", ["float32", "float16"])
def test_image_query_is_exact_and_ranks_itself_first(cli, indexes, library, kind):
    paths, vecs = stored(indexes[kind])
    query = library / "n01440764_tench.JPEG"
    r = cli("search", indexes[kind], "--image", query, "-k", "20", "--json")
    assert r.exit_code == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    q = vecs[paths.index(str(query))]
    q = q / np.linalg.norm(q)
    brute = vecs @ q
    want = np.argsort(-brute, kind="stable")[:20]
    assert [g["path"] for g in got] == [paths[i] for i in want]  # recall 1.0, same order
    np.testing.assert_allclose([g["score"] for g in got], brute[want], atol=1e-5)
    assert got[0]["path"] == str(query) and got[0]["score"] == pytest.approx(1, abs=1e-3)


def test_text_query_scores_equal_tag(cli, indexes, library, fixed_ckpt, tmp_path):
    vocab = tmp_path / "v.txt"
    vocab.write_text("a photo of a dog\n")
    tags = tmp_path / "tags.parquet"
    assert (
        cli(
            "tag",
            library,
            "--vocab",
            vocab,
            "--template",
            "{}",
            "--threshold",
            "0",
            "-o",
            tags,
            "-m",
            fixed_ckpt,
            *TORCH,
        ).exit_code
        == 0
    )
    want = {p: t[0]["score"] for p, t in zip(table(tags)["path"], table(tags)["tags"])}
    r = cli("search", indexes["float32"], "a photo of a dog", "-k", "1000", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(got) == len(want)
    for g in got:
        assert g["score"] == pytest.approx(want[g["path"]], abs=1e-5)


def test_filters_combinations_and_outputs(cli, indexes, library, tmp_path):
    idx = indexes["float32"]
    r = cli(
        "search",
        idx,
        "beach",
        "--image",
        library / "n01440764_tench.JPEG",
        "--minus",
        "people",
        "--path",
        "*copy*",
        "-k",
        "5",
        "--min-score",
        "-1",
        "-o",
        tmp_path / "r.parquet",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.stderr
    t = pq.read_table(tmp_path / "r.parquet")
    assert t.num_rows == 5 and all("copy" in p for p in t.column("path").to_pylist())
    assert t.column("rank").to_pylist() == [1, 2, 3, 4, 5]
    page = tmp_path / "r.html"
    r = cli("search", idx, "--image", library / "copy1_small.jpg", "-k", "4", "--html", page, "-o", "-")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 4
    assert page.read_text().count('<img src="data:image/jpeg;base64,') == 4


def test_image_search_in_a_pipeline_needs_no_torch(indexes, library):
    """An indexed image query reads the sidecar with numpy alone (torch's import is most of a fresh process's
    time; pyarrow's, with the pandas it imports, half of what is left), and `| head` ends it quietly."""
    import sys

    query = library / "n01440764_tench.JPEG"
    cmd = (
        f"{sys.executable} -X importtime -m siglip_cli search {indexes['float16']} --image {query} -k 100 "
        "| head -n 1; echo status ${PIPESTATUS[0]}"
    )
    for later in (False, True):  # the first may build the sidecar
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
        assert json.loads(r.stdout.splitlines()[0])["path"] == str(query)
        assert r.stdout.splitlines()[-1] in ("status 0", "status 141")  # 0: it wrote all before head closed
        imported = {
            line.split("|")[-1].strip().split(".")[0]
            for line in r.stderr.splitlines()
            if line.startswith("import time:")
        }
        assert "numpy" in imported and not imported & (
            {"torch", "transformers"} | ({"pyarrow", "pandas"} if later else set())
        )
        assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr[-2000:]


def test_text_search_reads_a_cached_text_tower_without_torch(cli, indexes, library, fixed_ckpt, tmp_path):
    """A text search loads the model with torch until a run on OpenVINO (here `tag`) has converted the text
    tower; then it reads that from the cache and imports neither torch nor transformers. Both give the scores
    `siglip tag` gives the text."""
    import sys

    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    vocab = tmp_path / "v.txt"
    vocab.write_text("a red car on a road\n")
    tags = tmp_path / "tags.parquet"
    assert (
        cli(
            "tag",
            library,
            "--vocab",
            vocab,
            "--template",
            "{}",
            "--threshold",
            "0",
            "-o",
            tags,
            "-m",
            fixed_ckpt,
            *TORCH,
        ).exit_code
        == 0
    )
    want = {p: t[0]["score"] for p, t in zip(table(tags)["path"], table(tags)["tags"])}
    env = {**os.environ, "SIGLIP_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "siglip_cli",
        "search",
        str(indexes["float32"]),
        "A red car on a road",
        "-k",
        "1000",
        "--json",
    ]
    for later in (False, True):
        if later:  # the text tower converted by a tag run on OpenVINO, into the search's cache
            ov = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "siglip_cli",
                    "tag",
                    str(library / "copy1_small.jpg"),
                    "--vocab",
                    str(vocab),
                    "-m",
                    str(fixed_ckpt),
                    "--device",
                    "cpu",
                    "--backend",
                    "openvino",
                    "--dtype",
                    "float32",
                    "-o",
                    str(tmp_path / "ov.parquet"),
                ],
                capture_output=True,
                text=True,
                timeout=300,
                env=env,
            )
            assert ov.returncode == 0 and "converted the text tower for OpenVINO" in ov.stderr, ov.stderr[-2000:]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "converted the text tower" not in r.stderr
        imported = {
            line.split("|")[-1].strip().split(".")[0]
            for line in r.stderr.splitlines()
            if line.startswith("import time:")
        }
        assert ("torch" in imported) is not later and ("transformers" in imported) is not later
        got = [json.loads(line) for line in r.stdout.splitlines()]
        assert len(got) == len(want)
        for g in got:
            assert g["score"] == pytest.approx(want[g["path"]], abs=1e-5)


def narrow_checkpoint(fixed_ckpt, folder):
    """fixed_ckpt's layout with 16-dimensional embeddings: another model than the index's."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    config = SiglipConfig.from_pretrained(fixed_ckpt)
    for part in (config.text_config, config.vision_config):
        part.hidden_size, part.intermediate_size = 16, 32
    config.text_config.projection_size = 16
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(folder)
    for f in fixed_ckpt.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "preprocessor")):
            shutil.copy(f, folder / f.name)
    return folder


def test_search_errors(cli, tmp_path, indexes, library, fixed_ckpt):
    """Each a line on stderr: exit 2 for what the user gave wrong, 1 for what cannot be done."""

    def one_line(r, code: int, text: str) -> bool:
        return r.exit_code == code and text in r.stderr and len(r.stderr.strip().splitlines()) == 1

    assert cli("search", tmp_path / "nothing", "x").exit_code == 1
    assert one_line(cli("search", indexes["float32"], "x", "--server", "127.0.0.1:8002"), 1, "like http://")
    assert one_line(cli("search", indexes["float32"], "--device", "cpu"), 2, "give a text query")
    assert one_line(cli("search", library / "n01440764_tench.JPEG", "x"), 1, "not a siglip index")  # a photo
    (tmp_path / "cut.parquet").write_bytes(next(indexes["float32"].glob("*.parquet")).read_bytes()[:5000])
    assert one_line(cli("dedup", tmp_path / "cut.parquet"), 1, "not a siglip index")
    assert one_line(cli("search", indexes["float32"], "--image", tmp_path / "gone.jpg"), 2, "no such file")
    narrow = narrow_checkpoint(fixed_ckpt, tmp_path / "narrow")
    new = tmp_path / "new.jpg"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(new)
    for query in (["a dog"], ["--image", new]):  # another model, by --model: its vectors do not fit the index
        r = cli("search", indexes["float32"], *query, "-m", narrow, "--device", "cpu")
        assert one_line(r, 1, "makes vectors of 16 dimensions; the index holds 32"), r.stderr


def test_every_float_option_refuses_nan_and_inf(cli):
    """click's float ranges let nan and inf through: a nan threshold or weight quietly matched nothing."""
    import typer.main

    from siglip_cli.cli import app

    seen = 0
    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            if getattr(param.type, "name", "") in ("float", "float range"):
                for value in ("nan", "inf", "-inf"):
                    r = cli(name, param.opts[0], value)
                    said = " ".join(r.stderr.replace("\u2502", " ").split())  # a range's own refusal for -inf, say
                    assert r.exit_code == 2 and f"Invalid value for '{param.opts[0]}'" in said, (
                        name,
                        param.opts,
                        value,
                    )
                seen += 1
    assert seen >= 12  # timeouts, thresholds, weights, scores, serve's limits


def test_dedup_and_search_of_an_index_without_ok_rows(cli, tmp_path, fixed_ckpt):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jpg").write_text("not a photo")
    assert cli("embed", tmp_path / "in", "-o", tmp_path / "idx.parquet", "-m", fixed_ckpt, *TORCH).exit_code == 0
    for args in (["dedup"], ["dedup", "--similar"], ["search", "--image", tmp_path / "in" / "x.jpg"]):
        r = cli(args[0], tmp_path / "idx.parquet", *args[1:], "--json")
        assert r.exit_code == (0 if args[0] == "dedup" else 1) and r.stdout == "", (args, r.stderr)


def test_a_sidecar_file_cut_short_is_rebuilt(cli, indexes, library, tmp_path):
    """Any of the sidecar's files cut short (by hand, a full disk elsewhere): the next search builds it again
    and answers as before; paths.bin cut short had given rows with empty paths."""
    index = tmp_path / "idx"
    shutil.copytree(indexes["float32"], index)
    query = ["--image", library / "n01440764_tench.JPEG", "-k", "5", "--json"]
    first = cli("search", index, *query)
    assert first.exit_code == 0 and len(first.stdout.splitlines()) == 5
    sidecar = index / ".siglip-vectors"
    for f in sorted(sidecar.iterdir()):
        if f.name == "key.json":
            continue
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        again = cli("search", index, *query)
        assert again.exit_code == 0 and again.stdout == first.stdout, f.name


def test_dedup_finds_the_planted_copies_and_nothing_else(cli, indexes, tmp_path):
    for kind in ("float32", "float16"):
        r = cli("dedup", indexes[kind], "--json")
        assert r.exit_code == 0, r.stderr
        rows = [json.loads(line) for line in r.stdout.splitlines()]
        groups = {}
        for row in rows:
            groups.setdefault(row["group"], set()).add(os.path.basename(row["path"]))
        src = sorted(n for n in os.listdir(os.path.dirname(rows[0]["path"])) if n.endswith(".JPEG"))
        want = sorted(sorted({f"copy{i}_small.jpg", src[i]}) for i in range(10))
        assert sorted(sorted(g) for g in groups.values()) == want
        reps = [row for row in rows if row["representative"]]
        assert len(reps) == 10 and all(row["path"].endswith(".JPEG") for row in reps)  # the larger original
    page = tmp_path / "d.html"
    assert cli("dedup", indexes["float32"], "--html", page, "-o", tmp_path / "d.parquet").exit_code == 0
    assert page.read_text().count("<img") == 20 and pq.read_table(tmp_path / "d.parquet").num_rows == 20


def test_sidecar_is_rebuilt_when_the_index_changes(cli, library, fixed_ckpt, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in sorted(os.listdir(library))[:5]:
        shutil.copy(library / name, lib / name)
    idx = tmp_path / "idx"
    assert cli("embed", lib, "-o", idx, "-m", fixed_ckpt, *TORCH).exit_code == 0
    one = cli("search", idx, "--image", lib / sorted(os.listdir(lib))[0], "-k", "10", "--json")
    assert len(one.stdout.splitlines()) == 5
    key = (idx / ".siglip-vectors" / "key.json").read_text()
    again = cli("search", idx, "--image", lib / sorted(os.listdir(lib))[0], "-k", "10", "--json")
    assert again.stdout == one.stdout and (idx / ".siglip-vectors" / "key.json").read_text() == key  # reused
    shutil.copy(library / "n01440764_tench.JPEG", lib / "new.jpg")  # not a copy of the five
    assert cli("embed", lib, "-o", idx, "-m", fixed_ckpt, *TORCH).exit_code == 0
    r = cli("search", idx, "--image", lib / "new.jpg", "-k", "10", "--json")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 6 and rows[0]["path"] == str(lib / "new.jpg")
    assert (idx / ".siglip-vectors" / "key.json").read_text() != key


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no Chromium here")
def test_html_renders_in_a_browser(cli, indexes, library, tmp_path):
    page = tmp_path / "r.html"
    assert (
        cli(
            "search", indexes["float32"], "--image", library / "copy1_small.jpg", "-k", "6", "--html", page, "-o", "-"
        ).exit_code
        == 0
    )
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    # the DOM after rendering: every image decoded to its natural size (a broken one has naturalWidth 0)
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.read_text().replace(
            "</body>",
            "<script>window.onload=()=>{document.title="
            "[...document.images].map(i=>i.complete&&i.naturalWidth>0).join(',')}</script></body>",
        )
    )
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", f"file://{probe}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    title = out.stdout.split("<title>")[1].split("</title>")[0]
    assert title.split(",") == ["true"] * 6


def test_results_carry_exact_names_that_are_not_utf8(cli, library, fixed_ckpt, tmp_path):
    """Two copies whose names differ only in a byte that is not UTF-8 show the same `path`: results carry
    path_bytes, as the index does (base64 in JSON Lines, binary in Parquet), the page shows both photos, and an
    image query by such a name finds its row (its stored vector, score 1)."""
    import base64

    folder = tmp_path / "odd"
    folder.mkdir()
    names = [os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), os.path.join(os.fsencode(folder), b"caf\xe8.jpg")]
    for name in names:
        shutil.copy(library / "n01440764_tench.JPEG", name)
    index = tmp_path / "idx.parquet"
    assert cli("embed", folder, "-o", index, "-m", fixed_ckpt, *TORCH).exit_code == 0
    r = cli("dedup", index, "--json", "--html", tmp_path / "d.html")
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 0 and len(got) == 2 and got[0]["path"] == got[1]["path"]
    assert sorted(base64.b64decode(g["path_bytes"]) for g in got) == sorted(names)
    assert "cannot read this file" not in (tmp_path / "d.html").read_text()
    assert cli("dedup", index, "-o", tmp_path / "d.parquet").exit_code == 0
    assert sorted(pq.read_table(tmp_path / "d.parquet").column("path_bytes").to_pylist()) == sorted(names)
    os.remove(names[1])  # gone from the disk: only its stored vector can answer
    r = cli("search", index, "--image", os.fsdecode(names[1]), "-k", "1", "--json")
    assert r.exit_code == 0, r.stderr
    (hit,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert hit["score"] == pytest.approx(1.0, abs=1e-6)
