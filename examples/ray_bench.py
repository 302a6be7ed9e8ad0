"""Benchmark `siglip embed --ray` against the local pipeline on the same model and images.

    python examples/ray_bench.py /tmp/raybench --copies 4 --arch base-patch16-224

Builds a random-weight checkpoint of the architecture (no download), a folder of the shared photos repeated
`--copies` times (each copy a distinct file: an index only reuses rows of files it already holds), then runs
`siglip embed` into fresh outputs: locally, on a Ray started by the run (`--ray local`, its start-up
included), and on a Ray already running (`ray start --head`, then `--ray auto`). Prints each run's images/s
(from the run's own summary) and the Ray runs' ratio to the local one.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

PHOTOS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "images"


def checkpoint(folder: Path, arch: str) -> Path:
    import torch
    from transformers import SiglipConfig, SiglipModel

    from siglip_cli.config import ARCHS

    if (folder / "config.json").exists():
        return folder
    hidden, mlp, layers, heads, patch, size = ARCHS[arch]
    torch.manual_seed(0)
    config = SiglipConfig(
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            patch_size=patch,
            image_size=size,
        ),
        text_config=dict(
            vocab_size=512,
            hidden_size=hidden,
            intermediate_size=mlp,
            num_hidden_layers=1,
            num_attention_heads=heads,
            max_position_embeddings=64,
            projection_size=hidden,
        ),
    )
    SiglipModel(config).save_pretrained(folder)
    processor = dict(
        image_processor_type="SiglipImageProcessor",
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        size={"height": size, "width": size},
        resample=2,
        rescale_factor=1 / 255,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    Path(folder, "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def photos(folder: Path, copies: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        for p in sorted(PHOTOS.iterdir()):
            target = folder / f"{i}-{p.name}"
            if not target.exists():
                target.write_bytes(p.read_bytes() + b"\0" * i)  # distinct content: never a copy of another
    return folder


def embed(args: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "siglip_cli", "embed", *args, "-o", str(out)], capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(done.stderr)
    line = done.stderr.strip().splitlines()[-1]
    rate = float(re.search(r"([\d.]+) images/s", line).group(1))
    print(f"  {line}\n  wall {wall:.1f}s")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--arch", default="base-patch16-224")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--backend", default="auto")
    a = ap.parse_args()
    ckpt = checkpoint(a.work / a.arch, a.arch)
    images = photos(a.work / "images", a.copies)
    common = [str(images), "-m", str(ckpt), "--backend", a.backend]
    print(f"local ({os.cpu_count()} CPUs):")
    local = embed(common, a.work / "local")
    print("--ray local (starts Ray; its start-up counts):")
    fresh = embed(common + ["--ray", "local"], a.work / "ray-local")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the cluster and its driver (the run) alike
    env = dict(os.environ)
    ray = str(Path(sys.executable).with_name("ray"))
    subprocess.run(
        [ray, "start", "--head", "--include-dashboard=false", "--disable-usage-stats"],
        env=env,
        check=True,
        capture_output=True,
    )
    try:
        print("--ray auto (a Ray already running):")
        running = embed(common + ["--ray", "auto"], a.work / "ray-auto")
    finally:
        subprocess.run([ray, "stop"], env=env, capture_output=True)
    print(
        f"images/s: local {local:.2f}, --ray local {fresh:.2f} ({fresh / local:.2f} of local), "
        f"--ray auto {running:.2f} ({running / local:.2f} of local)"
    )


if __name__ == "__main__":
    main()
