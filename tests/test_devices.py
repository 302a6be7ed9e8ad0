"""Device handling that a CPU can reach: several devices fed from one decode pool, the out-of-memory fallback
(by injection), dtype auto by capability, NaFlex masks decided on the host, `siglip doctor`. The CUDA paths
themselves are checked by tests/test_gpu.py (pytest -m gpu)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from siglip_cli.errors import RunError
from siglip_cli.model import Encoder, resolve_devices, resolve_dtype

TORCH = ["--backend", "torch", "--dtype", "float32"]


def table(path) -> dict:
    t = pq.read_table(path)
    return {k: t.column(k).to_pylist() for k in t.column_names}


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


def test_device_lists_resolve(monkeypatch):
    assert resolve_devices("cpu,cpu") == [torch.device("cpu")] * 2
    if not torch.cuda.is_available():
        with pytest.raises(RunError, match="CUDA is not available"):
            resolve_devices("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    both = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert resolve_devices("cuda") == both and resolve_devices("auto") == both
    assert resolve_devices("cuda:1") == [torch.device("cuda", 1)]
    with pytest.raises(RunError, match="2 CUDA device"):
        resolve_devices("cuda:2")
    with pytest.raises(RunError, match="one kind"):
        resolve_devices("cuda:0,cpu")


def test_bad_device_is_a_usage_error(cli):
    result = cli("embed", "x.jpg", "--device", "gpu0")
    assert result.exit_code == 2 and "cuda:0,cuda:1" in result.stderr


# -- dtype auto -------------------------------------------------------------------------------------------
def test_auto_dtype_follows_the_gpus_capability(monkeypatch):
    caps = {0: (8, 0), 1: (7, 5)}  # an A100 and a T4
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: caps[torch.device(d).index])
    gpu = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert resolve_dtype("auto", gpu[:1]) == torch.bfloat16
    assert resolve_dtype("auto", gpu[1:]) == torch.float16
    assert resolve_dtype("auto", gpu) == torch.float16  # one dtype for all the rows of a run
    assert resolve_dtype("float32", gpu[1:]) == torch.float32


def test_auto_dtype_on_a_cpu(monkeypatch):
    import siglip_cli.model as model

    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(model, "cpu_bf16_native", lambda native=native: native)
        assert resolve_dtype("auto", [torch.device("cpu")]) == want


# -- out of memory ----------------------------------------------------------------------------------------
def tight_memory(monkeypatch, fits: int) -> list[int]:
    """The encoder raises CUDA's out-of-memory error for chunks of more than `fits` images."""
    sizes, clean = [], Encoder._encode

    def encode(self, args):
        sizes.append(len(args[0]))
        if len(args[0]) > fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return clean(self, args)

    monkeypatch.setattr(Encoder, "_encode", encode)
    return sizes


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


def test_mps_out_of_memory_is_recognized():
    from siglip_cli.encode import out_of_memory

    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)"))
    assert not out_of_memory(RuntimeError("shape mismatch"))


# -- NaFlex masks -----------------------------------------------------------------------------------------
def test_naflex_needs_no_mask_from_the_device(cli, naflex_ckpt, tmp_path, monkeypatch):
    """A batch whose images all fill their patches runs with no mask (the host knows; the device is not asked);
    any other with the documented 2-D (n, patches) mask. Either way the embeddings equal transformers' own."""
    from transformers import Siglip2VisionModel

    from test_parity import reference_image_embeddings

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
    from siglip_cli.model import cpu_bf16_native

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
