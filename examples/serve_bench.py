"""Benchmark a running `siglip serve`: requests/s, items/s and p50/p95/p99 latency of single-item requests
at 1, 8, 32 and 64 concurrent clients, for texts and for images.

    siglip serve -m MODEL &
    python examples/serve_bench.py http://127.0.0.1:8002 ../shared/data/images --seconds 15
"""

import argparse
import asyncio
import base64
import pathlib
import time

import httpx
import numpy as np


async def level(url: str, route: str, items: list, clients: int, seconds: float) -> dict:
    latencies, errors = [], 0

    async def client(k: int, http: httpx.AsyncClient, until: float):
        nonlocal errors
        i = k
        while time.monotonic() < until:
            t = time.perf_counter()
            r = await http.post(route, json={"input": items[i % len(items)]})
            latencies.append(time.perf_counter() - t)
            errors += r.status_code != 200
            i += clients

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients + 4)) as http:
        await http.post(route, json={"input": items[0]})  # warm
        t = time.monotonic()
        await asyncio.gather(*(client(k, http, t + seconds) for k in range(clients)))
        took = time.monotonic() - t
    p = np.percentile(latencies, [50, 95, 99]) * 1000
    return {
        "route": route,
        "clients": clients,
        "requests_s": len(latencies) / took,
        "errors": errors,
        "p50_ms": p[0],
        "p95_ms": p[1],
        "p99_ms": p[2],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("images", help="a folder of photos to send")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--only", choices=["text", "image"])
    a = ap.parse_args()
    files = sorted(p for p in pathlib.Path(a.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:64]
    images = [base64.b64encode(p.read_bytes()).decode() for p in files]
    texts = [f"a photo of thing number {i}" for i in range(64)]
    print("| route | clients | requests/s (= items/s) | p50 ms | p95 ms | p99 ms | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for route, items in (("/txt/embed", texts), ("/img/embed", images)):
        if a.only and a.only not in route:
            continue
        for clients in map(int, a.clients.split(",")):
            r = asyncio.run(level(a.url, route, items, clients, a.seconds))
            print(
                f"| {route} | {clients} | {r['requests_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                f"{r['p99_ms']:.0f} | {r['errors']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
