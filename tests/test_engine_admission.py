"""Admission in the front end: requests priced by rows x steps, routed to the soonest engine, shed early.

Unit tests on the cost model and on ``EnginePool.admit`` with engines whose load is set by hand (no
processes): the 429 must come up front, before a request that can only end in a 504 is sent.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from service.engine.client import EnginePool, ServingModel
from service.engine.cost import AdmissionMargin, Cost, StepTimer, expected_seconds, request_cost
from service.errors import NotReady, Overloaded
from service.metrics import ServiceMetrics
from service.settings import Settings


class _Running:
    """Stands in for a live engine process."""

    returncode = None

    def poll(self) -> None:
        return None


@pytest.fixture
def pool(tmp_path: Any) -> Any:
    settings = Settings(engines=2, max_beam_budget=256, max_batch_size=8, max_queue=4, model_store=tmp_path)
    pool = EnginePool(settings, ServiceMetrics(process_collectors=False))
    pool.model = ServingModel(1, tmp_path, None)
    for slot in pool.slots:
        slot.proc = _Running()  # type: ignore[assignment]
        slot.model_version = 1
        for rows in (32, 64, 128, 256):  # 1 ms + 10 us per row
            slot.timer.observe(rows, 0.001 + 1e-5 * rows)
    yield pool
    pool.close()


def busy(slot: Any, rows: int, steps: int, count: int = 1) -> None:
    """Give an engine ``count`` in-flight requests of ``rows`` x ``steps`` each."""
    from service.engine.client import _Pending

    for i in range(count):
        slot.pending[len(slot.pending) + 1000 * (i + 1)] = _Pending(slot, Cost(rows, steps), None, 0.0, None)  # type: ignore[arg-type]
    slot.reported_backlog = sum(p.cost.rowsteps for p in slot.pending.values())


def test_request_cost_follows_the_generator_width_rule() -> None:
    assert request_cost("items", 32, 10, session_items=5, depth=4) == Cost(32, 4)
    assert request_cost("items", 8, 50, session_items=5, depth=4) == Cost(50, 4)  # a row per returned item
    assert request_cost("session", 16, 10, session_items=5, depth=3) == Cost(16, 15)
    assert request_cost("session", 1, 12, session_items=5, depth=3) == Cost(3, 15)  # enough sessions to fill
    assert Cost(16, 15).rowsteps == 240


def test_step_timer_fits_time_against_rows_and_bounds_an_unseen_slope() -> None:
    timer = StepTimer(alpha=0.5)
    assert timer.seconds(64) == 0.0 and not timer.fitted
    timer.observe(32, 0.004)
    assert timer.seconds(64) == pytest.approx(0.008)  # one size seen: proportional, an upper bound
    for rows in (32, 64, 128, 256, 32, 64, 128, 256) * 5:
        timer.observe(rows, 0.002 + 1e-5 * rows)
    assert timer.seconds(512) == pytest.approx(0.002 + 1e-5 * 512, rel=0.05)


def test_expected_time_runs_alongside_when_rows_fit_and_waits_for_the_backlog_when_not() -> None:
    timer = StepTimer()
    for rows in (32, 256) * 20:
        timer.observe(rows, 0.001 + 1e-5 * rows)
    fits = expected_seconds(timer, Cost(32, 4), live_rows=64, backlog_rowsteps=64 * 10, max_rows=256)
    assert fits == pytest.approx(4 * timer.seconds(96))
    full = expected_seconds(timer, Cost(32, 4), live_rows=256, backlog_rowsteps=256 * 20, max_rows=256)
    assert full == pytest.approx(20 * timer.seconds(256) + 4 * timer.seconds(256))
    assert full > 5 * fits


def test_admission_margin_is_a_high_quantile_of_the_error_never_below_one() -> None:
    margin = AdmissionMargin(window=100, every=10)
    for _ in range(10):
        margin.observe(0.1, 0.05)
    assert margin.factor == 1.0
    for i in range(100):
        margin.observe(0.1, 0.1 * (1.0 + i / 50))
    assert 2.5 < margin.factor <= 3.0


def test_an_idle_engine_admits_and_the_least_loaded_engine_is_chosen(pool: Any) -> None:
    deadline = time.monotonic() + 1.0
    slot, predicted = pool.admit(Cost(32, 4), deadline)
    assert predicted is None  # both idle: admitted without a prediction
    busy(pool.slots[0], 128, 15)
    slot, _ = pool.admit(Cost(32, 4), deadline)
    assert slot is pool.slots[1]
    busy(pool.slots[1], 256, 15, count=2)
    slot, predicted = pool.admit(Cost(32, 4), deadline)
    assert slot is pool.slots[0] and predicted is not None


def test_a_wide_request_is_priced_by_its_rows_and_steps(pool: Any) -> None:
    for slot in pool.slots:
        busy(slot, 256, 15, count=3)  # both engines at their row budget with a backlog
    narrow = pool.admit(Cost(8, 4), time.monotonic() + 10)[1]
    wide = pool.admit(Cost(256, 15), time.monotonic() + 10)[1]
    assert wide > narrow
    with pytest.raises(Overloaded, match="expected time to answer"):
        pool.admit(Cost(256, 15), time.monotonic() + 0.9 * wide)


def test_a_full_queue_and_a_tight_deadline_are_refused_up_front(pool: Any) -> None:
    for slot in pool.slots:
        busy(slot, 8, 4, count=8 + 4)  # max_batch_size live + max_queue waiting on each engine
    with pytest.raises(Overloaded, match="queue full"):
        pool.admit(Cost(8, 4), time.monotonic() + 60)


def test_no_ready_engine_is_not_ready(pool: Any) -> None:
    for slot in pool.slots:
        slot.model_version = None  # restarting: the model is not loaded yet
    with pytest.raises(NotReady):
        pool.admit(Cost(8, 4), time.monotonic() + 60)
