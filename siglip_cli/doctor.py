"""`siglip doctor`: one screen with what a bug report needs, and what `auto` would choose on this machine."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import sys

from . import __version__

PACKAGES = (
    "torch",
    "transformers",
    "huggingface-hub",
    "tokenizers",
    "pillow",
    "pillow-heif",
    "pyarrow",
    "numpy",
    "openvino",
    "nncf",
    "typer",
)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _size(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _gib(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cuda(torch) -> list[dict]:
    from .devices import cuda_bf16_native

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        device = torch.device("cuda", i)
        out.append(
            {
                "device": str(device),
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory": _gib(p.total_memory),
                "bf16_native": cuda_bf16_native(device),
            }
        )
    return out


def report(model: str) -> dict:
    """Everything doctor shows, as plain data (--json prints it as it is)."""
    import torch
    from huggingface_hub import constants, try_to_load_from_cache

    from .config import ModelConfig, cgroup_cpu_limit, default_workers, usable_cpus
    from .devices import cpu_bf16_native, default_batch_size, resolve_backend, resolve_devices, resolve_dtype
    from .encoders import openvino
    from .shm import SHM_DIR
    from .vocab import cache_dir

    devices = resolve_devices("auto")
    # NaFlex checkpoints run on torch whatever auto would pick: known from the config where it is here (a doctor
    # downloads nothing), else from the name
    try:
        config = (
            os.path.join(model, "config.json") if os.path.isdir(model) else try_to_load_from_cache(model, "config.json")
        )
        with open(config, encoding="utf-8") as f:
            naflex = json.load(f).get("model_type") == "siglip2"
    except Exception:  # noqa: BLE001 - a report, not a run
        naflex = "naflex" in model.lower()
    try:
        backend = resolve_backend(ModelConfig(model), devices[0], naflex=naflex)
    except Exception as e:  # noqa: BLE001 - a report, not a run
        backend = f"({e})"
    shm = shutil.disk_usage(SHM_DIR) if os.path.isdir(SHM_DIR) else None
    hub = constants.HF_HUB_CACHE
    if os.path.isdir(model):
        cached = "a local folder"
    elif os.path.exists(model):
        cached = "a file, not a model: give a Hub id or a folder saved with save_pretrained"
    else:
        try:
            found = try_to_load_from_cache(model, "config.json")
            cached = (
                f"in the Hub cache ({found.split(os.sep)[-2][:12]})"
                if isinstance(found, str)
                else "not in the Hub cache: the first run downloads it"
            )
        except ValueError:
            cached = "not a Hub id or a folder"
    mkl = torch.backends.mkldnn.is_available()
    return {
        "siglip": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: v for p in PACKAGES if (v := _version(p))},
        "torch_cuda": torch.version.cuda,
        "torch_hip": torch.version.hip,
        "cpu": {
            "name": _cpu_name(),
            "usable": usable_cpus(),
            "cores": os.cpu_count(),
            "cgroup_limit": cgroup_cpu_limit(),
            "bf16_native": cpu_bf16_native(),
            "int8_native": openvino.int8_native(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "onednn": mkl,
        },
        "cuda": _cuda(torch),
        "mps": bool(torch.backends.mps.is_available()),
        "auto": {
            "devices": [str(d) for d in devices],
            "dtype": str(resolve_dtype("auto", devices))[6:],
            "backend": backend,
            "batch_size": default_batch_size(devices[0]),
            "workers": default_workers(),
            "openvino_installed": openvino.available(),
        },
        "shared_memory": {"path": SHM_DIR, "free": _gib(shm.free), "total": _gib(shm.total)} if shm else None,
        "caches": {
            "siglip": {"path": cache_dir(), "size": _gib(_size(cache_dir()))},
            "huggingface_hub": {"path": hub, "size": _gib(_size(hub))},
        },
        "model": {"name": model, "status": cached, "offline": bool(constants.HF_HUB_OFFLINE)},
    }


def text(r: dict) -> str:
    """The report as a screen of `key: value` lines."""
    cpu, auto = r["cpu"], r["auto"]
    limit = f", cgroup limit {cpu['cgroup_limit']:g}" if cpu["cgroup_limit"] else ""
    lines = [
        f"siglip {r['siglip']}  python {r['python']}  {r['platform']}",
        "packages: " + ", ".join(f"{k} {v}" for k, v in r["packages"].items()),
        f"torch build: CUDA {r['torch_cuda'] or 'none'}" + (f", ROCm {r['torch_hip']}" if r["torch_hip"] else ""),
        f"cpu: {cpu['name']}; {cpu['usable']} usable of {cpu['cores']}{limit}; {cpu['capability']}; "
        f"native bfloat16: {'yes' if cpu['bf16_native'] else 'no'}; "
        f"int8 dot products (--quantize int8 faster): {'yes' if cpu['int8_native'] else 'no'}",
    ]
    if r["cuda"]:
        for g in r["cuda"]:
            lines.append(
                f"{g['device']}: {g['name']}, compute capability {g['capability']}, {g['memory']}, "
                f"native bfloat16: {'yes' if g['bf16_native'] else 'no (float16)'}"
            )
    else:
        lines.append("cuda: not available")
    lines.append(f"mps: {'available' if r['mps'] else 'not available'}")
    lines.append(
        f"auto picks: --device {','.join(auto['devices'])} --dtype {auto['dtype']} --backend {auto['backend']} "
        f"--batch-size {auto['batch_size']} --workers {auto['workers']}"
    )
    if r["shared_memory"]:
        s = r["shared_memory"]
        lines.append(f"shared memory: {s['path']}, {s['free']} free of {s['total']}")
    else:
        lines.append("shared memory: none (pixels travel by pipe)")
    for name, c in r["caches"].items():
        lines.append(f"cache ({name}): {c['path']}, {c['size']}")
    m = r["model"]
    lines.append(f"model {m['name']}: {m['status']}" + (" (HF_HUB_OFFLINE is set)" if m["offline"] else ""))
    return "\n".join(lines)
