"""The rate search of `benchmarks/serving.py`, against a simulated server whose p99 follows the offered rate."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "serving.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("onerec_benchmark_serving", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


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


def run_sweep(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, capacity: float, floor_ms: float, first: float, **settings_kw
):
    monkeypatch.setattr(bench, "run_step", simulated_server(capacity, floor_ms))
    monkeypatch.setattr(bench, "log", lambda message: None)
    settings = bench.SweepSettings(
        budget_ms=100.0, confirm_failures=False, single_rate_hint=first or 1.0, **settings_kw
    )
    return asyncio.run(bench.sweep("http://127.0.0.1:1", [], first, settings))


def test_sustainable_rate_brackets_the_capacity_and_saturation_is_measured_above_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = load_script()
    result = run_sweep(bench, monkeypatch, capacity=40.0, floor_ms=20.0, first=5.0)
    assert 40.0 / bench.SweepSettings(budget_ms=1).growth <= result["sustainable_rps"] <= 40.0
    assert result["saturated_throughput_rps"] == pytest.approx(40.0)


def test_a_server_that_never_meets_the_budget_is_still_saturated_above_every_rate_tried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The search walks down from the first rate; the saturation step must not follow it down."""
    bench = load_script()
    result = run_sweep(bench, monkeypatch, capacity=6.0, floor_ms=150.0, first=5.0)
    assert result["sustainable_rps"] == 0.0
    saturation = [s for s in result["curve"] if s.get("saturation_step")]
    assert len(saturation) == 1
    assert saturation[0]["offered_rps"] >= 1.5 * 5.0 - 1e-6
    assert result["saturated_throughput_rps"] == pytest.approx(6.0)


def test_without_a_sweep_the_saturation_offer_rises_until_a_batching_server_falls_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lone request misses the budget (no sweep), yet batching serves 40x its one-at-a-time rate."""
    bench = load_script()
    result = run_sweep(bench, monkeypatch, capacity=40.0, floor_ms=150.0, first=0.0)
    assert result["sustainable_rps"] == 0.0
    assert result["saturated_throughput_rps"] == pytest.approx(40.0)


def test_ratio_is_none_when_neither_side_meets_the_budget() -> None:
    bench = load_script()

    def measured(sustainable: float, saturated: float) -> dict:
        sweep = {"sustainable_rps": sustainable, "p99_at_sustainable_ms": None, "saturated_throughput_rps": saturated,
                 "curve": []}  # fmt: skip
        return {"sweep": sweep, "single_request_ms": {"p50": 150.0, "p99": 160.0}}

    row = bench.Row(device="cpu", mode="session", beam_width=32)
    neither = bench.compare(row, measured(0.0, 10.0), measured(0.0, 5.0), depth=4, session_items=5)
    assert neither["rps_ratio"] is None and neither["saturated_throughput_ratio"] == pytest.approx(2.0)
    assert not neither["goal_10x_rps_met"]
    ours_only = bench.compare(row, measured(8.0, 10.0), measured(0.0, 4.0), depth=4, session_items=5)
    assert ours_only["rps_ratio"] == pytest.approx(2.0)


def test_a_doubling_saturation_offer_that_meets_the_budget_is_the_sustainable_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A short search (one step, as --quick may end) stops far below capacity; the saturation offers
    double from there (7.5, 15, 30 pass; 60 fails): the highest that passed is the sustainable rate."""
    bench = load_script()
    result = run_sweep(bench, monkeypatch, capacity=40.0, floor_ms=20.0, first=5.0, max_steps=1)
    assert result["sustainable_rps"] == pytest.approx(30.0)
    assert result["p99_at_sustainable_ms"] == 20.0
    assert result["saturated_throughput_rps"] == pytest.approx(40.0)
