"""`siglip bench` runs on any machine: random-weight architectures, JSON for machines, a table for people."""

import json

import pytest


def test_bench_json_with_tag(cli, tmp_path):
    vocab = tmp_path / "v.txt"
    vocab.write_text("red\nsky\ncat\n")
    result = cli(
        "bench",
        "--arch",
        "tiny",
        "--device",
        "cpu",
        "-n",
        "64",
        "-j",
        "1",
        "--seconds",
        "0.2",
        "--vocab",
        vocab,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["model"] == "random:tiny" and out["images"] == 64 and out["generated_images"]
    for key in ("ceiling", "decode", "end_to_end", "tag"):
        assert out[key] > 0
    assert out["ratio"] == pytest.approx(out["end_to_end"] / out["ceiling"], abs=0.005)  # from unrounded rates


def test_bench_table_on_given_images(cli, fixed_ckpt, photos):
    result = cli("bench", photos, "-m", fixed_ckpt, "--device", "cpu", "-n", "32", "-j", "0", "--seconds", "0.2")
    assert result.exit_code == 0, result.stderr
    assert "| hardware | model |" in result.stdout and "32 distinct files" in result.stdout  # of 125, -n 32


def test_bench_measures_only_images_that_decode(cli, fixed_ckpt, photos, tmp_path):
    """Images given of which none decodes (or a folder that is not there) are a usage error: it timed error
    rows, or silently timed generated photos instead; the ones that do not decode among good ones are left
    out, with a note."""
    bad = tmp_path / "bad"
    bad.mkdir()
    good = sorted(photos.glob("*.JPEG"))[0]
    (bad / "cut.jpg").write_bytes(good.read_bytes()[:2000])
    (bad / "junk.png").write_bytes(b"not an image")
    for given, said in ((tmp_path / "missing", "no such file or folder"), (bad, "can be decoded")):
        result = cli("bench", given, "-m", fixed_ckpt, "--device", "cpu", "-n", "8", "--seconds", "0.1")
        assert result.exit_code == 2 and said in result.stderr, result.stderr
    (bad / "good.jpg").write_bytes(good.read_bytes())
    result = cli("bench", bad, "-m", fixed_ckpt, "--device", "cpu", "-n", "8", "-j", "0", "--seconds", "0.1", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["distinct_files"] == 1 and not out["generated_images"] and "2 of the images given" in result.stderr


def test_bench_unknown_arch_exits_2(cli):
    result = cli("bench", "--arch", "huge-patch3")
    assert result.exit_code == 2 and "unknown architecture" in result.stderr


def test_bench_backends_side_by_side(cli, photos, tmp_path):
    vocab = tmp_path / "v.txt"
    vocab.write_text("red\nsky\ncat\ndog\ntree\ncar\nbeach\nsnow\n")
    result = cli(
        "bench",
        photos,
        "--arch",
        "tiny",
        "--backends",
        "-n",
        "16",
        "-j",
        "1",
        "--seconds",
        "0.2",
        "--vocab",
        vocab,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    rows = {(v["backend"], v["dtype"], v["quantize"]): v for v in out["variants"]}
    first = out["variants"][0]
    assert (first["backend"], first["dtype"], first["quantize"]) == ("torch", "float32", "none")
    assert first["min_cos"] == 1.0 and first["vs_float32"] == 1.0 and first["top5_same"] == 1.0
    assert all(0 <= v["top5_same"] <= 1 for v in rows.values())
    assert all(v["tower"] > 0 and v["end_to_end"] > 0 and -1 <= v["min_cos"] <= 1 for v in rows.values())
    try:
        import openvino  # noqa: F401
    except ImportError:
        return
    assert rows[("openvino", "float32", "none")]["min_cos"] >= 0.9999  # the same numbers, another runtime
    assert {q for _, _, q in rows} == {"none", "int8-weights", "int8", "int4"}


def test_bench_ends_on_sigterm_in_one_line_and_leaves_nothing(tmp_path):
    """SIGTERM (a timeout(1) around a long bench): exit 143 and one line, its folder of photos removed (it was
    killed by the signal, leaving the folder and leaked shared memory)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "siglip_cli",
            "bench",
            "--arch",
            "tiny",
            "--device",
            "cpu",
            "-n",
            "100000",
            "-j",
            "1",
            "--seconds",
            "0.2",
        ],
        env={**os.environ, "TMPDIR": str(tmp)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(tmp.glob("siglip-bench-*/*.jpg")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "siglip: terminated", err
    assert "leaked" not in err and not list(tmp.glob("siglip-bench-*"))
