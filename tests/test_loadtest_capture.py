"""Capture (service side, ONEREC_CAPTURE_PATH) then replay: a trace survives the round trip.

A trace is replayed over HTTP into a real ``onerec serve`` that captures every request; the captured
file is a valid trace carrying the same requests at the same relative times; replaying the capture
over gRPC is answered in full and captured again identically.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from loadtest.replay import ReplayConfig, replay
from loadtest.synth import load_user_pool, synthesize
from loadtest.trace import TraceRecord, read_trace

pytestmark = pytest.mark.slow


def request_key(record: TraceRecord) -> tuple:
    return (record.user_id, record.history, record.num_items, record.mode, record.beam_width)


def wait_for_lines(path: Path, count: int, timeout: float = 10.0) -> None:
    """The capture writer flushes on its own thread: wait until it has written ``count`` lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and sum(1 for line in path.read_text().splitlines() if line.strip()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"capture has fewer than {count} lines after {timeout}s")


def test_capture_then_replay_round_trips(demo_store: Path, service_launcher, tmp_path: Path) -> None:
    capture = tmp_path / "capture.jsonl"
    service = service_launcher.start(
        demo_store, env={"ONEREC_CAPTURE_PATH": str(capture), "ONEREC_CAPTURE_RATE": "1.0"}
    )
    try:
        pool = load_user_pool("synthetic", history_length=8)
        original = synthesize(
            pool, rate=25.0, duration=1.2, seed=5, mode_mix={"session": 0.5, "items": 0.5},
            beam_widths=[4, 8], num_items=[5],
        )  # fmt: skip
        assert len(original) >= 10

        first = replay(original, ReplayConfig(target=service.http_url, timeout_s=30))
        assert first.report["status_counts"] == {"200": len(original)}, service.log_tail()
        wait_for_lines(capture, len(original))
        captured = read_trace(capture)
        assert len(captured) == len(original)
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
