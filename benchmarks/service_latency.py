"""Service latency and throughput on this machine; prints one JSON report.

What it measures, against real `onerec serve` subprocesses on loopback:
- single-request latency (one client, one request at a time, keep-alive) over HTTP and gRPC at
  beam 32 and 128, in session mode, with p50/p90/p99; and the same requests run directly on the model
  in this process (`model_only`), so the front-end + queue overhead can be read off;
- throughput of a simple closed-loop concurrent client (C workers sending back to back over HTTP)
  with batching on (max_batch_size 16) and off (max_batch_size 1), same requests.

The client runs on the same machine as the server and shares its cores: on a 2-core machine the
throughput numbers are a lower bound of what the server does with the client elsewhere.

    python -m benchmarks.service_latency --store model-store [--requests 200] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
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
from loadtest.launcher import ServiceHandle, start_service


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000

    return {
        "n": len(ordered),
        "p50_ms": round(pick(0.50), 2),
        "p90_ms": round(pick(0.90), 2),
        "p99_ms": round(pick(0.99), 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


def make_bodies(store: Path, name: str, n: int, beam: int, seed: int = 0) -> list[dict[str, Any]]:
    """Requests with random histories drawn from the model's catalogue (same set for every row)."""
    items = catalogue_ids(store, name)
    rng = random.Random(seed)
    return [
        {"user_id": f"bench-{i}", "history": rng.sample(items, rng.randint(3, 20)), "num_items": 10,
         "mode": "session", "beam_width": beam}
        for i in range(n)
    ]  # fmt: skip


def http_latency(server: ServiceHandle, bodies: list[dict[str, Any]]) -> dict[str, float]:
    with httpx.Client(base_url=server.http_url, timeout=60) as client:
        for body in bodies[:10]:
            client.post("/v1/recommend", json=body).raise_for_status()
        samples = []
        for body in bodies:
            started = time.perf_counter()
            client.post("/v1/recommend", json=body).raise_for_status()
            samples.append(time.perf_counter() - started)
    return percentiles(samples)


def grpc_latency(server: ServiceHandle, bodies: list[dict[str, Any]]) -> dict[str, float]:
    import grpc

    from onerec_proto import pb2, pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb2_grpc.RecommenderStub(channel)
        messages = [pb2.RecommendRequest(**body) for body in bodies]
        for message in messages[:10]:
            stub.Recommend(message, timeout=60)
        samples = []
        for message in messages:
            started = time.perf_counter()
            stub.Recommend(message, timeout=60)
            samples.append(time.perf_counter() - started)
    return percentiles(samples)


def model_only_latency(store: Path, name: str, bodies: list[dict[str, Any]]) -> dict[str, float]:
    """The generator alone, in this process: the floor under the service's latency."""
    from onerec.bundle import load_newest_bundle
    from onerec.generate import RecRequest

    bundle, _ = load_newest_bundle(store, name)
    bundle.warmup()
    requests = [
        RecRequest(history=[i for i in (bundle.item_index(x) for x in b["history"]) if i is not None],
                   num_items=b["num_items"], mode=b["mode"], beam_width=b["beam_width"], user_id=b["user_id"])
        for b in bodies
    ]  # fmt: skip
    samples = []
    for request in requests:
        started = time.perf_counter()
        bundle.generator.generate([request])
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


async def closed_loop(url: str, bodies: list[dict[str, Any]], concurrency: int, duration: float) -> dict[str, Any]:
    """C workers, each sending its next request as soon as the previous answered, for `duration` s."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop_at = time.perf_counter() + duration

    async def worker(k: int, client: httpx.AsyncClient) -> None:
        i = k
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            response = await client.post("/v1/recommend", json=bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - started)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            i += concurrency

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await asyncio.gather(*(client.post("/v1/recommend", json=b) for b in bodies[:concurrency]))
        started = time.perf_counter()
        await asyncio.gather(*(worker(k, client) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    ok = statuses.get(200, 0)
    return {"concurrency": concurrency, "seconds": round(elapsed, 2), "requests": sum(statuses.values()),
            "rps": round(ok / elapsed, 1), "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "latency": percentiles(latencies)}  # fmt: skip


def batch_counters(server: ServiceHandle) -> tuple[float, float]:
    """(batches, requests in batches) so far, from the service's own metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    return values.get("onerec_batch_size_count", 0.0), values.get("onerec_batch_size_sum", 0.0)


def throughput_row(server: ServiceHandle, bodies: list[dict[str, Any]], concurrency: int, duration: float) -> dict:
    """One closed-loop run plus the batches the server formed during it."""
    batches0, requests0 = batch_counters(server)
    row = asyncio.run(closed_loop(server.http_url, bodies, concurrency, duration))
    batches1, requests1 = batch_counters(server)
    batches = batches1 - batches0
    row["batches"] = int(batches)
    row["mean_batch_size"] = round((requests1 - requests0) / batches, 2) if batches else 0.0
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("model-store"))
    parser.add_argument("--name", default="demo")
    parser.add_argument("--requests", type=int, default=200, help="requests per latency row")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per throughput row")
    parser.add_argument("--beams", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--throughput-beam", type=int, default=32)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="ONEREC_TORCH_THREADS of the servers (default: the service's default, cores - 1)",
    )
    parser.add_argument("--quick", action="store_true", help="few requests, short runs (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.duration = 30, 3.0
    if not (args.store / args.name).is_dir():
        print(f"no model {args.name!r} in {args.store}: run `onerec build --dataset synthetic --out {args.store} "
              f"--name {args.name}` first", file=sys.stderr)  # fmt: skip
        return 2
    logs = Path(tempfile.mkdtemp(prefix="onerec-bench-"))
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "store": str(args.store), "model": args.name, "mode": "session", "num_items": 10,
        "latency": {}, "throughput": {},
    }  # fmt: skip
    # generous queue and deadline: the throughput rows count answers, not shedding or 504s
    env = {"ONEREC_LOG_LEVEL": "WARNING", "ONEREC_MAX_QUEUE": "1024", "ONEREC_REQUEST_TIMEOUT_MS": "30000"}
    from service.settings import effective_torch_threads

    threads = effective_torch_threads(args.torch_threads)  # the service's own default when not given
    env["ONEREC_TORCH_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)  # the model_only rows use the same setting as the servers
    report["torch_threads"] = threads
    report["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    batched = start_service(args.store, logs / "batched.log", env={**env, "ONEREC_MAX_BATCH_SIZE": "16"})
    try:
        for beam in args.beams:
            bodies = make_bodies(args.store, args.name, args.requests, beam)
            report["latency"][f"beam_{beam}"] = {
                "http": http_latency(batched, bodies),
                "grpc": grpc_latency(batched, bodies),
            }
        bodies = make_bodies(args.store, args.name, 512, args.throughput_beam, seed=1)
        row = throughput_row(batched, bodies, args.concurrency, args.duration)
        report["throughput"]["batching_on"] = {"max_batch_size": 16, **row}
    finally:
        batched.stop()
    single = start_service(args.store, logs / "single.log", env={**env, "ONEREC_MAX_BATCH_SIZE": "1"})
    try:
        row = throughput_row(single, bodies, args.concurrency, args.duration)
        report["throughput"]["batching_off"] = {"max_batch_size": 1, **row}
    finally:
        single.stop()
    on, off = report["throughput"]["batching_on"]["rps"], report["throughput"]["batching_off"]["rps"]
    report["throughput"]["speedup"] = round(on / off, 2) if off else None
    for beam in args.beams:
        bodies = make_bodies(args.store, args.name, args.requests, beam)
        report["latency"][f"beam_{beam}"]["model_only"] = model_only_latency(args.store, args.name, bodies)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]  # other work on the machine skews it
    emit(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
