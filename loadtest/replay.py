"""Open-loop replay: every request leaves at its scheduled time, whatever earlier requests are doing.

Closed-loop load generators (Locust, a loop of ``await client.post``) wait for an answer before the
next request, so when the server stalls they stop sending and the stall disappears from the
numbers ("coordinated omission"). Here one scheduler coroutine walks the schedule and starts a
task per request at its due time; latency is measured from the *scheduled* time, so a request
that waited behind a stall, in the server or in this client, carries that wait in its latency.

The run is bounded three ways: by the trace (or ``rate x duration`` requests), by ``duration``,
and by ``max_inflight``: a request due while that many are outstanding is not sent and is counted
as ``dropped_client`` (delaying it instead would silently turn the run closed-loop).
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from loadtest.report import Sample, build_report, latency_summary_ms
from loadtest.targets import ProtocolError, Target, check_target_allowed, make_target, parse_target
from loadtest.trace import TraceRecord

START_LEAD_S = 0.05  # time to set up before the first scheduled send


@dataclass
class ReplayConfig:
    """How to replay a trace. ``speed`` rescales trace time; ``rate`` replaces it by a fixed rate."""

    target: str
    speed: float | None = None
    rate: float | None = None
    duration: float | None = None
    max_inflight: int = 256
    timeout_s: float = 10.0
    late_threshold_s: float = 0.005
    allow_remote: bool = False
    max_requests: int | None = None
    progress: bool = False
    progress_interval_s: float = 1.0
    include_samples: bool = False

    def __post_init__(self) -> None:
        if self.speed is not None and self.rate is not None:
            raise ValueError("give --speed or --rate, not both")
        for name in ("speed", "rate", "duration"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")


@dataclass
class ReplayResult:
    samples: list[Sample]
    wall_seconds: float
    config: ReplayConfig
    protocol: str
    report: dict[str, Any] = field(default_factory=dict)


def build_schedule(records: Sequence[TraceRecord], config: ReplayConfig) -> list[tuple[float, TraceRecord]]:
    """(offset in seconds, record) pairs, in time order, starting at offset 0.

    * default: the trace's own times, shifted so the first request is at 0;
    * ``speed``: those times divided by ``speed`` (2.0 replays twice as fast);
    * ``rate``: evenly spaced at 1/rate, in trace order; with a ``duration`` the trace is cycled to
      fill ``rate x duration`` requests, otherwise each record is sent once.
    ``duration`` then drops everything scheduled at or after it, and ``max_requests`` caps the count.
    """
    if not records:
        return []
    if config.rate is not None:
        count = len(records)
        if config.duration is not None:
            count = max(1, math.ceil(config.rate * config.duration - 1e-9))
        if config.max_requests is not None:
            count = min(count, config.max_requests)
        schedule = [(i / config.rate, records[i % len(records)]) for i in range(count)]
    else:
        origin = records[0].t
        scale = 1.0 / config.speed if config.speed else 1.0
        schedule = [((record.t - origin) * scale, record) for record in records]
    if config.duration is not None:
        schedule = [(t, record) for t, record in schedule if t < config.duration]
    if config.max_requests is not None:
        schedule = schedule[: config.max_requests]
    return schedule


class _Progress:
    """Counters shared by the scheduler, the request tasks and the progress printer."""

    def __init__(self) -> None:
        self.sent = 0
        self.dropped = 0
        self.ok = 0
        self.errors = 0
        self.late = 0
        self.inflight = 0
        self.window_latencies: list[float] = []


async def replay_async(
    records: Sequence[TraceRecord],
    config: ReplayConfig,
    target: Target | None = None,
    stream: TextIO | None = None,
) -> ReplayResult:
    """Replay ``records`` against ``config.target``; see the module docstring for the rules."""
    address = parse_target(config.target)
    check_target_allowed(address, config.allow_remote)
    schedule = build_schedule(records, config)
    own_target = target is None
    target = target or make_target(address, config.timeout_s)
    loop = asyncio.get_running_loop()
    progress = _Progress()
    samples: list[Sample | None] = [None] * len(schedule)
    tasks: set[asyncio.Task[None]] = set()
    start = loop.time() + START_LEAD_S
    printer = None
    if config.progress:
        printer = asyncio.create_task(_print_progress(progress, len(schedule), start, config, stream or sys.stderr))
    wall_start = time.perf_counter()
    try:
        for index, (offset, record) in enumerate(schedule):
            due = start + offset
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif index % 64 == 0:
                await asyncio.sleep(0)  # behind schedule: still let responses be read
            if progress.inflight >= config.max_inflight:
                progress.dropped += 1
                samples[index] = Sample(index, offset, loop.time() - due, math.nan, "dropped_client", False)
                continue
            progress.inflight += 1
            task = asyncio.create_task(_one_request(target, record, index, offset, due, config, progress, samples))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks), timeout=config.timeout_s + 1.0)
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.wait(set(tasks), timeout=1.0)
    finally:
        if printer is not None:
            printer.cancel()
        if own_target:
            await target.close()
    wall = time.perf_counter() - wall_start
    final = [
        s if s is not None else Sample(i, schedule[i][0], math.nan, math.nan, "cancelled", False)
        for i, s in enumerate(samples)
    ]
    result = ReplayResult(samples=final, wall_seconds=wall, config=config, protocol=address.scheme)
    result.report = build_report(
        final,
        target=address.url,
        protocol=address.scheme,
        wall_seconds=wall,
        late_threshold_s=config.late_threshold_s,
        settings=_settings(config, len(records)),
        include_samples=config.include_samples,
    )
    return result


def _settings(config: ReplayConfig, trace_records: int) -> dict[str, Any]:
    settings = asdict(config)
    settings.pop("progress", None)
    settings.pop("progress_interval_s", None)
    settings.pop("include_samples", None)
    settings["trace_records"] = trace_records
    return settings


async def _one_request(
    target: Target,
    record: TraceRecord,
    index: int,
    offset: float,
    due: float,
    config: ReplayConfig,
    progress: _Progress,
    samples: list[Sample | None],
) -> None:
    loop = asyncio.get_running_loop()
    lag = loop.time() - due
    progress.sent += 1
    if lag > config.late_threshold_s:
        progress.late += 1
    status, ok, latency = "cancelled", False, math.nan
    try:
        status, ok = await asyncio.wait_for(target.send(record), timeout=config.timeout_s)
        latency = loop.time() - due
    except asyncio.TimeoutError:
        status = "timeout"
    except ProtocolError:
        status = "protocol_error"
    except (OSError, asyncio.IncompleteReadError):
        status = "connect_error"
    except Exception:  # noqa: BLE001 - a malformed answer must count as an error, not kill the run
        status = "client_error"
    except asyncio.CancelledError:
        samples[index] = Sample(index, offset, lag, math.nan, "cancelled", False)
        progress.inflight -= 1
        raise
    finally:
        if samples[index] is None:
            samples[index] = Sample(index, offset, lag, latency, status, ok)
            progress.inflight -= 1
            if ok:
                progress.ok += 1
                progress.window_latencies.append(latency)
            else:
                progress.errors += 1


async def _print_progress(progress: _Progress, total: int, start: float, config: ReplayConfig, stream: TextIO) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(config.progress_interval_s)
        window, progress.window_latencies = progress.window_latencies, []
        p99 = latency_summary_ms(window)["p99"]
        late_share = progress.late / progress.sent if progress.sent else 0.0
        stream.write(
            f"[replay] t={loop.time() - start:6.1f}s sent={progress.sent}/{total} ok={progress.ok} "
            f"err={progress.errors} dropped={progress.dropped} inflight={progress.inflight} "
            f"late={late_share:.1%} p99(last {config.progress_interval_s:.0f}s)={p99} ms\n"
        )
        stream.flush()


def replay(records: Sequence[TraceRecord], config: ReplayConfig, stream: TextIO | None = None) -> ReplayResult:
    """Synchronous wrapper: runs the replay on a fresh event loop (uvloop is not required)."""
    return asyncio.run(replay_async(records, config, stream=stream))


def replay_with(
    records: Sequence[TraceRecord], config: ReplayConfig, target_factory: Callable[[], Target]
) -> ReplayResult:
    """Replay with a caller-made target (tests, custom clients), created inside the event loop."""

    async def run() -> ReplayResult:
        target = target_factory()
        try:
            return await replay_async(records, config, target=target)
        finally:
            await target.close()

    return asyncio.run(run())
