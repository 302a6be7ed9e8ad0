"""Frozen run configuration and the defaults, in one place. Imports nothing heavy."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

DEFAULT_MODEL = "google/siglip2-so400m-patch14-384"
DEFAULT_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".heic",
    ".heif",
    ".avif",
    ".dng",
    ".cr2",
    ".cr3",
    ".nef",
    ".arw",
    ".orf",
    ".rw2",
    ".raf",
    ".pef",
    ".srw",
)  # RAW: raw.py
DEFAULT_TEMPLATE = "This is a photo of {}."
# SigLIP's sigmoid scores are low in absolute terms: see the README on choosing a threshold.
DEFAULT_THRESHOLD = 0.05
# SigLIP 2 was trained on text padded (right) to exactly this many tokens.
TEXT_LENGTH = 64
# Decompression-bomb guard: 100 MP decodes in about 300 MB, safe for one worker on a 2-core, 4 GB machine.
DEFAULT_MAX_PIXELS = 100_000_000
# Seconds one file may take to read and decode before its worker is killed and it becomes an error row.
DEFAULT_TIMEOUT = 60.0
# Rows buffered before a Parquet row group is written.
ROW_GROUP_SIZE = 1024


# Vision towers of the official SigLIP 2 checkpoints: hidden, MLP, layers, heads, patch, image size.
ARCHS = {
    "base-patch16-224": (768, 3072, 12, 12, 16, 224),
    "base-patch16-256": (768, 3072, 12, 12, 16, 256),
    "base-patch16-384": (768, 3072, 12, 12, 16, 384),
    "base-patch16-512": (768, 3072, 12, 12, 16, 512),
    "base-patch32-256": (768, 3072, 12, 12, 32, 256),
    "large-patch16-256": (1024, 4096, 24, 16, 16, 256),
    "large-patch16-384": (1024, 4096, 24, 16, 16, 384),
    "large-patch16-512": (1024, 4096, 24, 16, 16, 512),
    "so400m-patch14-224": (1152, 4304, 27, 16, 14, 224),
    "so400m-patch14-384": (1152, 4304, 27, 16, 14, 384),
    "so400m-patch16-256": (1152, 4304, 27, 16, 16, 256),
    "so400m-patch16-384": (1152, 4304, 27, 16, 16, 384),
    "so400m-patch16-512": (1152, 4304, 27, 16, 16, 512),
    "giant-opt-patch16-256": (1536, 6144, 40, 16, 16, 256),
    "giant-opt-patch16-384": (1536, 6144, 40, 16, 16, 384),
    "tiny": (32, 64, 2, 2, 16, 64),  # for smoke tests of the benchmark itself
}


def default_model() -> str:
    """The model used when --model is not given: $SIGLIP_MODEL, else the so400m/384 checkpoint."""
    return os.environ.get("SIGLIP_MODEL") or DEFAULT_MODEL


def cgroup_cpu_limit(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup and its ancestors, in CPUs (v2 cpu.max, v1 cfs quota); None
    when there is none. A container or a systemd slice (CPUQuota=) sets one; os.cpu_count() ignores it."""
    try:
        with open(proc) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers:  # v1: one hierarchy per controller set
            if "cpu" not in controllers.split(","):
                continue
            bases = [os.path.join(root, controllers), os.path.join(root, "cpu")]
        else:
            bases = [root]
        parts = [p for p in path.split("/") if p]
        for base in dict.fromkeys(bases):
            for depth in range(len(parts), -1, -1):  # the cgroup and each ancestor: the smallest quota binds
                folder = os.path.join(base, *parts[:depth])
                try:
                    if controllers:
                        with (
                            open(os.path.join(folder, "cpu.cfs_quota_us")) as q,
                            open(os.path.join(folder, "cpu.cfs_period_us")) as p,
                        ):
                            quota, period = int(q.read()), int(p.read())
                    else:
                        with open(os.path.join(folder, "cpu.max")) as m:
                            text, period_text = (m.read().split() + ["100000"])[:2]
                        quota, period = (-1 if text == "max" else int(text)), int(period_text)
                except (OSError, ValueError):
                    continue
                if quota > 0 and period > 0:
                    limits.append(quota / period)
    return min(limits) if limits else None


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask (taskset, cpusets), capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return max(1, min(n, math.ceil(quota))) if quota else max(1, n)


def available_memory() -> int | None:
    """Bytes this process could still allocate without swapping: the kernel's MemAvailable, capped by a cgroup
    v2 memory limit's headroom; None where neither can be read (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                found.append(int(limit) - int(g.read().strip()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def default_workers() -> int:
    """Decode worker processes: one per usable CPU, leaving one to feed the device, at most 16."""
    return max(1, min(16, usable_cpus() - 1))


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to load and where to run it."""

    name: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_patches: int | None = None  # NaFlex checkpoints only
    compile: bool = False  # torch.compile the image tower
    commit: str | None = None  # the Hub commit `revision` resolved to (set by the pipeline; loading uses it)
    backend: str = "auto"  # auto | torch | openvino (the image tower on a CPU)
    quantize: str = "none"  # none | int8 | int8-weights | int4 (OpenVINO)
    int8_bound: tuple[float, float] = (0.995, 0.98)  # int8 kept where mean and least cosine to float32 reach these
    text_rules: str = "canonical"  # what a text becomes before the tokenizer: canonical | lower (text.py)


@dataclass(frozen=True)
class SourceConfig:
    """Which files to read."""

    paths: tuple[str, ...] = ()
    files_from: str | None = None
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    exclude: tuple[str, ...] = ()  # globs left out of folders' walks (sources.Skip)
    include_hidden: bool = False  # walk hidden entries and NAS system folders too
    raw_pairs: bool = False  # a RAW file with a JPEG/HEIC of the same name beside it: index both (else the JPEG)


@dataclass(frozen=True)
class OutputConfig:
    """Where and how results are written."""

    path: str = "-"
    float16: bool = False
    overwrite: bool = False  # start afresh when the output was made with other settings
    wait: bool = False  # wait for another run's lock instead of exiting 1
    prune: bool = False  # remove the rows of files that no longer exist, under the folders given
    prune_anyway: bool = False  # prune even when a folder is missing or empty, or most rows would go
    rehash: bool = False  # compare content hashes, not size and mtime, to find changed files
    retry_errors: bool = False  # try again the files that failed last time, changed or not


@dataclass(frozen=True)
class RunConfig:
    """Everything one run of the pipeline needs."""

    model: ModelConfig
    sources: SourceConfig
    output: OutputConfig
    head: object = None  # a heads spec (EmbedSpec, TagSpec, ...): what to compute per image
    batch_size: int | None = None  # None: chosen from the device
    workers: int = field(default_factory=default_workers)
    strict: bool = False
    quiet: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout: float = DEFAULT_TIMEOUT
    exact: bool = False  # decode JPEGs at full size (bit-exact reference preprocessing), never reduced
    ray: str | None = None  # run on Ray Data: local, auto, or a cluster's address (cluster.py)
    ray_actors: int | None = None  # encoder actors (default: one per GPU of the cluster, else one)
    placement: object = None  # devices.Placement: where the model runs, resolved once by pipeline.resolve
    server: str | None = None  # a `siglip serve` that runs the model (encoders/remote.py)
    insecure: bool = False  # --server may be plain http to a host beyond this machine and its network
    server_retry: float = 120.0  # seconds a --server run retries a server that does not answer
    wire: str = "raw"  # how pixels travel to the server: raw | webp (wire.py)
