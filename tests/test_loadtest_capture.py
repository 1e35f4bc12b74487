"""Capture (service side, ONEREC_CAPTURE_PATH) then replay: a trace survives the round trip.

A trace is replayed over HTTP into a real ``onerec serve`` that captures every request; the captured
file is a valid trace carrying the same requests at the same relative times; replaying the capture
over gRPC is answered in full and captured again with every request field as it was (the load
tester knows only the wire: its users are made up over the item ids the service lists).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from loadtest.replay import ReplayConfig, replay
from loadtest.synth import fetch_popular_items, made_up_user_pool, synthesize
from loadtest.trace import REQUEST_FIELDS, TraceRecord, read_trace

pytestmark = pytest.mark.slow


def request_key(record: TraceRecord) -> str:
    """Every request field of a record (all of REQUEST_FIELDS, so a new field is compared too)."""
    return json.dumps(record.request_body(), sort_keys=True)


def wait_for_lines(path: Path, count: int, timeout: float = 10.0) -> None:
    """The capture writer flushes on its own thread: wait until it has written ``count`` lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and sum(1 for line in path.read_text().splitlines() if line.strip()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"capture has fewer than {count} lines after {timeout}s")


def varied(records: list[TraceRecord], items: list[str]) -> list[TraceRecord]:
    """Give the requests every optional field in turn, so the round trip has each one to lose."""
    out = []
    for i, record in enumerate(records):
        if i % 3 == 0:
            record = replace(record, exclude=(items[i % len(items)], items[(i + 1) % len(items)]))
        if i % 4 == 1:
            record = replace(record, exclude_history=False)
        if i % 5 == 2:
            record = replace(record, timeout_ms=20000 + i)
        if i % 6 == 3:
            record = replace(record, history=None)  # the stored history: replay must not invent one
        out.append(record)
    return out


def test_capture_then_replay_round_trips(demo_store: Path, service_launcher, tmp_path: Path) -> None:
    capture = tmp_path / "capture.jsonl"
    service = service_launcher.start(
        demo_store, env={"ONEREC_CAPTURE_PATH": str(capture), "ONEREC_CAPTURE_RATE": "1.0"}
    )
    try:
        items = fetch_popular_items(service.http_url, 200)
        pool = made_up_user_pool(items, num_users=50, history_length=8, seed=5)
        synthesized = synthesize(
            pool, rate=25.0, duration=1.2, seed=5, mode_mix={"session": 0.5, "items": 0.5},
            beam_widths=[4, 8], num_items=[5],
        )  # fmt: skip
        original = varied(synthesized, items)
        assert len(original) >= 12
        assert {name for r in original for name, v in vars(r).items() if v is not None} >= set(REQUEST_FIELDS)

        first = replay(original, ReplayConfig(target=service.http_url, timeout_s=30))
        assert first.report["status_counts"] == {"200": len(original)}, service.log_tail()
        wait_for_lines(capture, len(original))
        captured = read_trace(capture)
        assert len(captured) == len(original)
        assert not any(r.extra for r in captured)  # every captured key is a request field the trace reads
        assert Counter(map(request_key, captured)) == Counter(map(request_key, original))
        # Relative times survive: the capture clock ran while the replay kept the schedule.
        offsets = [r.t - original[0].t for r in original]
        captured_offsets = [r.t - captured[0].t for r in captured]
        assert max(abs(a - b) for a, b in zip(offsets, captured_offsets, strict=True)) < 0.5

        second = replay(captured, ReplayConfig(target=f"grpc://{service.grpc_target}", timeout_s=30))
        assert second.report["status_counts"] == {"OK": len(captured)}, service.log_tail()
        wait_for_lines(capture, 2 * len(original))
        recaptured = read_trace(capture)[len(captured) :]
        assert Counter(map(request_key, recaptured)) == Counter(map(request_key, captured))
    finally:
        service_launcher.stop(service)
