"""The scheduler profile benchmark: every request answered under both schedulers, phases timed, nothing left patched."""

from __future__ import annotations

from pathlib import Path

from benchmarks.scheduler_profile import arrivals, run
from onerec.generate import StepSearch


def test_profile_answers_every_request_and_times_the_phases(demo_store: Path) -> None:
    before = {name: getattr(StepSearch, name) for name in ("_relayout", "_encode", "_decode", "_finish")}
    traffic = arrivals(rate=40.0, seconds=0.5, items_share=0.5, catalogue=50, seed=3)
    assert {kind for _, kind, _ in traffic} == {"items", "session"}
    for mode in ("continuous", "batch"):
        result = run(demo_store, "demo", mode, traffic, beam=4)
        assert result["requests"] == len(traffic)
        assert result["items"]["n"] + result["session"]["n"] == len(traffic)
        assert result["items"]["p99_ms"] >= result["items"]["p50_ms"] > 0
        assert result["phases"]["_decode"]["calls"] == result["steps"] > 0
        assert 0 < result["phases"]["_decode"]["share_of_busy"] <= 1
    assert {name: getattr(StepSearch, name) for name in before} == before  # the timers were taken off
