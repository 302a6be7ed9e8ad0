"""Where a run encodes and in what precision: the devices, their capabilities, the dtype, the image tower's
backend and the default batch size. Chosen once per run, before the model loads."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

from . import compat
from .config import ModelConfig
from .errors import RunError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_devices(name: str) -> list[torch.device]:
    """The devices a run encodes on, one encoder each.

    'auto': every visible CUDA GPU, else MPS, else the CPU. 'cuda': every visible GPU; 'cuda:N' one of them;
    a comma-separated list names several of one kind ('cuda:0,cuda:2'; 'cpu,cpu' runs two CPU encoders, which
    tests the dispatch but does not speed up a CPU). An explicit device that is absent is an error.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        if torch.backends.mps.is_available():
            return [torch.device("mps")]
        return [torch.device("cpu")]
    devices: list[torch.device] = []
    for part in name.split(","):
        device = torch.device(part)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RunError("--device cuda was asked for, but CUDA is not available here; use --device cpu or auto")
            count = torch.cuda.device_count()
            if device.index is None:
                devices += [torch.device("cuda", i) for i in range(count)]
                continue
            if device.index >= count:
                raise RunError(f"--device {part}: this machine has {count} CUDA device(s)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RunError("--device mps was asked for, but MPS is not available here; use --device cpu or auto")
        devices.append(device)
    if len({d.type for d in devices}) > 1:
        raise RunError(f"--device {name}: give devices of one kind (several GPUs, or the CPU)")
    return devices


def default_batch_size(device: torch.device) -> int:
    """Large enough to keep a GPU busy and within 16 GB for so400m/384; small on a CPU for smooth progress."""
    return {"cuda": 256, "mps": 64}.get(device.type, 16)


def resolve_device(name: str) -> torch.device:
    """The first device of resolve_devices: where bench and text embedding run."""
    return resolve_devices(name)[0]


def cuda_bf16_native(device: torch.device) -> bool:
    """Whether a CUDA device has bfloat16 tensor cores (Ampere, compute capability 8.0, and newer).

    On older cards (T4, V100) bfloat16 is emulated: slow, and SDPA falls back to its math kernel, which
    materializes the whole attention matrix.
    """
    if torch.version.hip:  # ROCm: ask the runtime about that device
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return torch.cuda.get_device_capability(device) >= (8, 0)


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 in hardware (x86 AVX512-BF16 or AMX; Arm BF16), as oneDNN uses it.

    There bfloat16 runs the towers about 3x faster than float32 (min cos 0.99997); elsewhere oneDNN emulates it,
    slower than float32.
    """
    return compat.cpu_bf16_native()


def resolve_dtype(name: str, devices: torch.device | list[torch.device]) -> torch.dtype:
    """'auto': on CUDA, bfloat16 when every device does it natively, float16 otherwise; on a CPU, bfloat16 where
    the CPU does it in hardware; float32 elsewhere (MPS included). One dtype for all devices: a run's rows
    must not depend on which GPU made them."""
    devices = [devices] if isinstance(devices, torch.device) else devices
    if name != "auto":
        return DTYPES[name]
    kind = devices[0].type
    if kind == "cuda":
        return torch.bfloat16 if all(cuda_bf16_native(d) for d in devices) else torch.float16
    if kind == "cpu" and cpu_bf16_native():
        return torch.bfloat16
    return torch.float32


def resolve_quantize(cfg: ModelConfig, device: torch.device, naflex: bool) -> str:
    """--quantize as a run does it. auto: int8 where OpenVINO runs the image tower on a CPU with int8 dot products
    (VNNI, AMX), held to --int8-bound as int8 is; none elsewhere (NaFlex, --backend torch, --compile, a GPU)."""
    if cfg.quantize != "auto":
        return cfg.quantize
    from .encoders import openvino

    cpu = device.type == "cpu" and cfg.backend != "torch" and not cfg.compile and not naflex
    return "int8" if cpu and openvino.available() and compat.cpu_int8_native() else "none"


def resolve_backend(cfg: ModelConfig, device: torch.device, naflex: bool) -> str:
    """'torch' or 'openvino' for the image tower. auto: OpenVINO on a CPU when the extra is installed (not with
    --compile, a torch feature); NaFlex checkpoints always run on torch."""
    from .encoders import openvino

    want = cfg.backend
    if want == "auto":
        want = "openvino" if device.type == "cpu" and openvino.available() and not cfg.compile else "torch"
    if want == "openvino":
        if not openvino.available():
            raise RunError("--backend openvino needs the openvino extra: pip install 'siglip-cli[openvino]'")
        if device.type != "cpu":
            raise RunError(f"--backend openvino runs on the CPU, not {device.type}; use --device cpu")
        if naflex:
            if cfg.backend == "openvino" or cfg.quantize != "none":
                print(
                    "siglip: note: NaFlex checkpoints (variable patch grids) run on torch, not OpenVINO",
                    file=sys.stderr,
                )
            want = "torch"
    if cfg.quantize != "none" and want != "openvino":
        raise RunError(
            f"--quantize {cfg.quantize} needs the OpenVINO backend on a CPU "
            "(pip install 'siglip-cli[openvino]', --device cpu) and a fixed-resolution checkpoint"
        )
    return want


def check_compiler(device: torch.device) -> None:
    """--compile builds C++ (CPU) or a C launcher (CUDA, through Triton): without a compiler, say so in one line."""
    import shutil
    import sys

    if device.type == "cuda":
        found = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
        need = "a C compiler (gcc or clang, or set CC)"
    else:
        found = shutil.which(os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++"))
        need = "a C++ compiler (g++, or set CXX)"
    if not found:
        raise RunError(f"--compile needs {need} and none was found; install one, or run without --compile")


@dataclass(frozen=True)
class Placement:
    """Where and how a run's model runs, resolved once from its options (place); what comes after reads it."""

    devices: tuple[torch.device, ...]
    dtype: torch.dtype
    backend: str  # the image tower's: torch | openvino
    quantize: str  # none | int8 | int8-weights | int4 (auto resolved)
    naflex: bool


def place(cfg: ModelConfig, naflex: bool) -> Placement:
    """Devices, dtype, backend and quantization for a checkpoint of this layout; an absent device, a backend
    that cannot be had or a missing compiler is a RunError here, before any weights load."""
    devices = resolve_devices(cfg.device)
    dtype = resolve_dtype(cfg.dtype, devices)
    cfg = dataclasses.replace(cfg, quantize=resolve_quantize(cfg, devices[0], naflex))
    backend = resolve_backend(cfg, devices[0], naflex)
    if cfg.compile:
        check_compiler(devices[0])
    return Placement(tuple(devices), dtype, backend, cfg.quantize, naflex)
