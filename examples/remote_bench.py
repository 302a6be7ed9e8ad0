"""How fast `siglip embed --server` is against the server alone and against a local run, and what it sends.

    python examples/remote_bench.py CHECKPOINT PHOTOS [--copies 4] [--port 8799]

Prints, for the checkpoint's layout: the bytes per image of each wire encoding (--wire raw|webp); the server's
own throughput for the run's batches (decoded beforehand, sent with the run's batches in flight); `siglip embed
--server` end to end (the run's own images/s); and a local `siglip embed` (torch, as the server runs it, and
the default backend) with the server stopped. Everything on this machine, over loopback.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from siglip_cli import wire
from siglip_cli.encoders.remote import IN_FLIGHT, RemoteEncoder
from siglip_cli.loader import batches
from siglip_cli.sources import iter_files


def library(photos: str, copies: int) -> str:
    """The photos, `copies` times over (distinct files: an index keys rows by path)."""
    root = tempfile.mkdtemp(prefix="siglip-bench-")
    for c in range(copies):
        os.makedirs(f"{root}/{c}")
        for name in sorted(os.listdir(photos)):
            shutil.copy(os.path.join(photos, name), f"{root}/{c}/{name}")
    return root


def serve(ckpt: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "siglip_cli", "serve", "-m", ckpt, "--port", str(port)], stderr=subprocess.DEVNULL
    )
    for _ in range(600):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def rate(cmd: list[str]) -> float:
    """The images/s of a run's summary line."""
    err = subprocess.run(cmd, capture_output=True, text=True).stderr
    found = re.search(r"([\d.]+) images/s", err)
    if not found:
        raise SystemExit(err)
    return float(found.group(1))


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("checkpoint")
    args.add_argument("photos")
    args.add_argument("--copies", type=int, default=4)
    args.add_argument("--port", type=int, default=8799)
    a = args.parse_args()
    url = f"http://127.0.0.1:{a.port}"
    root = library(a.photos, a.copies)
    proc = serve(a.checkpoint, a.port)
    try:
        remote = RemoteEncoder(url)
        remote.require(remote.describe()["signature"])
        size = remote.batch_size(None)
        decoded = [b for b in batches(iter_files([root], None, (".jpeg", ".jpg")), remote.spec, size, 1) if b.ok]
        n = sum(len(b.ok) for b in decoded)
        for encoding in wire.ENCODINGS:
            b = decoded[0]
            images = [b.pixels[j].numpy() for j in range(len(b.ok))]
            grids = [tuple(g) for g in b.grids.tolist()] if remote.naflex else [(0, 0)] * len(images)
            body = wire.pack(remote.spec, images, grids, encoding, {})
            print(f"{encoding}: {len(body) / len(images) / 1024:.1f} KiB per image ({remote.info.preprocessing})")
        remote.encode_images(decoded[0])  # warm
        queue = list(decoded)
        lock = threading.Lock()

        def lane():
            while True:
                with lock:
                    if not queue:
                        return
                    batch = queue.pop()
                remote.encode_images(batch)

        t = time.perf_counter()
        lanes = [threading.Thread(target=lane) for _ in range(IN_FLIGHT)]
        for th in lanes:
            th.start()
        for th in lanes:
            th.join()
        alone = n / (time.perf_counter() - t)
        print(f"server alone, {n} pre-decoded images in batches of {size}: {alone:.1f} images/s")
        out = tempfile.mkdtemp()
        e2e = rate(["siglip", "embed", root, "--server", url, "-o", f"{out}/remote"])
        print(f"embed --server end to end: {e2e:.1f} images/s ({e2e / alone:.0%} of the server alone)")
    finally:
        proc.terminate()
        proc.wait()
    local = rate(["siglip", "embed", root, "-m", a.checkpoint, "--backend", "torch", "-o", f"{out}/torch"])
    default = rate(["siglip", "embed", root, "-m", a.checkpoint, "-o", f"{out}/default"])
    print(f"local embed, torch: {local:.1f} images/s (--server: {e2e / local:.0%} of it)")
    print(f"local embed, default backend: {default:.1f} images/s")
    shutil.rmtree(root)
    shutil.rmtree(out)


if __name__ == "__main__":
    main()
