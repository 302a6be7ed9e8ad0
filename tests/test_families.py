"""Checkpoint families (SigLIP 1, SigLIP 2 fixed and NaFlex; parity is in test_parity and test_tag) and loading
only what a run needs: image runs load the image tower alone, texts load the tokenizer and text tower."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from helpers import run_siglip, table

pytestmark = pytest.mark.deps  # also run on the lowest declared versions (.ci/lowest.txt)

TORCH = ["--device", "cpu", "--dtype", "float32", "--backend", "torch", "-q"]


@pytest.fixture
def no_text(monkeypatch):
    """Loading a text tower or a tokenizer fails the test."""
    import transformers

    def forbidden(*a, **k):
        raise AssertionError("the text side was loaded")

    for name in ("SiglipTextModel", "Siglip2TextModel", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", forbidden)


def test_image_runs_load_the_image_tower_alone(cli, any_ckpt, photos, tmp_path, no_text):
    out = tmp_path / "o.parquet"
    result = cli("embed", *sorted(photos.glob("*.JPEG"))[:4], "-o", out, "-m", any_ckpt, *TORCH)
    assert result.exit_code == 0, result.stderr
    assert set(table(out)["status"]) == {"ok"}


def test_tag_with_a_cached_vocabulary_loads_no_text_side(cli, fixed_ckpt, photos, tmp_path, monkeypatch):
    (tmp_path / "v.txt").write_text("cat\ndog\n")
    args = ["tag", *sorted(photos.glob("*.JPEG"))[:3], "--vocab", tmp_path / "v.txt", "-m", fixed_ckpt, *TORCH]
    assert cli(*args, "-o", tmp_path / "a.parquet").exit_code == 0  # fills the text-embedding cache
    import transformers

    monkeypatch.setattr(transformers.SiglipTextModel, "from_pretrained", lambda *a, **k: pytest.fail("text tower"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("tokenizer"))
    assert cli(*args, "-o", tmp_path / "b.parquet").exit_code == 0
    assert table(tmp_path / "a.parquet")["tags"] == table(tmp_path / "b.parquet")["tags"]


def test_image_run_without_tokenizer_files(cli, v1_ckpt, photos, tmp_path):
    """A SigLIP 1 folder with its tokenizer removed embeds images exactly as the whole folder does."""
    bare = tmp_path / "bare"
    shutil.copytree(v1_ckpt, bare)
    for name in ("spiece.model", "tokenizer_config.json"):
        (bare / name).unlink()
    files = sorted(photos.glob("*.JPEG"))[:6]
    whole, stripped = tmp_path / "whole.parquet", tmp_path / "stripped.parquet"
    assert cli("embed", *files, "-o", whole, "-m", v1_ckpt, *TORCH).exit_code == 0
    assert cli("embed", *files, "-o", stripped, "-m", bare, *TORCH).exit_code == 0
    np.testing.assert_array_equal(np.array(table(whole)["embedding"]), np.array(table(stripped)["embedding"]))
    texts = cli("embed", "--text", "a red car", "-o", tmp_path / "t.parquet", "-m", bare, *TORCH)
    assert texts.exit_code == 1 and "cannot load the tokenizer of" in texts.stderr
    assert len(texts.stderr.strip().splitlines()) == 1


def test_missing_sentencepiece_is_one_line(v1_ckpt, tmp_path):
    """Without the sentencepiece package (a dependency, removed here), texts fail in one line with the fix."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text("import sys\nsys.modules['sentencepiece'] = None\n")
    import os

    path = os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])
    r = run_siglip(
        "embed", "--text", "a red car", "-o", tmp_path / "t.parquet", "-m", v1_ckpt, *TORCH, env={"PYTHONPATH": path}
    )
    assert r.returncode == 1, r.stderr
    assert "sentencepiece" in r.stderr and "pip install" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
