"""Latency of GET /generations/{id} under 50 concurrent clients while a generation's Ray job runs.

    .venv/bin/python bench/api_latency.py [--clients 50] [--seconds 60] [--interval 0.1]

Starts `nstudent serve` (local Ray head, SQLite) on the bundled digits, posts a generation, waits until its
first Ray job reports progress (its workers are up), then drives the endpoint with N clients on keep-alive
connections: first each
polling every --interval seconds, then each sending its next request the moment the last one answered.
Prints p50/p95/p99/max latency and requests per second of both as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.server import Server  # noqa: E402
from service import digits  # noqa: E402

TOKEN = "bench-token"


async def client(url: str, until: float, interval: float, latencies: list[float], errors: list[int]) -> None:
    """One keep-alive HTTP/1.1 connection, as light as a load generator can be (an httpx client costs more
    CPU than the server does). Closed loop when ``interval`` is 0; otherwise one request every ``interval``
    seconds, its latency counted from the scheduled send time (no coordinated omission)."""
    parsed = urlparse(url)
    reader, writer = await asyncio.open_connection(parsed.hostname, parsed.port)
    request = f"GET {parsed.path} HTTP/1.1\r\nHost: {parsed.hostname}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    # Pollers are not in step with each other: each starts at a random point of its interval.
    next_send = time.perf_counter() + random.uniform(0, interval)
    try:
        while next_send < until:
            if interval:
                await asyncio.sleep(max(0.0, next_send - time.perf_counter()))
            started = next_send if interval else time.perf_counter()
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors.append(status)
            next_send = next_send + interval if interval else time.perf_counter()
    finally:
        writer.close()


async def drive(url: str, clients: int, seconds: float, interval: float) -> dict:
    latencies: list[float] = []
    errors: list[int] = []
    until = time.perf_counter() + seconds
    await asyncio.gather(*(client(url, until, interval, latencies, errors) for _ in range(clients)))
    ms = np.array(latencies) * 1000
    return {
        "requests": len(ms),
        "requests_per_second": round(len(ms) / seconds, 1),
        "errors": len(errors),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60, help="per load pattern")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between a polling client's requests")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="nst-bench-api-"))
    digits.write(str(root / "digits"))
    server = Server(root, {"NSTUDENT_WRITE_TOKENS": TOKEN, "NSTUDENT_SOURCE_ROOTS": str(root / "digits")})
    server.start()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        train = {
            "architecture": "test_resnet",
            "input_size": 32,
            "mean": [0.13] * 3,
            "std": [0.31] * 3,
            "steps": 400,
            "batch_size": 16,
            "unlabeled_ratio": 3,
            "checkpoint_every": 20,
        }
        body = {
            "labeled": str(root / "digits/labeled"),
            "unlabeled": str(root / "digits/unlabeled"),
            "eval": str(root / "digits/test"),
            "teacher_config": train,
            "student": train,
        }
        gid = httpx.post(f"{server.url}/generations", json=body, headers=auth, timeout=30).json()["id"]
        url = f"{server.url}/generations/{gid}"
        # Measure while the job is in its stride: its Ray workers have started and report progress.
        while not (g := httpx.get(url, headers=auth).json())["progress"].get("phase"):
            assert g["stage"] not in ("failed", "cancelled"), g["error"]
            time.sleep(0.5)
        before = g["stage"]
        # Clients polling every `interval` (what a dashboard or a CLI waiting on a job does), then clients
        # sending their next request the moment the last one answered (the saturation point).
        polling = asyncio.run(drive(url, args.clients, args.seconds, args.interval))
        saturated = asyncio.run(drive(url, args.clients, args.seconds, 0.0))
        after = httpx.get(url, headers=auth).json()["stage"]
    finally:
        server.stop()
    print(
        json.dumps(
            {
                "endpoint": "GET /generations/{id}",
                "clients": args.clients,
                "seconds": args.seconds,
                f"polling_every_{args.interval}s": polling,
                "closed_loop": saturated,
                "stages_during_run": [before, after],
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
