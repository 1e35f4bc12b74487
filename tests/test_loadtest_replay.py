"""Open-loop replay against a stub HTTP server whose latency the test controls.

The stub is a raw asyncio HTTP/1.1 server on its own thread and event loop, so a stall in it is a
real stall seen over real sockets. With ``serial=True`` it handles one request at a time, like a
single inference worker, so a slow request holds up the ones behind it.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from loadtest.cli import main as loadtest_main
from loadtest.replay import ReplayConfig, build_schedule, replay
from loadtest.report import percentile, plot_latency
from loadtest.targets import RemoteTargetError, is_loopback_host
from loadtest.trace import TraceRecord, write_trace


class StubServer:
    """HTTP/1.1 keep-alive server: per-request delay and status chosen by the test, arrivals recorded."""

    def __init__(
        self,
        delay: Callable[[int], float],
        status: Callable[[int], int] = lambda i: 200,
        serial: bool = True,
        close_every: int = 0,
    ) -> None:
        self.delay, self.status, self.serial, self.close_every = delay, status, serial, close_every
        self.arrivals: list[float] = []  # time.monotonic() when each request's body was read
        self.bodies: list[dict] = []
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StubServer:
        self._thread.start()
        assert self._ready.wait(5), "stub server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while await reader.readline():
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                index = len(self.arrivals)
                self.arrivals.append(time.monotonic())
                self.bodies.append(json.loads(body))
                if self.serial:
                    async with self._lock:
                        await asyncio.sleep(self.delay(index))
                else:
                    await asyncio.sleep(self.delay(index))
                served += 1
                close = self.close_every and served % self.close_every == 0
                payload = json.dumps({"items": [], "i": index}).encode()
                writer.write(
                    b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
                    % (self.status(index), len(payload), b"Connection: close\r\n" if close else b"")
                    + payload
                )
                await writer.drain()
                if close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def records_at(times: list[float]) -> list[TraceRecord]:
    return [TraceRecord(t=t, user_id=f"u{i}", history=("1", "2"), beam_width=32) for i, t in enumerate(times)]


@pytest.fixture()
def even_records() -> Iterator[list[TraceRecord]]:
    yield records_at([i * 0.02 for i in range(60)])  # 50 requests/s for 1.2 s


def test_stall_raises_later_latency_and_schedule_does_not_stretch(even_records: list[TraceRecord]) -> None:
    stall_index, stall_s = 10, 0.6
    with StubServer(lambda i: stall_s if i == stall_index else 0.005) as server:
        result = replay(even_records, ReplayConfig(target=server.url, timeout_s=5))
        arrivals = np.array(server.arrivals) - server.arrivals[0]
    samples = result.samples
    assert all(s.ok for s in samples), result.report["status_counts"]
    # Open loop: requests kept arriving on schedule while the server was stalled.
    scheduled = np.array([s.scheduled for s in samples])
    assert len(arrivals) == len(samples)
    assert np.max(np.abs(np.sort(arrivals) - scheduled)) < 0.1
    assert arrivals.max() < 1.18 + 0.1  # a closed-loop client would need 1.18 + 0.6 s
    # Latency is measured from the scheduled time: requests queued behind the stall show it.
    before = [s.latency for s in samples[:stall_index]]
    behind = [s.latency for s in samples[stall_index + 1 : stall_index + 6]]
    assert max(before) < 0.2
    assert min(behind) > 0.4  # stall 0.6 s minus at most 5 x 20 ms of schedule
    assert samples[stall_index].latency >= stall_s
    assert result.report["latency_ms"]["max"] >= stall_s * 1000


def test_reported_percentiles_match_raw_samples() -> None:
    rng = np.random.default_rng(0)
    delays = rng.uniform(0.001, 0.04, size=80).tolist()
    with StubServer(lambda i: delays[i], serial=False) as server:
        result = replay(records_at([i * 0.01 for i in range(80)]), ReplayConfig(target=server.url))
    raw_ms = np.array([s.latency * 1000 for s in result.samples if s.ok])
    assert len(raw_ms) == 80
    reported = result.report["latency_ms"]
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9)):
        assert reported[name] == pytest.approx(float(np.percentile(raw_ms, q)), abs=1e-3), name
        assert percentile(raw_ms.tolist(), q) == pytest.approx(float(np.percentile(raw_ms, q)))
    assert reported["max"] == pytest.approx(float(raw_ms.max()), abs=1e-3)
    assert reported["count"] == 80
    assert result.report["throughput_rps"]["offered"] == pytest.approx(100.0, rel=1e-6)
    # every latency includes the server's delay for that request
    assert all(s.latency >= delays[i] - 1e-4 for i, s in enumerate(result.samples))


def test_inflight_limit_drops_instead_of_delaying() -> None:
    with StubServer(lambda i: 0.3) as server:  # serial and slow: requests pile up
        started = time.perf_counter()
        result = replay(
            records_at([i * 0.01 for i in range(30)]),
            ReplayConfig(target=server.url, max_inflight=3, timeout_s=5),
        )
        elapsed = time.perf_counter() - started
        received = len(server.arrivals)
    report = result.report
    dropped = report["requests"]["dropped_client"]
    assert dropped >= 20
    assert report["requests"]["sent"] + dropped == 30
    assert received == report["requests"]["sent"]
    assert report["errors_by_status"]["dropped_client"] == dropped
    assert elapsed < 0.3 + 3 * 0.3 + 1.0  # bounded: the schedule, then the three in flight


def test_timeouts_errors_and_reconnects_are_counted() -> None:
    statuses = {3: 429, 4: 503}
    with StubServer(
        lambda i: 2.0 if i == 7 else 0.001, status=lambda i: statuses.get(i, 200), serial=False, close_every=2
    ) as server:
        started = time.perf_counter()
        result = replay(records_at([i * 0.02 for i in range(12)]), ReplayConfig(target=server.url, timeout_s=0.3))
        elapsed = time.perf_counter() - started
    counts = result.report["status_counts"]
    assert counts == {"200": 9, "429": 1, "503": 1, "timeout": 1}
    assert result.report["errors_by_status"] == {"429": 1, "503": 1, "timeout": 1}
    assert math.isnan(result.samples[7].latency)
    assert elapsed < 0.22 + 0.3 + 1.0


def test_request_bodies_are_the_trace_requests(even_records: list[TraceRecord]) -> None:
    with StubServer(lambda i: 0.0, serial=False) as server:
        replay(even_records[:5], ReplayConfig(target=server.url))
        bodies = sorted(server.bodies, key=lambda b: int(b["user_id"][1:]))
    assert bodies == [r.request_body() for r in even_records[:5]]


def test_schedule_speed_rate_and_duration() -> None:
    records = records_at([10.0, 11.0, 13.0])
    assert [t for t, _ in build_schedule(records, ReplayConfig(target="http://127.0.0.1:1"))] == [
        0.0,
        1.0,
        3.0,
    ]
    fast = build_schedule(records, ReplayConfig(target="http://127.0.0.1:1", speed=2.0))
    assert [t for t, _ in fast] == [0.0, 0.5, 1.5]
    fixed = build_schedule(records, ReplayConfig(target="http://127.0.0.1:1", rate=4.0, duration=2.0))
    assert len(fixed) == 8 and fixed[1][0] == 0.25
    assert [r.user_id for _, r in fixed[:4]] == ["u0", "u1", "u2", "u0"]  # the trace is cycled
    cut = build_schedule(records, ReplayConfig(target="http://127.0.0.1:1", duration=2.0))
    assert len(cut) == 2
    with pytest.raises(ValueError):
        ReplayConfig(target="http://127.0.0.1:1", speed=2.0, rate=3.0)


@pytest.mark.parametrize("host", ["10.1.2.3", "8.8.8.8", "[2001:db8::1]", "192.168.0.1"])
def test_non_loopback_target_is_refused(host: str) -> None:
    with pytest.raises(RemoteTargetError, match="not a loopback"):
        replay(records_at([0.0]), ReplayConfig(target=f"http://{host}:8000"))
    with pytest.raises(RemoteTargetError):
        replay(records_at([0.0]), ReplayConfig(target=f"grpc://{host}:50051"))


def test_loopback_hosts_are_recognised() -> None:
    for host in ("localhost", "127.0.0.1", "127.3.2.1", "::1"):
        assert is_loopback_host(host), host
    for host in ("10.0.0.1", "0.0.0.0", "::", "2001:db8::1"):
        assert not is_loopback_host(host), host


def test_cli_refuses_remote_and_writes_report_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.jsonl"
    write_trace(trace, records_at([i * 0.01 for i in range(20)]))
    assert loadtest_main(["replay", str(trace), "--target", "http://10.9.8.7:80", "--quiet"]) == 2
    assert "not a loopback" in capsys.readouterr().err
    out, plot = tmp_path / "report.json", tmp_path / "lat.png"
    with StubServer(lambda i: 0.002, serial=False) as server:
        code = loadtest_main(
            [
                "replay",
                str(trace),
                "--target",
                server.url,
                "--out",
                str(out),
                "--plot",
                str(plot),
                "--speed",
                "2",
                "--samples",
            ]
        )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["requests"]["ok"] == 20 and len(report["samples"]) == 20
    assert report["throughput_rps"]["offered"] == pytest.approx(200.0, rel=1e-6)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    err = capsys.readouterr().err
    assert "[replay]" in err or "late sends" in err  # progress / summary on stderr


def test_plot_handles_errors_only(tmp_path: Path) -> None:
    from loadtest.report import Sample

    samples = [Sample(0, 0.0, 0.0, 0.01, "200", True), Sample(1, 0.1, 0.0, 0.5, "429", False)]
    plot_latency(samples, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
