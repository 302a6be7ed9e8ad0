"""Parity with the reference: transformers' AutoProcessor + AutoModel on the same images and texts."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from helpers import reference_image_embeddings

pytestmark = pytest.mark.deps  # also run on the lowest declared versions (.ci/lowest.txt)

TEXTS = [
    "a red car",
    "This is a photo of a Great Grey Owl.",
    "two dogs playing in the snow",
    "",
    "A Photo, of: my_dog!",
]
# as SigLIP was trained on them (open_clip's canonicalize), written out by hand
CANONICAL = [
    "a red car",
    "this is a photo of a great grey owl",
    "two dogs playing in the snow",
    "",
    "a photo of my dog",
]


def reference_text_embeddings(ckpt, texts) -> np.ndarray:
    """The transformers model on the texts as given: right-padded to 64, no attention mask."""
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(ckpt)
    model = AutoModel.from_pretrained(ckpt).eval()
    tokens = processor(
        text=list(texts),
        padding="max_length",
        max_length=64,
        truncation=True,
        padding_side="right",
        return_tensors="pt",
    )
    with torch.no_grad():
        feats = model.get_text_features(input_ids=tokens["input_ids"]).pooler_output
    return torch.nn.functional.normalize(feats, dim=-1).numpy()


def embeddings(path) -> np.ndarray:
    return np.stack(pq.read_table(path).column("embedding").to_numpy(zero_copy_only=False))


def test_image_embeddings_match_reference(cli, any_ckpt, photos, tmp_path):
    ckpt = any_ckpt
    out = tmp_path / "out.parquet"
    result = cli("embed", photos, "-o", out, "-m", ckpt, "--device", "cpu", "--dtype", "float32", "-j", "2", "-b", "24")
    assert result.exit_code == 0, result.stderr
    table = pq.read_table(out)
    paths = table.column("path").to_pylist()
    assert paths == sorted(str(p) for p in photos.glob("*.JPEG"))
    assert set(table.column("status").to_pylist()) == {"ok"}
    ours = embeddings(out)
    ref = reference_image_embeddings(ckpt, paths)
    cos = (ours * ref).sum(axis=1)
    assert cos.min() >= 0.9999, f"worst cosine {cos.min():.6f} at {paths[int(cos.argmin())]}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("rules", ["canonical", "lower"])
def test_text_embeddings_match_reference(cli, any_ckpt, tmp_path, rules):
    """canonical (the default): the reference of the text as SigLIP was trained on it ("A Photo, of: my_dog!" is
    "a photo of my dog"); lower: the reference of the text lowercased, as transformers' tokenizers alone."""
    ckpt = any_ckpt
    out = tmp_path / "texts.parquet"
    args = [a for t in TEXTS for a in ("--text", t)]
    result = cli("embed", *args, "-o", out, "-m", ckpt, "--device", "cpu", "--dtype", "float32", "--text-rules", rules)
    assert result.exit_code == 0, result.stderr
    table = pq.read_table(out)
    assert table.column("text").to_pylist() == TEXTS
    assert json.loads(table.schema.metadata[b"siglip"])["text_rules"] == rules
    given = CANONICAL if rules == "canonical" else [t.lower() for t in TEXTS]
    cos = (embeddings(out) * reference_text_embeddings(ckpt, given)).sum(axis=1)
    assert cos.min() >= 0.9999


def test_text_is_lowercased_but_kept_as_written(cli, fixed_ckpt, tmp_path):
    """The tiny tokenizer tells cases apart, so equal embeddings prove the prompt was lowercased."""
    out = tmp_path / "t.parquet"
    assert cli("embed", "-t", "A Red CAR", "-t", "a red car", "-o", out, "-m", fixed_ckpt).exit_code == 0
    table = pq.read_table(out)
    assert table.column("text").to_pylist() == ["A Red CAR", "a red car"]
    upper, lower = embeddings(out)
    np.testing.assert_allclose(upper, lower, atol=1e-6)


def test_naflex_size_matches_transformers(naflex_ckpt):
    """Our NaFlex grid equals the one transformers' processor gives (its public output, spatial_shapes)."""
    from transformers import AutoImageProcessor

    from siglip_cli.decode import naflex_size

    processor = AutoImageProcessor.from_pretrained(naflex_ckpt)
    for h, w in [(375, 500), (500, 375), (2, 2), (1200, 900), (17, 2000), (64, 64)]:
        image = Image.new("RGB", (w, h), (10, 20, 30))
        for patches in (64, 256, 1024):
            grid = processor(images=[image], max_num_patches=patches, return_tensors="pt")["spatial_shapes"][0]
            assert naflex_size(h, w, 16, patches) == (int(grid[0]) * 16, int(grid[1]) * 16), (h, w, patches)
