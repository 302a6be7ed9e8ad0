"""--device and --dtype auto resolved from what torch reports (patched here: no GPU needed), and the
out-of-memory errors the fallback recognizes (siglip_cli/devices.py, encode.py)."""

from __future__ import annotations

import pytest
import torch

from siglip_cli.devices import resolve_devices, resolve_dtype
from siglip_cli.errors import RunError


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
    import siglip_cli.devices as model

    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(model, "cpu_bf16_native", lambda native=native: native)
        assert resolve_dtype("auto", [torch.device("cpu")]) == want


def test_mps_out_of_memory_is_recognized():
    from siglip_cli.encode import out_of_memory

    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)"))
    assert not out_of_memory(RuntimeError("shape mismatch"))
