"""`siglip embed` as a user runs it: inputs, error rows, exit codes, outputs readable by other tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import duckdb
import pyarrow.parquet as pq
import pytest

from helpers import make_image, run_siglip


@pytest.fixture
def library(tmp_path):
    """A small photo folder with nesting, hidden files, a non-image extension and broken files."""
    root = tmp_path / "lib"
    make_image(root / "b.jpg")
    make_image(root / "a.png", color=(10, 200, 10))
    make_image(root / "nested" / "deeper" / "c.JPEG", size=(64, 20))
    make_image(root / ".hidden.jpg")
    make_image(root / ".cache" / "d.jpg")
    (root / "notes.txt").write_text("not an image")
    good = (root / "b.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "text-named.jpg").write_text("this is a text file, not a JPEG\n")
    (root / "empty.jpg").write_bytes(b"")
    return root


def rows(path):
    return pq.read_table(path).to_pylist()


def test_folders_nested_sorted_hidden_skipped(cli, fixed_ckpt, library, tmp_path):
    out = tmp_path / "out.parquet"
    result = cli("embed", library, "-o", out, "-m", fixed_ckpt, "-j", "2")
    assert result.exit_code == 0, result.stderr
    got = {r["path"]: r for r in rows(out)}
    names = [os.path.relpath(p, library) for p in got]
    assert names == ["a.png", "b.jpg", "empty.jpg", "nested/deeper/c.JPEG", "text-named.jpg", "truncated.jpg"]
    ok = [r for r in got.values() if r["status"] == "ok"]
    assert len(ok) == 3 and all(len(r["embedding"]) == 32 and r["error"] is None for r in ok)
    c = got[str(library / "nested" / "deeper" / "c.JPEG")]
    assert (c["width"], c["height"]) == (64, 20)
    assert "siglip: 6 done (3 ok, 3 failed)" in result.stderr


def test_broken_files_become_error_rows(cli, fixed_ckpt, library, tmp_path):
    out = tmp_path / "out.parquet"
    assert cli("embed", library, "-o", out, "-m", fixed_ckpt, "-j", "0").exit_code == 0
    errors = {os.path.basename(r["path"]): r for r in rows(out) if r["status"] == "error"}
    assert set(errors) == {"empty.jpg", "text-named.jpg", "truncated.jpg"}
    assert "empty" in errors["empty.jpg"]["error"]
    assert "not an image" in errors["text-named.jpg"]["error"]
    assert "truncated" in errors["truncated.jpg"]["error"]
    for r in errors.values():
        assert r["embedding"] is None and r["width"] is None


def test_strict_exits_1_when_a_row_failed(cli, fixed_ckpt, library, tmp_path):
    result = cli("embed", library, "-o", tmp_path / "o.parquet", "-m", fixed_ckpt, "--strict")
    assert result.exit_code == 1
    assert "3 image(s) failed" in result.stderr
    assert (tmp_path / "o.parquet").exists()  # the rows are still written
    good = cli("embed", library / "a.png", "-o", tmp_path / "p.parquet", "-m", fixed_ckpt, "--strict")
    assert good.exit_code == 0


def test_files_from_stdin_attempts_every_listed_path(cli, fixed_ckpt, library, tmp_path):
    out = tmp_path / "out.parquet"
    listed = [library / "notes.txt", library / "b.jpg", library / "missing.jpg"]
    result = cli(
        "embed", "--files-from", "-", "-o", out, "-m", fixed_ckpt, input="".join(f"{p}\n" for p in listed) + "\n"
    )
    assert result.exit_code == 0, result.stderr
    got = rows(out)
    assert [r["path"] for r in got] == [str(p) for p in listed]  # list order is kept
    assert [r["status"] for r in got] == ["error", "ok", "error"]
    assert "no such file" in got[2]["error"]


def test_ext_option(cli, fixed_ckpt, library, tmp_path):
    out = tmp_path / "out.parquet"
    assert cli("embed", library, "--ext", "png", "-o", out, "-m", fixed_ckpt).exit_code == 0
    assert [os.path.basename(r["path"]) for r in rows(out)] == ["a.png"]


def test_json_lines_to_stdout(cli, fixed_ckpt, library):
    result = cli("embed", library / "a.png", library / "empty.jpg", "-o", "-", "-m", fixed_ckpt, "-q")
    assert result.exit_code == 0
    assert result.stderr == ""  # --quiet: nothing but data
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["status"] for r in lines] == ["ok", "error"]
    assert len(lines[0]["embedding"]) == 32 and lines[1]["embedding"] is None


def test_float16_and_metadata(cli, fixed_ckpt, library, tmp_path):
    out = tmp_path / "out.parquet"
    assert cli("embed", library / "a.png", "-o", out, "-m", fixed_ckpt, "--float16").exit_code == 0
    schema = pq.read_schema(out)
    assert str(schema.field("embedding").type) == "fixed_size_list<element: halffloat>[32]"
    meta = json.loads(schema.metadata[b"siglip"])
    assert meta["model"] == str(fixed_ckpt) and meta["dim"] == 32 and meta["normalization"] == "l2"
    assert meta["tool_version"] and "resize 64x64" in meta["preprocessing"]


def test_output_readable_by_duckdb(cli, fixed_ckpt, library, tmp_path):
    out = tmp_path / "out.parquet"
    assert cli("embed", library, "-o", out, "-m", fixed_ckpt).exit_code == 0
    con = duckdb.connect()
    n, ok, dim = con.execute(
        f"select count(*), count(*) filter (status = 'ok'), max(len(embedding)) from '{out}'"
    ).fetchone()
    assert (n, ok, dim) == (6, 3, 32)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--frobnicate"], "No such option"),
        (["--device", "tpu"], "expected auto, cpu, mps, cuda"),
        (["--dtype", "int8"], "expected auto, float32"),
        (["--batch-size", "0"], "greater than or equal to 1|not in the range x>=1"),  # typer 0.29 | before
        ([], "nothing to embed"),
        (["-t", "a cat", "IMG"], "not both"),
        (["IMG", "-o", ""], "an empty name"),  # an output that cannot be an index
        (["-t", "a cat", "-o", ""], "an empty name"),
        (["IMG", "-o", "/dev/null"], "is not a file or a folder"),
        (["IMG", "-o", "-", "--prune"], "--prune works on an index"),  # options an index alone honours: to stdout
        (["IMG", "-o", "-", "--retry-errors"], "--retry-errors works on an index"),
    ],
)
def test_bad_usage_exits_2(cli, args, message, library):
    args = [str(library / "a.png") if a == "IMG" else a for a in args]
    result = cli("embed", *args)
    assert result.exit_code == 2
    assert any(m in result.stderr for m in message.split("|"))


def test_missing_model_is_one_line_and_exit_1(library, tmp_path):
    """A Hub id that cannot be had (offline, not cached); a local folder that is not there is its own test."""
    result = run_siglip("embed", library / "a.png", "-o", tmp_path / "o.parquet", "-m", "nobody/no-such-model")
    assert result.returncode == 1
    assert result.stderr.startswith("siglip: error: cannot load model")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.parquet").exists()


def test_unwritable_output_exits_1_before_loading(library, tmp_path):
    result = run_siglip("embed", library / "a.png", "-o", tmp_path / "no" / "such" / "dir" / "o.parquet")
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_subprocess_pipeline_and_module_entry(fixed_ckpt, library):
    """`python -m siglip_cli ... -o -` in a shell pipeline: data on stdout, the summary on stderr."""
    result = run_siglip("embed", library, "-o", "-", "-m", fixed_ckpt, "-j", "2")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 6
    assert "6 done" in result.stderr and "\x1b[" not in result.stderr  # no progress bar off a terminal


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys, runpy; sys.argv=['siglip','embed','--help']\n"
        "try: runpy.run_module('siglip_cli', run_name='__main__')\n"
        "except SystemExit: pass\n"
        "print(sorted(m for m in ('torch','transformers','pyarrow') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip().endswith("[]"), result.stdout[-300:]


def test_help_shows_every_option_text_whole(cli):
    """Rich reads [brackets] in help text as markup and drops them: `siglip-cli[ray]` became `siglip-cli` and
    `[env: SIGLIP_MODEL]` vanished. Every bracketed piece of every command's and option's help appears in `--help`
    (a command's own text too: `serve`'s said "pip install 'siglip-cli'")."""
    import re

    import typer.main

    from siglip_cli.cli import app

    for name, command in typer.main.get_command(app).commands.items():
        shown = re.sub(r"[\s\u2502]+", "", cli(name, "--help").stdout)
        for help in [command.help] + [getattr(param, "help", None) for param in command.params]:
            text = (help or "").replace("\\[", "[")
            for piece in re.findall(r"\S*\[[^\]]*\]\S*", text):
                assert re.sub(r"\s+", "", piece) in shown, (name, piece)


def test_console_script_installed():
    exe = shutil.which("siglip", path=os.path.dirname(sys.executable))
    assert exe, "pip install -e . should install a `siglip` console script"
    result = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("siglip ")


def test_a_usage_error_is_plain_text_with_the_message_on_one_line(library):
    """As a script's log keeps it: click's plain usage lines and "Error: ..." on one line, exit 2 (a box drawn
    to the terminal's width wrapped the message and filled logs with box art)."""
    result = run_siglip("embed", library / "a.png", "-o", "")
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith("Error: Invalid value for '--output' / '-o': an empty name")
    )
    assert "╭" not in result.stderr and "│" not in result.stderr and result.stdout == ""
    assert run_siglip("--version").returncode == 0 and run_siglip("embed", "-h").returncode == 0


def test_what_the_command_line_gives_is_checked_before_anything_loads(cli, fixed_ckpt, library, tmp_path):
    """A --files-from that cannot be read, a NUL-separated list, text or labels that are not UTF-8, an empty
    label, index options with texts: one line each (they were tracebacks, or silently ignored)."""
    nul = tmp_path / "nul.txt"
    nul.write_bytes(bytes(library / "a.png") + b"\0" + bytes(library / "b.jpg") + b"\0")
    for args, said in (
        (["embed", "--files-from", tmp_path / "none.txt"], "cannot read --files-from"),
        (["embed", "--files-from", library], "cannot read --files-from"),  # a folder
        (["embed", "--files-from", nul], "a NUL byte"),
        (["embed", "--text", "caf\udce9"], "--text 'caf?' is not UTF-8 text"),
        (["search", tmp_path / "index.parquet", "caf\udce9"], "query 'caf?' is not UTF-8 text"),
        (["search", tmp_path / "index.parquet", "dog", "--minus", "caf\udce9"], "--minus 'caf?' is not UTF-8 text"),
        (["classify", library / "a.png", "--labels", "caf\udce9,dog"], "is not UTF-8 text"),
        (["classify", library / "a.png", "--labels", "dog,,cat"], "an empty label"),
        (["embed", "--text", "a cat", "--prune"], "--prune works on images"),
        (["embed", "--text", "a cat", "--quantize", "int8"], "--quantize works on images"),
    ):
        result = cli(*args, "-o", tmp_path / "o.parquet", "-m", fixed_ckpt)
        assert result.exit_code == 2 and said in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and not (tmp_path / "o.parquet").exists()


def test_labels_are_taken_as_given_and_texts_keep_the_backend(cli, fixed_ckpt, library, tmp_path):
    got = cli(
        "classify", library / "a.png", "--labels", "#1,#2", "-o", "-", "-m", fixed_ckpt, "-j", "0", "--top-k", "2", "-q"
    )
    assert got.exit_code == 0, got.stderr  # labels, not comments (a file's '#' lines are)
    assert {t["label"] for t in json.loads(got.stdout)["top_k"]} == {"#1", "#2"}
    out = tmp_path / "t.parquet"
    assert cli("embed", "--text", "a cat", "-o", out, "-m", fixed_ckpt, "--backend", "torch").exit_code == 0
    assert json.loads(pq.read_schema(out).metadata[b"siglip"])["text_backend"] == "torch"


def test_stdout_has_one_row_per_file_however_often_it_is_named(cli, fixed_ckpt, library, tmp_path, monkeypatch):
    monkeypatch.chdir(library)
    listed = tmp_path / "twice.txt"
    listed.write_text("a.png\n./a.png\n")
    got = cli("embed", "a.png", library / "a.png", "--files-from", listed, "-o", "-", "-m", fixed_ckpt, "-j", "0", "-q")
    assert got.exit_code == 0 and len(got.stdout.splitlines()) == 1


def test_a_model_folder_that_is_not_there_is_one_line(cli, tmp_path):
    make_image(tmp_path / "a.jpg")
    for model in ("./no/such/ckpt", str(tmp_path / "gone"), "ckpts/siglip/"):
        r = cli("embed", tmp_path / "a.jpg", "-o", tmp_path / "o.parquet", "-m", model)
        assert r.exit_code == 1 and r.stderr.strip() == f"siglip: error: --model {model}: that folder does not exist"
    assert not (tmp_path / "o.parquet").exists()


def test_outputs_record_the_versions_that_made_them_and_a_major_change_is_told_once(cli, fixed_ckpt, tmp_path):
    import importlib.metadata

    make_image(tmp_path / "lib" / "a.jpg")
    out = tmp_path / "o.parquet"
    args = ["-o", out, "-m", fixed_ckpt, "--backend", "torch", "-q"]
    assert cli("embed", tmp_path / "lib", *args).exit_code == 0
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"siglip"])
    assert meta["versions"] == {p: importlib.metadata.version(p) for p in ("torch", "transformers")}
    # as if the index had been made under transformers 4
    meta["versions"]["transformers"] = "4.57.6"
    pq.write_table(table.replace_schema_metadata({b"siglip": json.dumps(meta).encode()}), out)
    make_image(tmp_path / "lib" / "b.jpg", color=(0, 0, 250))
    r = cli("embed", tmp_path / "lib", *args)
    assert r.exit_code == 0 and r.stderr.count("other major versions (transformers 4.57.6 -> ") == 1
    assert pq.read_table(out).num_rows == 2
    r = cli("embed", tmp_path / "lib", *args)  # its newest rows are of these versions now: nothing to say
    assert r.exit_code == 0 and "major versions" not in r.stderr
