"""The rate search against one running server: the highest open-loop rate whose p99 meets a budget.

Each step is a ``loadtest`` open-loop replay at a fixed rate (latency from the scheduled send time)
with the server's CPU measured alongside; ``sweep`` rises geometrically until a step fails, bisects,
and then offers more than the server keeps up with to measure its saturated throughput. Used by the
serving and overload benchmarks.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.process_cpu import CpuMonitor
from benchmarks.workload import log
from loadtest.replay import ReplayConfig, replay_async
from loadtest.report import latency_summary_ms
from loadtest.targets import HttpTarget, parse_target
from loadtest.trace import TraceRecord


async def single_latency(url: str, records: Sequence[TraceRecord], count: int, max_seconds: float) -> dict[str, Any]:
    """Sequential requests (one at a time, closed loop on purpose): the latency of a lone request."""
    target = HttpTarget(parse_target(url))
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    deadline = time.perf_counter() + max_seconds
    try:
        for i in range(count):
            if time.perf_counter() > deadline and len(latencies) >= 3:
                break
            start = time.perf_counter()
            status, ok = await asyncio.wait_for(target.send(records[i % len(records)]), timeout=60)
            statuses[status] += 1
            if ok:
                latencies.append(time.perf_counter() - start)
    finally:
        await target.close()
    summary = latency_summary_ms(latencies)
    summary["statuses"] = dict(statuses)
    return summary


@dataclass
class SweepSettings:
    budget_ms: float
    step_seconds: float = 5.0
    min_requests: int = 40
    max_step_seconds: float = 10.0
    growth: float = 1.6
    max_steps: int = 8
    refine_steps: int = 2
    max_inflight: int = 512
    time_limit_s: float = 75.0
    down_steps: int = 3
    min_rate: float = 0.2
    single_rate_hint: float = 1.0  # 1 / single-request latency, set per row
    saturation_doublings: int = 5  # extra saturation steps, each offering twice the last, while it keeps up
    saturation_extra_s: float = 0.0  # the saturation steps may run this long past time_limit_s
    confirm_failures: bool = True
    server_pid: int | None = None


async def run_step(
    url: str, records: Sequence[TraceRecord], rate: float, settings: SweepSettings, timeout_s: float | None = None
) -> dict[str, Any]:
    """One open-loop replay at a fixed rate; passes when there are no errors and p99 is within budget."""
    duration = min(settings.max_step_seconds, max(settings.step_seconds, settings.min_requests / rate))
    config = ReplayConfig(
        target=url,
        rate=rate,
        duration=duration,
        max_inflight=settings.max_inflight,
        timeout_s=timeout_s or max(5.0, 20 * settings.budget_ms / 1000.0),
    )
    monitor = CpuMonitor(settings.server_pid)
    result = await replay_async(records, config)
    cpu = monitor.cores()
    report = result.report
    lat = report["latency_ms"]
    passed = report["requests"]["errors"] == 0 and lat["p99"] is not None and lat["p99"] <= settings.budget_ms
    await asyncio.sleep(0.5)  # let the server drain before the next step
    return {
        "offered_rps": round(rate, 3),
        "achieved_rps": report["throughput_rps"]["achieved_ok"],
        "requests": report["requests"]["scheduled"],
        "p50_ms": lat["p50"],
        "p90_ms": lat["p90"],
        "p99_ms": lat["p99"],
        "p99.9_ms": lat["p99.9"],
        "max_ms": lat["max"],
        "errors": report["errors_by_status"],
        "late_share": report["late"]["share"],
        "cpu_cores": cpu,
        "pass": passed,
    }


async def sweep(url: str, records: Sequence[TraceRecord], first_rate: float, settings: SweepSettings) -> dict[str, Any]:
    """Find the highest rate that passes, then measure the saturated throughput.

    Rates rise geometrically from ``first_rate`` until a step fails (or fall from it until one passes),
    then bisect between the last pass and the first fail. A last step offers 1.5x the highest rate
    tried (doubled while the server keeps up with the offer): what the server completes there is its
    throughput when saturated (budget ignored).
    """
    started = time.perf_counter()
    curve: list[dict[str, Any]] = []

    async def step_at(rate: float, confirm: bool = True, timeout_s: float | None = None) -> dict[str, Any]:
        step = await run_step(url, records, rate, settings, timeout_s)
        log(
            f"  {url} rate {rate:8.2f} rps: p99 {step['p99_ms']} ms achieved {step['achieved_rps']} "
            f"errors {step['errors']} late {step['late_share']:.1%} cpu {step['cpu_cores']} "
            f"{'PASS' if step['pass'] else 'FAIL'}"
        )
        if not step["pass"] and confirm and settings.confirm_failures:
            # The machine is shared: a failure is believed only if a second run at that rate fails too.
            step["confirmed_by_retry"] = False
            retry = await step_at(rate, confirm=False, timeout_s=timeout_s)
            if retry["pass"]:
                curve.remove(retry)
                retry["passed_on_retry"] = True
                retry["first_try"] = {k: step[k] for k in ("p99_ms", "errors", "cpu_cores")}
                step = retry
            else:
                step["confirmed_by_retry"] = True
        if step not in curve:
            curve.append(step)
        return step

    def out_of_time() -> bool:
        return time.perf_counter() - started > settings.time_limit_s

    best_pass: dict[str, Any] | None = None
    first_fail: dict[str, Any] | None = None
    rate = first_rate
    for _ in range(settings.max_steps if first_rate > 0 else 0):
        step = await step_at(rate)
        if not step["pass"]:
            first_fail = step
            break
        best_pass = step
        rate *= settings.growth
        if out_of_time():
            break
    for _ in range(settings.down_steps if best_pass is None else 0):
        rate /= settings.growth**2
        if rate < settings.min_rate or out_of_time():
            break
        step = await step_at(rate)
        if step["pass"]:
            best_pass = step
            break
        first_fail = step
    if first_fail is not None and best_pass is not None:
        low, high = best_pass["offered_rps"], first_fail["offered_rps"]
        for _ in range(settings.refine_steps):
            if out_of_time():
                break
            mid = math.sqrt(low * high)
            step = await step_at(mid)
            if step["pass"]:
                best_pass, low = step, mid
            else:
                high = mid
    # Above every rate tried (not above the last failure: when nothing passes, the search walked
    # down, and 1.5x its lowest rate would "saturate" the server at a trickle).
    if curve:
        saturation_rate = 1.5 * max(s["offered_rps"] for s in curve)
    else:  # no sweep (a lone request misses the budget): 1.5x what one at a time serves
        saturation_rate = 1.5 * settings.single_rate_hint
    # A batching server completes what it is offered far above its one-at-a-time rate: double the
    # offer until the server falls behind it, so the figure is its capacity, not the offer.
    for _ in range(1 + settings.saturation_doublings):
        saturation = await step_at(max(settings.min_rate, saturation_rate), confirm=False, timeout_s=30.0)
        if saturation["pass"] and (best_pass is None or saturation["offered_rps"] > best_pass["offered_rps"]):
            # Every offer while doubling counts, not only the last (which usually fails): a higher rate
            # that met the budget shows an earlier failure was noise or the search stopped short.
            best_pass = saturation
        over = time.perf_counter() - started > settings.time_limit_s + settings.saturation_extra_s
        if (saturation["achieved_rps"] or 0.0) < 0.9 * saturation["offered_rps"] or over:
            break
        saturation_rate = 2 * saturation["offered_rps"]
    saturation["saturation_step"] = True
    curve.sort(key=lambda s: s["offered_rps"])
    return {
        "sustainable_rps": best_pass["offered_rps"] if best_pass else 0.0,
        "p99_at_sustainable_ms": best_pass["p99_ms"] if best_pass else None,
        "max_achieved_rps": max((s["achieved_rps"] or 0.0) for s in curve),
        "saturated_throughput_rps": saturation["achieved_rps"],
        "curve": curve,
    }
