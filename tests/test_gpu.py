"""The GPU checklist: run `pytest -m gpu -s` on a machine with CUDA before a release (skipped without it).

What a CPU cannot reach: parity on CUDA in float32 and bfloat16 for both layouts, a GPU other than the first
(whose copies must be awaited on that GPU's own stream), --compile, tag scores against the float32 formula,
the out-of-memory fallback on a real device, the order of rows over all GPUs, and bench numbers.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import reference_image_embeddings, run_siglip, table, tight_memory

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def cosines(out, ckpt) -> np.ndarray:
    got = table(out)
    assert set(got["status"]) == {"ok"}
    return (np.array(got["embedding"]) * reference_image_embeddings(ckpt, got["path"])).sum(axis=1)


@pytest.mark.parametrize("dtype, floor", [("float32", 0.9999), ("bfloat16", 0.999)])
def test_cuda_parity(cli, ckpt, photos, tmp_path, dtype, floor):
    out = tmp_path / "o.parquet"
    # batches of 8: many batches in flight, so a copy read before it lands would show as a wrong row
    result = cli("embed", photos, "-o", out, "-m", ckpt, "--device", "cuda:0", "--dtype", dtype, "-b", "8", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(pq.read_schema(out).metadata[b"siglip"])["dtype"] == dtype
    assert cosines(out, ckpt).min() >= floor


@pytest.mark.skipif(GPUS < 2, reason="needs a second GPU")
def test_second_gpu_gives_right_rows(cli, ckpt, photos, tmp_path):
    """The defect of issue 12: on cuda:1 the event was recorded on GPU 0, and rows were read before they landed."""
    out = tmp_path / "o.parquet"
    result = cli("embed", photos, "-o", out, "-m", ckpt, "--device", "cuda:1", "--dtype", "float32", "-b", "8", "-q")
    assert result.exit_code == 0, result.stderr
    assert cosines(out, ckpt).min() >= 0.9999


@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs")
def test_all_gpus_keep_the_input_order(cli, ckpt, photos, tmp_path):
    one, every = tmp_path / "one.parquet", tmp_path / "every.parquet"
    args = ["-m", ckpt, "--dtype", "float32", "-b", "8", "-q"]
    assert cli("embed", photos, "-o", one, "--device", "cuda:0", *args).exit_code == 0
    assert cli("embed", photos, "-o", every, "--device", "cuda", *args).exit_code == 0
    a, b = table(one), table(every)
    assert a["path"] == b["path"]
    assert (np.array(a["embedding"]) * np.array(b["embedding"])).sum(axis=1).min() >= 0.9999


def test_cuda_compile(cli, fixed_ckpt, photos, tmp_path):
    out = tmp_path / "o.parquet"
    result = cli(
        "embed",
        photos,
        "-o",
        out,
        "-m",
        fixed_ckpt,
        "--device",
        "cuda",
        "--dtype",
        "float32",
        "--compile",
        "-b",
        "16",
        "-q",
    )
    assert result.exit_code == 0, result.stderr
    assert cosines(out, fixed_ckpt).min() >= 0.9999


def test_cuda_bfloat16_tag_scores_use_the_float32_formula(cli, fixed_ckpt, photos, tmp_path):
    tags = ["fish", "bird", "snake", "dog"]
    (tmp_path / "v.txt").write_text("\n".join(tags))
    out, texts = tmp_path / "t.parquet", tmp_path / "texts.parquet"
    common = ["-m", fixed_ckpt, "--device", "cuda", "--dtype", "bfloat16"]
    assert (
        cli(
            "tag",
            photos,
            "--vocab",
            tmp_path / "v.txt",
            "--threshold",
            "0",
            "--with-embeddings",
            "--no-cache",
            "-o",
            out,
            *common,
            "-q",
        ).exit_code
        == 0
    )
    prompts = [a for t in tags for a in ("--text", f"This is a photo of {t}.")]
    assert cli("embed", *prompts, "-o", texts, *common).exit_code == 0
    meta = json.loads(pq.read_schema(out).metadata[b"siglip"])
    got = table(out)
    img, txt = np.array(got["embedding"]), np.array(table(texts)["embedding"])
    want = 1 / (1 + np.exp(-(img @ txt.T * meta["logit_scale"] + meta["logit_bias"])))
    scores = np.array([[{t["tag"]: t["score"] for t in row}[tag] for tag in tags] for row in got["tags"]])
    np.testing.assert_allclose(scores, want, atol=1e-3)  # bf16 text embeddings on the GPU, float32 formula


def test_cuda_out_of_memory_fallback(cli, fixed_ckpt, photos, tmp_path, monkeypatch):
    tight_memory(monkeypatch, fits=5)
    out = tmp_path / "o.parquet"
    result = cli(
        "embed", photos, "-o", out, "-m", fixed_ckpt, "--device", "cuda", "--dtype", "float32", "-b", "16", "-q"
    )
    assert result.exit_code == 0, result.stderr
    assert "ran out of memory at batch size 16; going on in batches of 4" in result.stderr
    assert cosines(out, fixed_ckpt).min() >= 0.9999


def test_bench_numbers(cli, photos):
    """A smoke test that prints what this GPU does with a real-size model (random weights)."""
    result = cli("bench", photos, "--arch", "base-patch16-224", "--device", "cuda", "-n", "1024", "--json")
    assert result.exit_code == 0, result.stderr
    print(result.stdout)
    numbers = json.loads(result.stdout)
    assert numbers["device"] == torch.cuda.get_device_name(0) and numbers["dtype"] in ("bfloat16", "float16")
    assert numbers["ceiling"] > 0 and numbers["end_to_end"] > 0


def test_ray_puts_one_gpu_under_each_actor_and_writes_the_local_rows(photos, fixed_ckpt, tmp_path):
    """--ray local on this machine's GPUs: each actor on a GPU, --dtype auto as a local run picks it, right rows."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    for out, more in ((tmp_path / "local.parquet", []), (tmp_path / "ray.parquet", ["--ray", "local"])):
        done = run_siglip("embed", photos, "-m", fixed_ckpt, "-o", out, *more)
        assert done.returncode == 0, done.stderr
    local, ray = (json.loads(pq.read_schema(tmp_path / f"{n}.parquet").metadata[b"siglip"]) for n in ("local", "ray"))
    assert ray["dtype"] == local["dtype"] and ray["signature"] == local["signature"]
    assert cosines(tmp_path / "ray.parquet", fixed_ckpt).min() >= (0.9999 if ray["dtype"] == "float32" else 0.999)
