"""Latency of GET /generations/{id} under 50 concurrent clients while a generation's Ray job runs.

    .venv/bin/python bench/api_latency.py [--clients 50] [--seconds 60]

Starts `nstudent serve` (local Ray head, SQLite) on the bundled digits, posts a generation, waits until its
labeling or training job is running, then drives the endpoint with N clients, each sending its next request
as soon as the last one answered. Prints p50/p95/p99/max latency and requests per second as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service import digits  # noqa: E402
from tests.api.server import Server  # noqa: E402

AUTH = {"Authorization": "Bearer bench-token"}


async def client(url: str, until: float, latencies: list[float], errors: list[int]) -> None:
    async with httpx.AsyncClient(headers=AUTH, timeout=30) as http:
        while time.perf_counter() < until:
            started = time.perf_counter()
            r = await http.get(url)
            latencies.append(time.perf_counter() - started)
            if r.status_code != 200:
                errors.append(r.status_code)


async def drive(url: str, clients: int, seconds: float) -> tuple[list[float], list[int]]:
    latencies: list[float] = []
    errors: list[int] = []
    until = time.perf_counter() + seconds
    await asyncio.gather(*(client(url, until, latencies, errors) for _ in range(clients)))
    return latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="nst-bench-api-"))
    digits.write(str(root / "digits"))
    server = Server(root, {"NSTUDENT_WRITE_TOKENS": "bench-token", "NSTUDENT_SOURCE_ROOTS": str(root / "digits")})
    server.start()
    try:
        train = {"architecture": "test_resnet", "input_size": 32, "mean": [0.13] * 3, "std": [0.31] * 3,
                 "steps": 400, "batch_size": 16, "unlabeled_ratio": 3, "checkpoint_every": 20}
        body = {"labeled": str(root / "digits/labeled"), "unlabeled": str(root / "digits/unlabeled"),
                "eval": str(root / "digits/test"), "teacher_config": train, "student": train}
        gid = httpx.post(f"{server.url}/generations", json=body, headers=AUTH, timeout=30).json()["id"]
        url = f"{server.url}/generations/{gid}"
        while (stage := httpx.get(url, headers=AUTH).json()["stage"]) == "queued":
            time.sleep(0.5)
        latencies, errors = asyncio.run(drive(url, args.clients, args.seconds))
        after = httpx.get(url, headers=AUTH).json()["stage"]
    finally:
        server.stop()
    ms = np.array(latencies) * 1000
    print(json.dumps({
        "endpoint": "GET /generations/{id}",
        "clients": args.clients,
        "seconds": args.seconds,
        "requests": len(ms),
        "requests_per_second": round(len(ms) / args.seconds, 1),
        "errors": len(errors),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
        "stages_during_run": [stage, after],
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
    }, indent=2))


if __name__ == "__main__":
    main()
