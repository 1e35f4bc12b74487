"""What the measured servers say about themselves: our service's /metrics, the batched baseline's /stats.

``breakdown_step`` brackets one more step of the rate sweep by two scrapes of our /metrics, to split
a request's time between the engine's queue, its decode steps and the rest; ``batch_stats`` and
``batch_histogram_delta`` count the batches the Hugging Face batched server ran, by size.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from benchmarks.rate_sweep import SweepSettings, run_step
from loadtest.trace import TraceRecord


def batch_stats(url: str) -> dict[str, int]:
    """Batches the batched alternative has run so far, by size (its /stats)."""
    import httpx

    sizes = httpx.get(f"{url}/stats", timeout=10).json()["batch_sizes"]
    return {str(k): int(v) for k, v in sizes.items()}


def batch_histogram_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """Batches run between two /stats readings: count by size, how many, and the mean size."""
    delta = {size: after[size] - before.get(size, 0) for size in after if after[size] - before.get(size, 0) > 0}
    batches = sum(delta.values())
    requests = sum(int(size) * count for size, count in delta.items())
    return {
        "by_size": dict(sorted(delta.items(), key=lambda kv: int(kv[0]))),
        "batches": batches,
        "mean_size": round(requests / batches, 2) if batches else None,
        "max_size": max((int(size) for size in delta), default=None),
    }


def scrape_metrics(url: str) -> dict[str, float]:
    """Every sample of our service's /metrics summed over labels (histogram _sum and _count included)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


async def breakdown_step(
    url: str, records: Sequence[TraceRecord], rate: float, settings: SweepSettings
) -> dict[str, Any]:
    """Where a request's time goes at ``rate``: client latency vs the server's own measurements.

    The engine reports per decode step (``onerec_batch_size``: requests in the step,
    ``onerec_batch_rows``: decoder rows, ``onerec_batch_decode_seconds``: its time), so the figures
    here are per step, not per batch as before the engine process.
    """
    before = await asyncio.to_thread(scrape_metrics, url)
    step = await run_step(url, records, rate, settings)
    after = await asyncio.to_thread(scrape_metrics, url)
    delta = {name: after[name] - before.get(name, 0.0) for name in after}

    def mean(name: str, per: str, scale: float = 1.0) -> float | None:
        count = delta.get(per, 0.0)
        return round(scale * delta.get(name, 0.0) / count, 3) if count else None

    return {
        "offered_rps": step["offered_rps"],
        "client_latency_ms": {"p50": step["p50_ms"], "p99": step["p99_ms"]},
        "cpu_cores": step["cpu_cores"],
        "server_request_mean_ms": mean(
            "onerec_request_duration_seconds_sum", "onerec_request_duration_seconds_count", 1000.0
        ),
        "queue_wait_mean_ms": mean("onerec_queue_wait_seconds_sum", "onerec_queue_wait_seconds_count", 1000.0),
        "decode_steps": int(delta.get("onerec_batch_size_count", 0.0)),
        "mean_requests_per_step": mean("onerec_batch_size_sum", "onerec_batch_size_count"),
        "mean_rows_per_step": mean("onerec_batch_rows_sum", "onerec_batch_rows_count"),
        "ms_per_step": mean("onerec_batch_decode_seconds_sum", "onerec_batch_decode_seconds_count", 1000.0),
        "encode_ms_per_joining_step": mean(
            "onerec_batch_encode_seconds_sum", "onerec_batch_encode_seconds_count", 1000.0
        ),
        "note": "server_request = time inside the front end's handler (engine queue wait + decode steps + "
        "feature store + response); client latency minus it is the HTTP front end, the socket and the client",
    }
