"""Join time: continuous (step-level) against batch-at-a-time scheduling, side by side in one run.

Short ``items`` requests mixed into ``session`` traffic. With batch-at-a-time, a request that arrives
while a batch runs waits for all of that batch's ``m * D`` decode steps; with step-level scheduling it
joins the running rows at the next step and leaves after its own ``D`` steps. What is compared is the
p99 latency of the ``items`` requests (and of the sessions) under the same open-loop Poisson arrivals
at a share of the continuous scheduler's measured capacity.

    python -m benchmarks.join_time --store model-store [--load 0.7] [--duration 30] [--items-share 0.3]

Capacity is measured first: a closed loop of ``--concurrency`` clients sending the same mix back to
back to the continuous server for ``--capacity-seconds``. Prints one JSON report (and writes it with
``--out``). Client and servers share this machine's cores: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.report import emit
from benchmarks.workload import catalogue_ids
from loadtest.launcher import start_service

TIMEOUT_MS = 30000  # the deadline of every request: latency is what is measured, not shedding


def make_bodies(items: list[str], n: int, items_share: float, beam: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        mode = "items" if rng.random() < items_share else "session"
        bodies.append(
            {"user_id": f"join-{i}", "history": rng.sample(items, rng.randint(3, 20)), "num_items": 10,
             "mode": mode, "beam_width": beam, "timeout_ms": TIMEOUT_MS}
        )  # fmt: skip
    return bodies


def summary(latencies: list[float]) -> dict[str, Any]:
    if not latencies:
        return {"n": 0}
    ordered = sorted(latencies)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000, 2)

    return {"n": len(ordered), "p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 2)}  # fmt: skip


async def closed_loop(url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float) -> float:
    """Requests per second completed by ``concurrency`` clients sending back to back."""
    done = 0
    stop_at = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=httpx.Limits(max_connections=concurrency)) as c:

        async def worker(k: int) -> None:
            nonlocal done
            i = k
            while time.monotonic() < stop_at:
                response = await c.post("/v1/recommend", json=bodies[i % len(bodies)])
                done += response.status_code == 200
                i += concurrency

        started = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return done / (time.monotonic() - started)


async def open_loop(url: str, bodies: list[dict[str, Any]], rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """Poisson arrivals at ``rate``; latency from the scheduled send time, per mode."""
    rng = random.Random(seed)
    schedule, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            break
        schedule.append(t)
    latencies: dict[str, list[float]] = {"items": [], "session": []}
    statuses: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=httpx.Limits(max_connections=512)) as c:
        start = time.monotonic() + 0.2

        async def one(at: float, body: dict[str, Any]) -> None:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            response = await c.post("/v1/recommend", json=body)
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            if response.status_code == 200:
                latencies[body["mode"]].append(time.monotonic() - (start + at))

        await asyncio.gather(*(one(at, bodies[i % len(bodies)]) for i, at in enumerate(schedule)))
    return {"offered": len(schedule), "statuses": statuses,
            "items": summary(latencies["items"]), "session": summary(latencies["session"])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("model-store"))
    parser.add_argument("--name", default="demo")
    parser.add_argument("--load", type=float, default=0.7, help="offered rate as a share of measured capacity")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of open-loop traffic per scheduler")
    parser.add_argument("--items-share", type=float, default=0.3, help="share of items requests in the mix")
    parser.add_argument("--beam", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--service-env", action="append", default=[], metavar="KEY=VALUE",
        help="extra service setting for both schedulers, e.g. ONEREC_ENGINES=2 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    bodies = make_bodies(catalogue_ids(args.store, args.name), 2000, args.items_share, args.beam, args.seed)
    logs = Path(tempfile.mkdtemp(prefix="join-time-"))
    env = {"ONEREC_LOG_LEVEL": "WARNING", "ONEREC_MAX_QUEUE": "4096", "ONEREC_POLL_INTERVAL_S": "0"}
    env.update(dict(item.split("=", 1) for item in args.service_env))
    report: dict[str, Any] = {
        "benchmark": "join_time",
        "store": str(args.store),
        "command": " ".join(["python -m benchmarks.join_time", *sys.argv[1:]]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("store", "out")},
        "loadavg_start": os.getloadavg(),
        "schedulers": {},
    }
    rate = None
    for scheduler in ("continuous", "batch"):
        handle = start_service(args.store, logs / f"{scheduler}.log", env={**env, "ONEREC_SCHEDULER": scheduler})
        try:
            asyncio.run(closed_loop(handle.http_url, bodies, args.concurrency, 3.0))  # warm-up
            capacity = asyncio.run(closed_loop(handle.http_url, bodies, args.concurrency, args.capacity_seconds))
            if rate is None:
                rate = args.load * capacity  # the same offered rate for both schedulers
            print(f"[join_time] {scheduler}: capacity {capacity:.1f} rps; offering {rate:.1f} rps", file=sys.stderr)
            result = asyncio.run(open_loop(handle.http_url, bodies, rate, args.duration, args.seed))
            report["schedulers"][scheduler] = {"capacity_rps": round(capacity, 2), "offered_rps": round(rate, 2),
                                               **result}  # fmt: skip
        finally:
            handle.stop()
    cont, batch = report["schedulers"]["continuous"], report["schedulers"]["batch"]
    report["items_p99_ratio_batch_over_continuous"] = round(batch["items"]["p99_ms"] / cont["items"]["p99_ms"], 2)
    report["session_p99_ratio_batch_over_continuous"] = round(batch["session"]["p99_ms"] / cont["session"]["p99_ms"], 2)
    report["goal_items_p99_ratio"] = 3.0
    report["loadavg_end"] = os.getloadavg()
    emit(report, args.out)


if __name__ == "__main__":
    main()
