"""Every use of a dependency beyond its documented API, each in one small function (docs/dependencies.md).

Each one has a test in tests/test_compat.py that fails naming the dependency and its version when the behaviour
it relies on changes. Nothing here imports torch at module level: `siglip --help` must stay light.
"""

from __future__ import annotations

import functools
import platform


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the Linux kernel reports them (x86 `flags`, Arm `Features`); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "x86", "i686")


def cpu_bf16_native() -> bool:
    """Whether the CPU computes bfloat16 in hardware (x86 AVX512-BF16 or AMX; Arm BF16)."""
    flags = cpu_flags()
    if flags:
        return bool(flags & ({"avx512_bf16", "amx_bf16"} if _x86() else {"bf16"}))
    return _torch_cpu_probe("bf16")


def cpu_int8_native() -> bool:
    """Whether the CPU has int8 dot-product instructions (x86 AVX512-VNNI, AVX-VNNI, AMX; Arm dot product)."""
    flags = cpu_flags()
    if flags:
        return bool(flags & ({"avx512_vnni", "avx_vnni", "amx_int8"} if _x86() else {"asimddp"}))
    return _torch_cpu_probe("int8")


def _torch_cpu_probe(what: str) -> bool:
    """Where there is no /proc/cpuinfo (macOS, Windows): torch's private CPU probes; False when they are gone."""
    import torch

    try:
        if _x86():
            if what == "bf16":
                return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
            return bool(torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())
        if what == "bf16":
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return False
    except (AttributeError, RuntimeError):
        return False


def inductor_default_cache_dir() -> str | None:
    """torch inductor's own default cache folder (torch writes it into TORCHINDUCTOR_CACHE_DIR when it first
    looks, so that value means "not chosen by the user"); None when torch no longer has it there."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return default_cache_dir()


def compile_failures() -> tuple[type[BaseException], ...]:
    """The exceptions a `torch.compile`d function raises when its backend cannot compile (no compiler, ...)."""
    try:
        from torch._dynamo.exc import BackendCompilerFailed
    except ImportError:
        return ()
    return (BackendCompilerFailed,)


def pool_processes(executor) -> list:
    """The worker processes of a concurrent.futures.ProcessPoolExecutor, to kill one stuck in a read (Python
    before 3.14 has no public way: `terminate_workers` came in 3.14)."""
    return list((getattr(executor, "_processes", None) or {}).values())
