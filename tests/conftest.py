"""Shared fixtures: tiny random-weight checkpoints built offline, the shared photos, and a CLI runner. Fixtures
only: the functions and constants behind them, and any a test module imports, are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import IMAGES, RAM_TAGS, build_fixed, build_naflex, build_v1

# Never reach the network from a test.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """Text-embedding and OpenVINO caches of the session's own, never the user's ~/.cache/siglip."""
    if "SIGLIP_CACHE_DIR" not in os.environ:
        os.environ["SIGLIP_CACHE_DIR"] = str(tmp_path_factory.mktemp("siglip-cache"))


@pytest.fixture(scope="session")
def v1_ckpt(tmp_path_factory) -> Path:
    pytest.importorskip("sentencepiece", reason="SigLIP 1 tokenizers need sentencepiece (a dependency)")
    return build_v1(tmp_path_factory.mktemp("siglip-v1"))


@pytest.fixture(scope="session")
def fixed_ckpt(tmp_path_factory) -> Path:
    return build_fixed(tmp_path_factory.mktemp("siglip-fixed"))


@pytest.fixture(scope="session")
def naflex_ckpt(tmp_path_factory) -> Path:
    return build_naflex(tmp_path_factory.mktemp("siglip-naflex"))


@pytest.fixture(params=["fixed", "naflex"])
def ckpt(request, fixed_ckpt, naflex_ckpt) -> Path:
    """Each test that takes it runs on both checkpoint layouts."""
    return fixed_ckpt if request.param == "fixed" else naflex_ckpt


@pytest.fixture(params=["v1", "fixed", "naflex"])
def any_ckpt(request, v1_ckpt, fixed_ckpt, naflex_ckpt) -> Path:
    """SigLIP 1, and SigLIP 2 in both layouts."""
    return {"v1": v1_ckpt, "fixed": fixed_ckpt, "naflex": naflex_ckpt}[request.param]


@pytest.fixture(scope="session")
def photos() -> Path:
    if not IMAGES.is_dir():
        pytest.skip(f"the shared photos are not at {IMAGES}")
    return IMAGES.resolve()  # as rows name them: folders resolved (shared/ may be reached through a link)


@pytest.fixture(scope="session")
def ram_tags() -> Path:
    if not RAM_TAGS.is_file():
        pytest.skip(f"the RAM tag list is not at {RAM_TAGS}")
    return RAM_TAGS


@pytest.fixture
def cli():
    """Run `siglip ARGS...` in-process like a user would; returns the click Result (stdout and stderr apart)."""
    from typer.testing import CliRunner

    from siglip_cli.cli import app

    runner = CliRunner(env={"COLUMNS": "200"})  # rich wraps error boxes at the terminal width

    def invoke(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke
