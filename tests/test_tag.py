"""`siglip tag` and `siglip classify`: parity with SiglipModel's own logits, vocabularies, templates, cache."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from helpers import make_image, open_clip_tokenizer

pytestmark = pytest.mark.deps  # also run on the lowest declared versions (.ci/lowest.txt)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("SIGLIP_CACHE_DIR", str(folder))
    return folder


def reference_probs(ckpt, paths, texts, templates=("This is a photo of {}.",), clean=None) -> np.ndarray:
    """sigmoid(logits_per_image) from the model's own forward, one template; or a manual ensemble. Prompts are
    cleaned as SigLIP was trained (open_clip's canonicalize), or by `clean`."""
    from transformers import AutoModel, AutoProcessor

    clean = clean or open_clip_tokenizer().get_clean_fn("canonicalize")

    processor = AutoProcessor.from_pretrained(ckpt)
    model = AutoModel.from_pretrained(ckpt).eval()
    images = [Image.open(p).convert("RGB") for p in paths]
    pix = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        if len(templates) == 1:
            tok = processor(
                text=[clean(templates[0].format(t)) for t in texts],
                padding="max_length",
                max_length=64,
                truncation=True,
                padding_side="right",
                return_tensors="pt",
            )
            return torch.sigmoid(model(input_ids=tok["input_ids"], **pix).logits_per_image).numpy()
        img = torch.nn.functional.normalize(model.get_image_features(**pix).pooler_output, dim=-1)
        per = []
        for tpl in templates:
            tok = processor(
                text=[clean(tpl.format(t)) for t in texts],
                padding="max_length",
                max_length=64,
                truncation=True,
                padding_side="right",
                return_tensors="pt",
            )
            per.append(
                torch.nn.functional.normalize(model.get_text_features(input_ids=tok["input_ids"]).pooler_output, dim=-1)
            )
        txt = torch.nn.functional.normalize(torch.stack(per).mean(0), dim=-1)
        return torch.sigmoid(img @ txt.T * model.logit_scale.exp() + model.logit_bias).numpy()


@pytest.mark.parametrize("rules", ["canonical", "lower"])
def test_top5_ram_tags_match_reference(cli, any_ckpt, photos, ram_tags, tmp_path, rules):
    """canonical: the reference on prompts cleaned as SigLIP was trained; lower: today's transformers parity."""
    ckpt = any_ckpt
    out = tmp_path / "tags.parquet"
    result = cli(
        "tag",
        photos,
        "--vocab",
        ram_tags,
        "--top-k",
        "5",
        "--threshold",
        "0",
        "-o",
        out,
        "-m",
        ckpt,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "-j",
        "2",
        "-b",
        "32",
        "--text-rules",
        rules,
    )
    assert result.exit_code == 0, result.stderr
    table = pq.read_table(out)
    paths = table.column("path").to_pylist()
    vocab = [line.strip() for line in ram_tags.read_text().splitlines() if line.strip()]
    ref = reference_probs(ckpt, paths, vocab, clean=str.lower if rules == "lower" else None)
    for row, probs in zip(table.column("tags").to_pylist(), ref):
        order = np.argsort(-probs, kind="stable")[:5]
        np.testing.assert_allclose([t["score"] for t in row], probs[order], atol=1e-4)
        for t, i in zip(row, order):  # the same tags, in the same order (two tags within 1e-4 may swap)
            assert t["tag"] == vocab[i] or abs(probs[i] - probs[vocab.index(t["tag"])]) < 1e-4
        for t in row:  # each named tag carries its own reference score
            assert abs(t["score"] - probs[vocab.index(t["tag"])]) < 1e-4


def test_classify_picks_reference_argmax(cli, ckpt, photos, tmp_path):
    labels = ["fish", "bird", "snake", "dog", "Cat", "car", "musical instrument"]
    paths = sorted(photos.glob("*.JPEG"))[:40]
    result = cli(
        "classify", *paths, "--labels", ",".join(labels), "-o", "-", "-m", ckpt, "-q", "-k", "3", "--dtype", "float32"
    )
    assert result.exit_code == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]
    ref = reference_probs(ckpt, paths, labels)
    for row, probs in zip(got, ref):
        assert row["label"] == labels[int(probs.argmax())]
        assert abs(row["score"] - probs.max()) < 1e-4
        assert [t["label"] for t in row["top_k"]][0] == row["label"] and len(row["top_k"]) == 3
        assert row["top_k"] == sorted(row["top_k"], key=lambda t: -t["score"])


def test_template_ensemble_matches_reference(cli, fixed_ckpt, photos, tmp_path):
    tags = ["fish", "Bird", "snake", "dog"]
    (tmp_path / "v.txt").write_text("\n".join(tags))
    templates = ["a photo of a {}.", "a blurry photo of the {}.", "{}"]
    paths = sorted(photos.glob("*.JPEG"))[:8]
    out = tmp_path / "t.parquet"
    args = [a for t in templates for a in ("--template", t)]
    assert (
        cli(
            "tag",
            *paths,
            "--vocab",
            tmp_path / "v.txt",
            *args,
            "--all-scores",
            "-o",
            out,
            "-m",
            fixed_ckpt,
            "--dtype",
            "float32",
        ).exit_code
        == 0
    )
    table = pq.read_table(out)
    dense = np.stack(table.column("scores").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(dense, reference_probs(fixed_ckpt, paths, tags, templates), atol=1e-3)  # float16
    meta = json.loads(pq.read_schema(out).metadata[b"siglip"])
    assert meta["vocabulary"] == tags and meta["templates"] == templates


def test_threshold_top_k_and_per_tag_thresholds(cli, fixed_ckpt, tmp_path):
    img = make_image(tmp_path / "a.png")
    vocab = tmp_path / "v.txt"
    vocab.write_text("red\ngreen\nblue\nsky\n")
    out = tmp_path / "all.parquet"
    assert (
        cli("tag", img, "--vocab", vocab, "--threshold", "0", "--all-scores", "-o", out, "-m", fixed_ckpt).exit_code
        == 0
    )
    row = pq.read_table(out).to_pylist()[0]
    scores = dict(zip(["red", "green", "blue", "sky"], row["scores"]))
    assert [t["tag"] for t in row["tags"]] == sorted(scores, key=lambda t: -scores[t])
    ranked = sorted(scores.values(), reverse=True)
    # a global threshold between the 2nd and 3rd score keeps two tags
    mid = float((ranked[1] + ranked[2]) / 2)
    got = cli("tag", img, "--vocab", vocab, "--threshold", mid, "-o", "-", "-m", fixed_ckpt, "-q")
    assert [t["tag"] for t in json.loads(got.stdout)["tags"]] == sorted(scores, key=lambda t: -scores[t])[:2]
    got = cli("tag", img, "--vocab", vocab, "--threshold", "0", "-k", "1", "-o", "-", "-m", fixed_ckpt, "-q")
    assert len(json.loads(got.stdout)["tags"]) == 1
    # a per-tag threshold wins over the global one: 'sky' always, everything else never
    vocab.write_text("red\t1\ngreen\t1\nblue\t1\nsky\t0\n")
    got = cli("tag", img, "--vocab", vocab, "--threshold", "0", "-o", "-", "-m", fixed_ckpt, "-q")
    assert [t["tag"] for t in json.loads(got.stdout)["tags"]] == ["sky"]


def test_error_rows_and_with_embeddings(cli, fixed_ckpt, tmp_path):
    img = make_image(tmp_path / "a.png")
    (tmp_path / "bad.jpg").write_text("nope")
    vocab = tmp_path / "v.txt"
    vocab.write_text("Red Car\nsky\n")
    got = cli(
        "tag",
        img,
        tmp_path / "bad.jpg",
        "--vocab",
        vocab,
        "--threshold",
        "0",
        "--with-embeddings",
        "-o",
        "-",
        "-m",
        fixed_ckpt,
        "-q",
    )
    ok, bad = [json.loads(line) for line in got.stdout.splitlines()]
    assert {t["tag"] for t in ok["tags"]} == {"Red Car", "sky"}  # the user's spelling is kept
    assert len(ok["embedding"]) == 32
    assert bad["status"] == "error" and bad["tags"] is None and bad["embedding"] is None


def test_float_columns_are_written_without_a_dictionary(cli, fixed_ckpt, tmp_path):
    """Vectors and scores decode 3-4x faster from plain pages (search reads them all); strings keep theirs."""
    img = make_image(tmp_path / "a.png")
    (tmp_path / "v.txt").write_text("red\nsky\n")
    for extra in ([], ["--float16"]):
        out = tmp_path / f"out{len(extra)}.parquet"
        cli(
            "tag",
            img,
            "--vocab",
            tmp_path / "v.txt",
            "--threshold",
            "0",
            "--with-embeddings",
            *extra,
            "-o",
            out,
            "-m",
            fixed_ckpt,
            "-q",
        )
        group = pq.ParquetFile(out).metadata.row_group(0)
        enc = {group.column(i).path_in_schema: group.column(i).encodings for i in range(group.num_columns)}
        assert "RLE_DICTIONARY" not in enc["embedding.list.element"]
        assert "RLE_DICTIONARY" not in enc["tags.list.element.score"]
        assert "RLE_DICTIONARY" in enc["tags.list.element.tag"] and "RLE_DICTIONARY" in enc["path"]


def test_cache_hit_and_misses(cli, fixed_ckpt, tmp_path, cache, monkeypatch):
    from siglip_cli.model import Encoder

    img = make_image(tmp_path / "a.png")
    vocab = tmp_path / "v.txt"
    vocab.write_text("red\nsky\n")
    args = ["tag", img, "--vocab", vocab, "-o", "-", "-m", fixed_ckpt, "-q", "--threshold", "0"]
    first = cli(*args)
    assert first.exit_code == 0 and len(list((cache / "text").iterdir())) == 1

    calls = []
    real = Encoder.encode_texts
    monkeypatch.setattr(Encoder, "encode_texts", lambda self, texts: calls.append(texts) or real(self, texts))
    assert cli(*args).stdout == first.stdout and calls == []  # hit: no text encoding at all
    vocab.write_text("red\nsky\ngrass\n")
    assert cli(*args).exit_code == 0 and len(calls) == 1  # changed vocabulary: miss
    assert cli(*args, "--template", "a {}").exit_code == 0 and len(calls) == 2  # changed template: miss
    assert len(list((cache / "text").iterdir())) == 3
    assert cli(*args, "--no-cache").exit_code == 0 and len(calls) == 3  # --no-cache: always computed


def test_ram_vocabulary_parses_as_it_is(ram_tags):
    from siglip_cli.vocab import read_vocab

    lines = [line.strip() for line in ram_tags.read_text().splitlines() if line.strip()]
    v = read_vocab(str(ram_tags))
    assert len(v.tags) == len({t.lower() for t in lines}) >= 4500


@pytest.mark.parametrize(
    "args,message",
    [
        (["--vocab", "MISSING"], "cannot read"),
        (["--vocab", "EMPTY"], "holds no tags"),
        (["--vocab", "BADTHR"], "is not a number from 0 to 1"),
        (["--vocab", "OK", "--template", "no placeholder"], "must contain '{}'"),
        (
            ["--vocab", "OK", "--threshold", "2"],
            "less than or equal to 1|not in the range 0.0<=x<=1.0",
        ),  # typer 0.29 | before
    ],
)
def test_tag_usage_errors_exit_2(cli, tmp_path, args, message):
    files = {
        "MISSING": tmp_path / "missing.txt",
        "EMPTY": tmp_path / "empty.txt",
        "BADTHR": tmp_path / "bad.txt",
        "OK": tmp_path / "ok.txt",
    }
    files["EMPTY"].write_text("# nothing\n\n")
    files["BADTHR"].write_text("cat\tmaybe\n")
    files["OK"].write_text("cat\n")
    img = make_image(tmp_path / "a.png")
    result = cli("tag", img, *[files.get(a, a) for a in args])
    assert result.exit_code == 2
    assert any(m in result.stderr for m in message.split("|"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--labels", "cat"], "at least two labels"),
        ([], "--labels a,b,c or --labels-file"),
        (["--labels", "cat,dog", "--labels-file", "x"], "one of them"),
    ],
)
def test_classify_usage_errors_exit_2(cli, tmp_path, args, message):
    img = make_image(tmp_path / "a.png")
    result = cli("classify", img, *args)
    assert result.exit_code == 2 and message in result.stderr


def test_bfloat16_scores_use_the_float32_scale_and_bias(cli, fixed_ckpt, photos, tmp_path):
    """In bfloat16 the model's logit scale 2.3 would round to 2.296875: scores must use the stored float32."""
    tags = ["fish", "bird", "snake", "dog"]
    (tmp_path / "v.txt").write_text("\n".join(tags))
    paths = sorted(photos.glob("*.JPEG"))[:6]
    out, texts = tmp_path / "t.parquet", tmp_path / "texts.parquet"
    assert (
        cli(
            "tag",
            *paths,
            "--vocab",
            tmp_path / "v.txt",
            "--threshold",
            "0",
            "--with-embeddings",
            "--no-cache",
            "-o",
            out,
            "-m",
            fixed_ckpt,
            "--dtype",
            "bfloat16",
        ).exit_code
        == 0
    )
    prompts = [a for t in tags for a in ("--text", f"This is a photo of {t}.")]
    assert cli("embed", *prompts, "-o", texts, "-m", fixed_ckpt, "--dtype", "bfloat16").exit_code == 0
    meta = json.loads(pq.read_schema(out).metadata[b"siglip"])
    scale, bias = float(np.exp(np.float32(2.3))), -2.0
    assert meta["dtype"] == "bfloat16" and meta["logit_scale"] == pytest.approx(scale, rel=1e-7)
    assert meta["logit_bias"] == bias
    table = pq.read_table(out)
    img = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    txt = np.stack(pq.read_table(texts).column("embedding").to_numpy(zero_copy_only=False))
    want = 1 / (1 + np.exp(-(img @ txt.T * scale + bias)))  # the float32 formula on the bf16 embeddings
    got = np.array(
        [[{t["tag"]: t["score"] for t in row}[tag] for tag in tags] for row in table.column("tags").to_pylist()]
    )
    np.testing.assert_allclose(got, want, atol=2e-6)
    rounded = 1 / (1 + np.exp(-(img @ txt.T * np.exp(2.296875) + bias)))
    assert np.abs(rounded - want).max() > 1e-4  # what scores with the rounded scale would be off by


def test_a_byte_order_mark_is_not_part_of_any_text_file(cli, fixed_ckpt, tmp_path):
    """Windows editors start a UTF-8 file with a byte-order mark: it is not part of the first tag, label, text
    or listed path, in any file siglip reads (the first tag was "\\ufeffcat", scored as another text)."""
    img = make_image(tmp_path / "a.png")
    bom, plain = tmp_path / "bom.txt", tmp_path / "plain.txt"
    bom.write_bytes(b"\xef\xbb\xbfcat\ndog\n")
    plain.write_bytes(b"cat\ndog\n")

    def rows(*args):
        out = tmp_path / "out.parquet"
        result = cli(*args, "-m", fixed_ckpt, "-o", out, "--overwrite", "-q")
        assert result.exit_code == 0, result.stderr
        return pq.read_table(out).drop(["mtime_ns"] if "mtime_ns" in pq.read_schema(out).names else []).to_pylist()

    assert rows("tag", img, "--vocab", bom) == rows("tag", img, "--vocab", plain)
    assert rows("classify", img, "--labels-file", bom) == rows("classify", img, "--labels-file", plain)
    assert rows("embed", "--text", "cat", "--text", "dog") == rows("embed", "--texts-file", bom)
    listed = tmp_path / "list.txt"
    listed.write_bytes(b"\xef\xbb\xbf" + str(img).encode() + b"\n")
    (found,) = rows("embed", "--files-from", listed)
    assert found["status"] == "ok" and found["path"] == str(img)


def test_a_bad_text_cache_entry_is_recomputed(cli, fixed_ckpt, tmp_path, cache):
    """A cache entry of the wrong shape, cut short or holding NaN is recomputed and rewritten, never scored
    (a zeros((1, 3)) entry had scored every tag against one wrong vector, or crashed on the shape)."""
    img = make_image(tmp_path / "a.png")
    vocab = tmp_path / "v.txt"
    vocab.write_text("red\nsky\ngrass\n")
    args = ("tag", img, "--vocab", vocab, "-m", fixed_ckpt, "-o", "-", "-q")
    first = cli(*args)
    assert first.exit_code == 0
    (entry,) = (cache / "text").iterdir()
    good = entry.read_bytes()
    for bad in (np.zeros((1, 3), np.float32), np.full((3, 32), np.nan, np.float32), np.arange(3)):
        np.save(entry, bad)
        again = cli(*args)
        assert again.exit_code == 0 and again.stdout == first.stdout, again.stderr
        assert entry.read_bytes() == good  # rewritten
    entry.write_bytes(good[:100])
    assert cli(*args).stdout == first.stdout and entry.read_bytes() == good
