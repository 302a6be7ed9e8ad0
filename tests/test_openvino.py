"""The OpenVINO backend: the same embeddings as torch float32, a cache that spares the conversion, quantization
that is recorded and never mixed into an index made without it."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.deps  # also run on the lowest declared versions (.ci/lowest.txt)

pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'siglip-cli[openvino]')")


def vectors(path) -> np.ndarray:
    return np.stack(pq.read_table(path).column("embedding").to_numpy(zero_copy_only=False))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGLIP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_openvino_matches_torch_float32(cli, ckpt, photos, tmp_path, cache):
    paths = sorted(photos.glob("*.JPEG"))[:40]
    torch_out, ov_out = tmp_path / "torch.parquet", tmp_path / "ov.parquet"
    assert cli("embed", *paths, "-o", torch_out, "-m", ckpt, "--backend", "torch", "--dtype", "float32").exit_code == 0
    result = cli("embed", *paths, "-o", ov_out, "-m", ckpt, "--backend", "openvino", "--dtype", "float32", "-b", "7")
    assert result.exit_code == 0, result.stderr
    meta = json.loads(pq.read_schema(ov_out).metadata[b"siglip"])
    if ckpt.name.startswith("siglip-naflex"):  # documented fallback: a note, and torch's rows
        assert "NaFlex checkpoints (variable patch grids) run on torch" in result.stderr
        assert meta["backend"] == "torch"
    else:
        assert meta["backend"] == "openvino" and meta["dtype"] == "float32"
    cos = (vectors(torch_out) * vectors(ov_out)).sum(axis=1)
    assert cos.min() >= 0.9999, cos.min()


def test_converted_tower_is_cached(cli, fixed_ckpt, photos, tmp_path, cache):
    paths = sorted(photos.glob("*.JPEG"))[:4]
    first = cli("embed", *paths, "-o", tmp_path / "a.parquet", "-m", fixed_ckpt, "--backend", "openvino")
    assert first.exit_code == 0 and "converted the image tower for OpenVINO" in first.stderr
    assert list(cache.glob("openvino/*/image.xml")) and list(cache.glob("openvino/*/image.bin"))
    second = cli("embed", *paths, "-o", tmp_path / "b.parquet", "-m", fixed_ckpt, "--backend", "openvino")
    assert second.exit_code == 0 and "converted the image tower" not in second.stderr  # read from the cache
    np.testing.assert_array_equal(vectors(tmp_path / "a.parquet"), vectors(tmp_path / "b.parquet"))


@pytest.mark.parametrize("mode", ["int8", "int8-weights", "int4"])
def test_quantized_runs_are_recorded_and_never_mixed(cli, fixed_ckpt, photos, tmp_path, cache, mode):
    paths = sorted(photos.glob("*.JPEG"))[:16]
    plain, quantized = tmp_path / "plain", tmp_path / "q"
    assert cli("embed", *paths, "-o", plain, "-m", fixed_ckpt, "--dtype", "float32").exit_code == 0
    result = cli("embed", *paths, "-o", quantized, "-m", fixed_ckpt, "--dtype", "float32", "--quantize", mode)
    assert result.exit_code == 0, result.stderr
    meta = json.loads(pq.read_schema(next(quantized.glob("*.parquet"))).metadata[b"siglip"])
    assert meta["quantize"] == mode and meta["signature"]["quantize"] == mode
    cos = (vectors(plain) * vectors(quantized)).sum(axis=1)
    assert cos.mean() > 0.9 and cos.min() < 1.0  # close to float32, and really quantized
    mixed = cli("embed", *paths, "-o", plain, "-m", fixed_ckpt, "--dtype", "float32", "--quantize", mode)
    assert mixed.exit_code == 1 and f"quantize: 'none' there, '{mode}' now" in mixed.stderr
    back = cli("embed", *paths, "-o", quantized, "-m", fixed_ckpt, "--dtype", "float32")
    assert back.exit_code == 1 and f"quantize: '{mode}' there, 'none' now" in back.stderr


@pytest.mark.parametrize("int8_dot_products", [True, False])
def test_quantize_auto_is_int8_only_where_the_cpu_has_int8_dot_products(
    cli, ckpt, photos, tmp_path, cache, monkeypatch, int8_dot_products
):
    """auto is recorded as what it became (int8, held to its bound as int8 is; or none): NaFlex checkpoints, which
    run on torch, are none wherever they run, without a note about it."""
    from siglip_cli import compat

    monkeypatch.setattr(compat, "cpu_int8_native", lambda: int8_dot_products)
    paths = sorted(photos.glob("*.JPEG"))[:16]
    out = tmp_path / "auto"
    result = cli("embed", *paths, "-o", out, "-m", ckpt, "--dtype", "float32", "--quantize", "auto")
    assert result.exit_code == 0, result.stderr
    meta = json.loads(pq.read_schema(next(out.glob("*.parquet"))).metadata[b"siglip"])
    became = "int8" if int8_dot_products and "naflex" not in ckpt.name else "none"
    assert meta["signature"]["quantize"] == became and "NaFlex" not in result.stderr
    again = cli("embed", *paths, "-o", out, "-m", ckpt, "--dtype", "float32", "--quantize", became)
    assert again.exit_code == 0 and "16 unchanged" in again.stderr  # the same setting as naming it


def test_int8_is_held_to_its_bound_on_other_photos_of_the_run(cli, fixed_ckpt, photos, tmp_path, cache):
    """Calibrated on the first 64 photos, checked against float32 on the next: kept, or int8 weights only, or
    float, said on stderr and in the metadata; never vectors under the bound silently. A later run reuses the
    decision (no second calibration) and records it the same."""
    paths = sorted(photos.glob("*.JPEG"))[:100]
    plain = tmp_path / "plain.parquet"
    assert (
        cli("embed", *paths, "-o", plain, "-m", fixed_ckpt, "--dtype", "float32", "--backend", "torch").exit_code == 0
    )
    for bound, used in (("0.9,0.5", {"int8"}), ("1,1", {"none"})):
        out = tmp_path / f"q{bound}.parquet"
        args = ["-m", fixed_ckpt, "--dtype", "float32", "--quantize", "int8", "--int8-bound", bound]
        r = cli("embed", *paths, "-o", out, *args)
        assert r.exit_code == 0 and "int8 checked against float32 on 32 photos (other photos of the run)" in r.stderr
        check = json.loads(pq.read_schema(out).metadata[b"siglip"])["quantize_check"]
        assert (
            check["used"] in used and check["photos"] == 32 and check["bound"] == [float(x) for x in bound.split(",")]
        )
        cos = (vectors(plain) * vectors(out)).sum(axis=1)
        if check["used"] == "none":  # every rung below the bound: float, as float32 computes it
            assert "runs in float" in r.stderr and cos.min() >= 0.9999
        again = cli("embed", *paths, "-o", tmp_path / f"again{bound}.parquet", *args)
        assert again.exit_code == 0 and "int8 checked" not in again.stderr
        assert (
            json.loads(pq.read_schema(tmp_path / f"again{bound}.parquet").metadata[b"siglip"])["quantize_check"]
            == check
        )
    bad = cli("embed", *paths[:1], "-o", "-", "-m", fixed_ckpt, "--quantize", "int8", "--int8-bound", "0.9")
    assert bad.exit_code == 2 and "MEAN,LEAST" in bad.stderr


def test_quantize_needs_openvino_on_a_cpu(cli, fixed_ckpt, photos, tmp_path):
    result = cli(
        "embed",
        sorted(photos.glob("*.JPEG"))[0],
        "-o",
        tmp_path / "o.parquet",
        "-m",
        fixed_ckpt,
        "--backend",
        "torch",
        "--quantize",
        "int8",
    )
    assert result.exit_code == 1 and "--quantize int8 needs the OpenVINO backend" in result.stderr


def test_int8_calibrates_on_the_runs_first_photos(cli, fixed_ckpt, photos, tmp_path, cache, monkeypatch):
    """int8's activations are calibrated on the run's first CALIBRATION photos that decode, in batches of the
    graph's shape (one batch of 16 left the worst shared photo at cosine 0.94), and only when the tower is not
    already cached."""
    import nncf

    from siglip_cli.encoders.openvino import CALIBRATION

    seen, real = [], nncf.quantize

    def quantize(model, dataset, **kw):
        seen.append([np.array(x) for x in dataset.get_inference_data()])
        return real(model, dataset, **kw)

    monkeypatch.setattr(nncf, "quantize", quantize)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a photo")
    paths = [tmp_path / "broken.jpg", *sorted(photos.glob("*.JPEG"))[:18]]
    args = ["-m", fixed_ckpt, "--dtype", "float32", "--quantize", "int8", "-b", "4"]
    result = cli("embed", *paths, "-o", tmp_path / "a.parquet", *args)
    assert result.exit_code == 0, result.stderr
    assert len(seen) == 1 and CALIBRATION >= 18
    from siglip_cli.encoders.openvino import int8_native

    assert ("no int8 dot-product instructions" in result.stderr) == (not int8_native())  # said, where int8 is no faster
    items = seen[0]
    assert len(items) == 5 and all(x.shape == items[0].shape and x.shape[0] == 4 for x in items)  # 18 photos:
    # in batches of the run's size, though its first batch had 3 photos (the broken file is its fourth)
    photos_seen = np.concatenate(items)[:18]
    assert len({p.tobytes() for p in photos_seen}) == 18  # every photo, not the first batch again and again
    assert cli("embed", *paths, "-o", tmp_path / "b.parquet", *args).exit_code == 0
    assert len(seen) == 1  # the cached tower: no second calibration


WORDS = [
    "A photo of a DOG",
    "",
    "x" * 300,
    "naïve café 東京 🙂",
    "<pad> </s> <eos> <unk>",
    "  spaced   out ",
    "tab\tnew\nline",
]


def test_text_tower_matches_torch_and_is_cached(cli, any_ckpt, photos, tmp_path, cache):
    """tag's prompts through the OpenVINO text tower: torch float32's scores, the tokenizer's exact ids (odd
    texts too), converted once per model; SigLIP 1's sentencepiece tokenizer keeps the text tower on torch."""
    from siglip_cli.config import ModelConfig
    from siglip_cli.model import Encoder

    paths = sorted(photos.glob("*.JPEG"))[:6]
    vocab = tmp_path / "v.txt"
    vocab.write_text("".join(w.replace("\n", " ").replace("\t", " ").strip() + "\n" for w in WORDS if w.strip()))
    runs = {}
    for backend in ("torch", "openvino"):
        runs[backend] = out = tmp_path / f"{backend}.parquet"
        r = cli(
            "tag",
            *paths,
            "--vocab",
            vocab,
            "--threshold",
            "0",
            "-o",
            out,
            "-m",
            any_ckpt,
            "--backend",
            backend,
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--no-cache",
        )
        assert r.exit_code == 0, r.stderr
    v1 = any_ckpt.name.startswith("siglip-v1")
    meta = json.loads(pq.read_schema(runs["openvino"]).metadata[b"siglip"])
    assert meta["text_backend"] == ("torch" if v1 else "openvino")
    assert ("converted the text tower for OpenVINO" in r.stderr) is not v1

    def scores(path):
        return np.array(
            [
                [t["score"] for t in sorted(tags, key=lambda t: t["tag"])]
                for tags in pq.read_table(path).column("tags").to_pylist()
            ]
        )

    np.testing.assert_allclose(scores(runs["openvino"]), scores(runs["torch"]), atol=1e-5)
    again = cli(
        "tag",
        *paths,
        "--vocab",
        vocab,
        "-o",
        tmp_path / "again.parquet",
        "-m",
        any_ckpt,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--no-cache",
    )
    assert again.exit_code == 0 and "converted the text tower" not in again.stderr  # read from the cache

    ov = Encoder.load(ModelConfig(str(any_ckpt), device="cpu", dtype="float32"))
    pt = Encoder.load(ModelConfig(str(any_ckpt), device="cpu", dtype="float32", backend="torch"))
    a, b = ov.encode_texts(WORDS).numpy(), pt.encode_texts(WORDS).numpy()
    assert (a * b).sum(axis=1).min() >= 0.9999
    if not v1:
        from siglip_cli.text import prepare

        np.testing.assert_array_equal(ov.text_tower.tower.ids(prepare(WORDS)), pt.tokenize(WORDS).numpy())


def test_text_tower_stays_on_torch_without_the_memory_to_convert(fixed_ckpt, cache, monkeypatch, capsys):
    """Converting holds about two more copies of the weights: where that memory is not there, the run goes on
    with the torch text tower and says so, instead of being killed."""
    from siglip_cli.config import ModelConfig
    from siglip_cli.model import Encoder

    monkeypatch.setattr("siglip_cli.config.available_memory", lambda: 1)
    ov = Encoder.load(ModelConfig(str(fixed_ckpt), device="cpu", dtype="float32"))
    pt = Encoder.load(ModelConfig(str(fixed_ckpt), device="cpu", dtype="float32", backend="torch"))
    np.testing.assert_array_equal(ov.encode_texts(WORDS).numpy(), pt.encode_texts(WORDS).numpy())
    assert ov.text_backend == "torch" and "the text tower stays on torch" in capsys.readouterr().err
    assert not list(cache.glob("openvino/*/text.xml"))


def test_image_tower_runs_on_torch_without_the_memory_to_convert(cli, fixed_ckpt, photos, tmp_path, cache, monkeypatch):
    """Converting the image tower holds about 2.5 more copies of its weights (so400m's: 6.0 GB resident at the
    peak). Where that memory is not there, an unquantized run goes on with torch (a note, `backend` torch in the
    metadata, torch's numbers) instead of being killed every night at the same point; a quantized one stops
    before any work, with one line. Nothing is converted."""
    paths = sorted(photos.glob("*.JPEG"))[:6]
    pt, ov, q = tmp_path / "torch.parquet", tmp_path / "ov.parquet", tmp_path / "q.parquet"
    assert cli("embed", *paths, "-o", pt, "-m", fixed_ckpt, "--backend", "torch", "--dtype", "float32").exit_code == 0
    monkeypatch.setattr("siglip_cli.config.available_memory", lambda: 1)
    r = cli("embed", *paths, "-o", ov, "-m", fixed_ckpt, "--backend", "openvino", "--dtype", "float32")
    assert r.exit_code == 0 and "note: the image tower runs on torch: converting the image tower" in r.stderr
    assert json.loads(pq.read_schema(ov).metadata[b"siglip"])["backend"] == "torch"
    np.testing.assert_array_equal(vectors(pt), vectors(ov))
    r = cli("embed", *paths, "-o", q, "-m", fixed_ckpt, "--backend", "openvino", "--quantize", "int8")
    assert r.exit_code == 1 and "--quantize none" in r.stderr.strip().splitlines()[-1] and not q.exists()
    assert not list(cache.glob("openvino/*/image.xml"))


def test_nothing_is_sent_and_ctrl_c_waits_for_the_conversion(fixed_ckpt, tmp_path, cache):
    """A conversion sends no telemetry (OpenVINO's converter and NNCF send usage events unless opted out), and a
    Ctrl-C that arrives while a conversion's block runs (here at its start) is held until it ends, then raised as
    at any other time (in the converter's callbacks into Python it aborted the process). A signal arriving
    inside those callbacks is the end-to-end test's part: test_faults' Ctrl-C test signals a converting run.
    In a process of its own, as siglip runs (a second conversion in pytest's process, with duckdb loaded by
    another test module, crashed now and then)."""
    import subprocess
    import sys

    script = f"""
import signal
import siglip_cli.encoders.openvino as ovb, siglip_cli.encoders.openvino_text as ovt
import openvino.tools.ovc.telemetry_utils as t
ovb.import_nncf()  # as siglip imports it: its log (a version warning, say) off stdout
import nncf.telemetry.wrapper as w
from siglip_cli.config import ModelConfig
from siglip_cli.encoders import signals_held
from siglip_cli.model import Encoder

print(t.tm.__name__, type(w.telemetry).__name__)  # NNCF's stand-in is a MagicMock
encoder = Encoder.load(ModelConfig({str(fixed_ckpt)!r}, device="cpu", dtype="float32", backend="torch"))
inside = False
try:
    with signals_held():
        signal.raise_signal(signal.SIGINT)
        try:
            print("converted", ovt.convert_text(encoder, {str(tmp_path / "text")!r}))
        except KeyboardInterrupt:
            inside = True
except KeyboardInterrupt:
    print("interrupted after", "inside" if inside else "the conversion")
"""
    said = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert said.returncode == 0, said.stderr
    lines = said.stdout.split("\n")
    converter, nncf = lines[0].split()
    assert converter == "openvino.tools.ovc.telemetry_stub" and nncf != "NNCFTelemetry", said.stdout
    assert lines[1:3] == ["converted True", "interrupted after the conversion"], said.stdout
    assert (tmp_path / "text" / "text.json").exists()
    assert "stopping once this conversion ends" in said.stderr
