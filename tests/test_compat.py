"""Each use of a dependency beyond its documented API (siglip_cli/compat.py, docs/dependencies.md), held to the
behaviour we rely on: a failure here names the dependency and the version that changed it."""

from __future__ import annotations

import platform
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

from siglip_cli import compat

pytestmark = pytest.mark.deps


def _version(package: str) -> str:
    import importlib.metadata

    return f"{package} {importlib.metadata.version(package)}"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="torch's x86 CPU probes")
def test_cpu_features_from_the_kernel_agree_with_torchs_private_probes():
    """/proc/cpuinfo answers on Linux; torch's private probes answer elsewhere and must still say the same."""
    import torch

    if not compat.cpu_flags():
        pytest.skip("no /proc/cpuinfo here")
    why = f"{_version('torch')}: torch.cpu's private CPU probes are gone or disagree with /proc/cpuinfo"
    assert compat._torch_cpu_probe("bf16") == compat.cpu_bf16_native(), why
    # torch's VNNI probe knows AVX512-VNNI and AMX only (not AVX-VNNI), so it can only be stricter
    assert compat._torch_cpu_probe("int8") <= compat.cpu_int8_native(), why
    assert hasattr(torch.cpu, "_is_vnni_supported") and hasattr(torch.cpu, "_is_amx_tile_supported"), why


def test_inductor_names_its_default_cache_folder():
    default = compat.inductor_default_cache_dir()
    assert isinstance(default, str) and default, (
        f"{_version('torch')}: torch._inductor.runtime.cache_dir_utils.default_cache_dir is gone: --compile's "
        "artefacts would go back to a /tmp folder that a reboot wipes"
    )


def test_a_compile_failure_has_a_type_to_catch():
    import torch

    failures = compat.compile_failures()
    assert failures and all(issubclass(t, Exception) for t in failures), (
        f"{_version('torch')}: torch._dynamo.exc.BackendCompilerFailed is gone: a failed --compile would be a traceback"
    )

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    f = torch.compile(lambda x: x * 2, backend=broken)
    with pytest.raises(failures):
        f(torch.ones(2))


def _square(x: int) -> int:
    return x * x


def test_the_worker_processes_of_a_pool_can_be_reached():
    with ProcessPoolExecutor(max_workers=1) as pool:
        assert pool.submit(_square, 3).result() == 9
        processes = compat.pool_processes(pool)
        assert len(processes) == 1 and all(p.is_alive() and hasattr(p, "kill") for p in processes), (
            f"Python {sys.version.split()[0]}: ProcessPoolExecutor._processes is gone: a worker stuck in a read "
            "could no longer be killed"
        )


def test_the_logit_scale_and_bias_are_read_in_float32_from_the_weights(fixed_ckpt):
    """save_pretrained's names for them (our reading of the checkpoint format, not an API)."""
    from siglip_cli.checkpoint import stored_scalars

    scalars = stored_scalars(str(fixed_ckpt), None)
    assert scalars == pytest.approx({"logit_scale": 2.3, "logit_bias": -2.0}), (
        f"{_version('transformers')}: the checkpoint no longer stores logit_scale and logit_bias under those names"
    )


def test_a_hub_checkpoint_is_known_by_the_commit_its_cached_files_came_from(tmp_path):
    """As a Hub download leaves its cache (snapshots/<commit>/, refs/main), read offline in a process of its own
    (the Hub's cache folder is fixed at import)."""
    import json
    import os
    import subprocess

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    script = "from siglip_cli.weights import cached_commit; print(cached_commit('org/tiny', None))"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == commit, f"{_version('huggingface-hub')}: {out.stderr[-500:]}"
