"""Text as SigLIP was trained on it: every text the model encodes is cleaned first (siglip_cli/text.py), token
for token as open_clip's `clean="canonicalize"` does, on every path."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from siglip_cli.config import ModelConfig
from siglip_cli.text import clean

from helpers import open_clip_tokenizer

pytestmark = pytest.mark.deps

AWKWARD = [
    "A Photo, of: my_dog!",
    "t-shirt",
    "This is a photo of a T-Shirt.",
    "rock & roll &amp;amp; jazz",
    "it&#39;s",
    "cafÃ© au lait",
    "  spaces\tand\nnewlines  ",
    "snake_case_tag",
    "emoji 🐶🌊 beach",
    "東京の夜景",
    "C++ (programming)",
    "¿qué?",
    "naïve café",
    "100% cotton",
    "",
    "...",
    "a " * 80 + "dog",
]


def encoder(ckpt, rules="canonical"):
    from siglip_cli.model import Encoder

    return Encoder.load(ModelConfig(str(ckpt), device="cpu", dtype="float32", backend="torch", text_rules=rules))


def test_token_ids_equal_open_clips_canonicalize(any_ckpt):
    oc = open_clip_tokenizer()
    reference = oc.HFTokenizer(str(any_ckpt), context_length=64, clean="canonicalize")
    ours = encoder(any_ckpt).tokenize(AWKWARD)
    theirs = reference(AWKWARD)
    for text, a, b in zip(AWKWARD, ours.tolist(), theirs.tolist()):
        assert a == b, text
    assert [clean(t) for t in AWKWARD] == [oc.get_clean_fn("canonicalize")(t) for t in AWKWARD]


def test_siglip1_token_ids_do_not_change(v1_ckpt):
    """SigLIP 1's tokenizer already drops punctuation and lowercases: on plain text the rules change nothing."""
    plain = ["A Photo, of: my dog!", "This is a photo of a T-Shirt.", "two dogs playing in the snow", "100% cotton"]
    assert encoder(v1_ckpt).tokenize(plain).tolist() == encoder(v1_ckpt, "lower").tokenize(plain).tolist()


def test_texts_are_padded_on_the_right_whatever_the_tokenizer_says(fixed_ckpt):
    """transformers 5's Siglip2Tokenizer declares left padding; pooling reads the last position, trained right."""
    e = encoder(fixed_ckpt)
    e.tokenizer.padding_side = "left"
    ids = e.tokenize(["a dog"])[0].tolist()
    pad = e.tokenizer.pad_token_id
    assert ids[0] != pad and ids[-1] == pad


def test_every_path_cleans_the_same_way(cli, fixed_ckpt, photos, tmp_path):
    """embed --text, tag prompts, classify labels and search queries: the messy spelling and the clean one give
    the same numbers (the tiny tokenizer tells punctuation and case apart, so only cleaning can make them equal)."""
    out = tmp_path / "t.parquet"
    assert cli("embed", "-t", "My_Dog!", "-t", "my dog", "-o", out, "-m", fixed_ckpt, "-q").exit_code == 0
    a, b = np.stack(pq.read_table(out).column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(a, b, atol=1e-6)
    paths = sorted(photos.glob("*.JPEG"))[:4]
    runs = {}
    for labels in ("Red_Car!,a (dog)", "red car,a dog"):
        r = cli("classify", *paths, "--labels", labels, "-o", "-", "-m", fixed_ckpt, "-q")
        assert r.exit_code == 0, r.stderr
        runs[labels] = [[t["score"] for t in json.loads(line)["top_k"]] for line in r.stdout.splitlines()]
    assert runs["Red_Car!,a (dog)"] == runs["red car,a dog"]
    index = tmp_path / "index.parquet"
    assert cli("embed", *paths, "-o", index, "-m", fixed_ckpt, "-q").exit_code == 0
    found = [cli("search", index, q, "--json", "--device", "cpu").stdout for q in ("A Red_Car!", "a red car")]
    assert found[0] == found[1] and found[0]


def test_outputs_of_other_text_rules_are_not_mixed(cli, fixed_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("SIGLIP_CACHE_DIR", str(tmp_path / "cache"))
    img = tmp_path / "lib" / "a.png"
    img.parent.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(img)
    (tmp_path / "v.txt").write_text("Red_Car\nsky\n")
    out = tmp_path / "tags.parquet"
    args = ["tag", img.parent, "--vocab", tmp_path / "v.txt", "-o", out, "-m", fixed_ckpt, "-q", "--threshold", "0"]
    assert cli(*args, "--text-rules", "lower").exit_code == 0
    r = cli(*args)  # the default rules: refused, as for any other setting
    assert r.exit_code == 1 and "text_rules: 'lower' there, 'canonical' now" in r.stderr
    # an output made before text rules were recorded was made by lowercasing: it continues under `lower`
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"siglip"])
    del meta["signature"]["text_rules"]
    pq.write_table(table.replace_schema_metadata({b"siglip": json.dumps(meta).encode()}), out)
    assert cli(*args, "--text-rules", "lower").exit_code == 0
    assert cli(*args, "--overwrite").exit_code == 0
    assert json.loads(pq.read_schema(out).metadata[b"siglip"])["signature"]["text_rules"] == "canonical"
    assert len(list((tmp_path / "cache" / "text").iterdir())) == 2  # one cache entry per rules
