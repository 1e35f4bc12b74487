"""The rate search of the serving benchmark (`benchmarks.rate_sweep`), against a simulated server whose p99
follows the offered rate, and the report's ratios (`benchmarks.serving.compare`)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from benchmarks import rate_sweep
from benchmarks.serving import compare
from benchmarks.workload import Row


def simulated_server(capacity_rps: float, floor_ms: float) -> Any:
    """A stand-in for `run_step`: completes min(rate, capacity); p99 = floor below capacity, explodes above."""

    async def run_step(url: str, records: Any, rate: float, settings: Any, timeout_s: float | None = None) -> dict:
        p99 = floor_ms if rate <= capacity_rps else floor_ms * 50
        return {
            "offered_rps": round(rate, 3),
            "achieved_rps": round(min(rate, capacity_rps), 3),
            "requests": 100,
            "p99_ms": p99,
            "errors": {},
            "late_share": 0.0,
            "cpu_cores": {},
            "pass": p99 <= settings.budget_ms,
        }

    return run_step


def run_sweep(monkeypatch: pytest.MonkeyPatch, capacity: float, floor_ms: float, first: float, **settings_kw):
    monkeypatch.setattr(rate_sweep, "run_step", simulated_server(capacity, floor_ms))
    monkeypatch.setattr(rate_sweep, "log", lambda message: None)
    settings = rate_sweep.SweepSettings(
        budget_ms=100.0, confirm_failures=False, single_rate_hint=first or 1.0, **settings_kw
    )
    return asyncio.run(rate_sweep.sweep("http://127.0.0.1:1", [], first, settings))


def test_sustainable_rate_brackets_the_capacity_and_saturation_is_measured_above_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = run_sweep(monkeypatch, capacity=40.0, floor_ms=20.0, first=5.0)
    assert 40.0 / rate_sweep.SweepSettings(budget_ms=1).growth <= result["sustainable_rps"] <= 40.0
    assert result["saturated_throughput_rps"] == pytest.approx(40.0)


def test_a_server_that_never_meets_the_budget_is_still_saturated_above_every_rate_tried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The search walks down from the first rate; the saturation step must not follow it down."""
    result = run_sweep(monkeypatch, capacity=6.0, floor_ms=150.0, first=5.0)
    assert result["sustainable_rps"] == 0.0
    saturation = [s for s in result["curve"] if s.get("saturation_step")]
    assert len(saturation) == 1
    assert saturation[0]["offered_rps"] >= 1.5 * 5.0 - 1e-6
    assert result["saturated_throughput_rps"] == pytest.approx(6.0)


def test_without_a_sweep_the_saturation_offer_rises_until_a_batching_server_falls_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lone request misses the budget (no sweep), yet batching serves 40x its one-at-a-time rate."""
    result = run_sweep(monkeypatch, capacity=40.0, floor_ms=150.0, first=0.0)
    assert result["sustainable_rps"] == 0.0
    assert result["saturated_throughput_rps"] == pytest.approx(40.0)


def test_ratio_is_none_when_neither_side_meets_the_budget() -> None:
    def measured(sustainable: float, saturated: float) -> dict:
        sweep = {"sustainable_rps": sustainable, "p99_at_sustainable_ms": None, "saturated_throughput_rps": saturated,
                 "curve": []}  # fmt: skip
        return {"sweep": sweep, "single_request_ms": {"p50": 150.0, "p99": 160.0}}

    row = Row(device="cpu", mode="session", beam_width=32)
    neither = compare(row, measured(0.0, 10.0), measured(0.0, 5.0), depth=4, session_items=5)
    assert neither["rps_ratio"] is None and neither["saturated_throughput_ratio"] == pytest.approx(2.0)
    assert not neither["goal_10x_rps_met"]
    ours_only = compare(row, measured(8.0, 10.0), measured(0.0, 4.0), depth=4, session_items=5)
    assert ours_only["rps_ratio"] == pytest.approx(2.0)


def test_a_doubling_saturation_offer_that_meets_the_budget_is_the_sustainable_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A short search (one step, as --quick may end) stops far below capacity; the saturation offers
    double from there (7.5, 15, 30 pass; 60 fails): the highest that passed is the sustainable rate."""
    result = run_sweep(monkeypatch, capacity=40.0, floor_ms=20.0, first=5.0, max_steps=1)
    assert result["sustainable_rps"] == pytest.approx(30.0)
    assert result["p99_at_sustainable_ms"] == 20.0
    assert result["saturated_throughput_rps"] == pytest.approx(40.0)
