"""Device handling that a CPU can reach: several devices fed from one decode pool, the out-of-memory fallback
(by injection), NaFlex masks decided on the host, `siglip doctor`. The device lists and dtype auto by capability
are resolved in tests/unit/test_device_choice.py; the CUDA paths themselves are checked by tests/test_gpu.py
(pytest -m gpu)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from siglip_cli.model import Encoder

from helpers import reference_image_embeddings, table, tight_memory

TORCH = ["--backend", "torch", "--dtype", "float32"]


# -- several devices --------------------------------------------------------------------------------------
@pytest.fixture
def lanes(monkeypatch):
    """The threads and devices that encoded batches."""
    seen = []
    clean = Encoder.encode_images

    def spy(self, batch):
        seen.append((threading.current_thread().name, str(self.device)))
        return clean(self, batch)

    monkeypatch.setattr(Encoder, "encode_images", spy)
    return seen


def test_several_devices_give_the_rows_of_one(cli, ckpt, photos, tmp_path, lanes):
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    assert cli("embed", photos, "-o", one, "-m", ckpt, "--device", "cpu", "-b", "8", *TORCH, "-q").exit_code == 0
    lanes.clear()
    result = cli("embed", photos, "-o", two, "-m", ckpt, "--device", "cpu,cpu", "-b", "8", *TORCH, "-q")
    assert result.exit_code == 0, result.stderr
    assert len({name for name, _ in lanes}) == 2  # both encoders had batches, each from its own thread
    a, b = table(one), table(two)
    assert a["path"] == b["path"] and len(a["path"]) == 125
    assert a["status"] == b["status"]
    np.testing.assert_allclose(np.array(a["embedding"]), np.array(b["embedding"]), atol=1e-6)


def test_several_devices_tag_like_one(cli, fixed_ckpt, photos, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\ndog\ncar\ntree\nsky\nperson\n")
    outs = []
    for device in ("cpu", "cpu,cpu"):
        outs.append(tmp_path / f"{device}.parquet")
        result = cli(
            "tag",
            photos,
            "--vocab",
            vocab,
            "-o",
            outs[-1],
            "-m",
            fixed_ckpt,
            "--device",
            device,
            "-b",
            "8",
            "--all-scores",
            "--threshold",
            "0",
            *TORCH,
            "-q",
        )
        assert result.exit_code == 0, result.stderr
    a, b = table(outs[0]), table(outs[1])
    assert a["path"] == b["path"] and [t[0]["tag"] for t in a["tags"]] == [t[0]["tag"] for t in b["tags"]]
    np.testing.assert_allclose(np.array(a["scores"], np.float32), np.array(b["scores"], np.float32), atol=1e-3)


def test_bad_device_is_a_usage_error(cli):
    result = cli("embed", "x.jpg", "--device", "gpu0")
    assert result.exit_code == 2 and "cuda:0,cuda:1" in result.stderr


# -- out of memory ----------------------------------------------------------------------------------------
def test_out_of_memory_halves_the_batch_and_goes_on(cli, ckpt, photos, tmp_path, monkeypatch):
    free, tight = tmp_path / "free.parquet", tmp_path / "tight.parquet"
    assert cli("embed", photos, "-o", free, "-m", ckpt, "--device", "cpu", "-b", "16", *TORCH, "-q").exit_code == 0
    sizes = tight_memory(monkeypatch, fits=5)
    result = cli("embed", photos, "-o", tight, "-m", ckpt, "--device", "cpu", "-b", "16", *TORCH, "-q")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("ran out of memory") == 1
    assert "at batch size 16; going on in batches of 4" in result.stderr
    assert sizes[:3] == [16, 8, 4] and max(sizes[3:]) == 4  # redone at 4, and every later batch in chunks of 4
    a, b = table(free), table(tight)
    assert a["path"] == b["path"] and set(b["status"]) == {"ok"}
    np.testing.assert_allclose(np.array(a["embedding"]), np.array(b["embedding"]), atol=1e-5)


def test_one_image_that_does_not_fit_is_one_line(cli, fixed_ckpt, photos, tmp_path, monkeypatch):
    tight_memory(monkeypatch, fits=0)
    result = cli("embed", photos, "-o", tmp_path / "o.parquet", "-m", fixed_ckpt, "--device", "cpu", *TORCH, "-q")
    assert result.exit_code == 1
    assert "one image does not fit in the memory of cpu" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- NaFlex masks -----------------------------------------------------------------------------------------
def test_naflex_needs_no_mask_from_the_device(cli, naflex_ckpt, tmp_path, monkeypatch):
    """A batch whose images all fill their patches runs with no mask (the host knows; the device is not asked);
    any other with the documented 2-D (n, patches) mask. Either way the embeddings equal transformers' own."""
    from transformers import Siglip2VisionModel

    lib = tmp_path / "lib"
    lib.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a_square", (96, 96)), ("b_square", (200, 200)), ("c_square", (64, 64)), ("d_wide", (300, 90))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(lib / f"{name}.png")
    masks, clean = [], Siglip2VisionModel.forward

    def spy(self, *args, pixel_attention_mask=None, **kw):
        masks.append(None if pixel_attention_mask is None else tuple(pixel_attention_mask.shape))
        return clean(self, *args, pixel_attention_mask=pixel_attention_mask, **kw)

    monkeypatch.setattr(Siglip2VisionModel, "forward", spy)
    out = tmp_path / "o.parquet"
    assert cli("embed", lib, "-o", out, "-m", naflex_ckpt, "--device", "cpu", "-b", "2", *TORCH, "-q").exit_code == 0
    assert masks == [None, (2, 256)]
    got = table(out)
    cos = (np.array(got["embedding"]) * reference_image_embeddings(naflex_ckpt, got["path"])).sum(axis=1)
    assert cos.min() >= 0.9999


# -- doctor -----------------------------------------------------------------------------------------------
def test_doctor_reports_what_auto_would_pick(cli, fixed_ckpt):
    from siglip_cli.devices import cpu_bf16_native

    result = cli("doctor", "-m", fixed_ckpt, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["packages"]["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert report["auto"]["devices"] == ["cpu"] and report["cuda"] == []
        assert report["auto"]["dtype"] == ("bfloat16" if cpu_bf16_native() else "float32")
    assert report["model"]["status"] == "a local folder"
    assert report["cpu"]["usable"] >= 1 and "siglip" in report["caches"]
    from siglip_cli.encoders.openvino import int8_native

    assert report["cpu"]["int8_native"] == int8_native()
    screen = cli("doctor", "-m", "nobody/not-a-model").stdout
    assert "auto picks: --device" in screen and "not in the Hub cache" in screen
    assert f"int8 dot products (--quantize int8 faster): {'yes' if int8_native() else 'no'}" in screen


def test_doctor_says_the_backend_a_naflex_run_uses(cli, fixed_ckpt, naflex_ckpt, tmp_path):
    """auto runs NaFlex checkpoints on torch whatever the CPU: doctor says what a run records (it said
    openvino); and a file given as the model is not a model."""
    from siglip_cli.encoders.openvino import available

    for ckpt, expected in (
        (naflex_ckpt, "torch"),
        (fixed_ckpt, "openvino" if available() and not torch.cuda.is_available() else None),
    ):
        report = json.loads(cli("doctor", "-m", ckpt, "--json").stdout)
        if expected:
            assert report["auto"]["backend"] == expected, (ckpt.name, report["auto"])
    stray = tmp_path / "index.parquet"
    stray.write_bytes(b"PAR1")
    assert "a file, not a model" in cli("doctor", "-m", stray).stdout
