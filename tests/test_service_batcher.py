"""Unit tests of the batcher's closing rules, shedding and deadline handling (no model, no server).

A fake generator records the batches it is given and answers each request with its own payload, so
the tests see exactly how requests were grouped. End-to-end behaviour with the real model is in
test_service_api.py and test_service_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from service.batcher import AdmissionMargin, Batcher, BatchTimer
from service.errors import DeadlineExceeded, Overloaded
from service.metrics import ServiceMetrics


@dataclass(frozen=True)
class FakeRequest:
    tag: int
    beam_width: int = 4


@dataclass
class FakeStats:
    rows: int
    encode_seconds: float = 0.001
    decode_seconds: float = 0.002
    invalid_paths: int = 0


class FakeGenerator:
    """Answers request `tag` with `tag * 10`; can hold the worker on a gate to build up a queue."""

    def __init__(self, delay: float = 0.0, delay_per_request: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.delay_per_request = delay_per_request  # a batch takes delay + delay_per_request * size
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def generate(self, requests: list[FakeRequest]) -> tuple[list[int], FakeStats]:
        self.entered.set()
        self.gate.wait(5)
        time.sleep(self.delay + self.delay_per_request * len(requests))
        self.batches.append([r.tag for r in requests])
        return [r.tag * 10 for r in requests], FakeStats(rows=sum(r.beam_width for r in requests))


class FakeBundle:
    def __init__(self, generator: FakeGenerator) -> None:
        self.generator = generator


def make_batcher(**overrides: Any) -> Batcher:
    params = {"max_batch_size": 4, "max_beam_budget": 1000, "max_wait_s": 0.02, "max_queue": 100}
    params.update(overrides)
    batcher = Batcher(metrics=ServiceMetrics(process_collectors=False), **params)
    batcher.start()
    return batcher


def far() -> float:
    return time.monotonic() + 10.0


async def _run_all(batcher: Batcher, bundle: FakeBundle, requests: list[FakeRequest]) -> list[Any]:
    results = await asyncio.gather(*(batcher.run(bundle, r, far()) for r in requests))
    return [value for value, _stats in results]


def _held_then_released(batcher: Batcher, bundle: FakeBundle, requests: list[FakeRequest]) -> list[Any]:
    """Occupy the worker with a first request, queue the rest, release: the queue closes batches."""
    gen = bundle.generator
    assert isinstance(gen, FakeGenerator)

    async def scenario() -> list[Any]:
        gen.gate.clear()
        first = asyncio.ensure_future(batcher.run(bundle, FakeRequest(0), far()))
        await asyncio.to_thread(gen.entered.wait, 5)
        rest = [asyncio.ensure_future(batcher.run(bundle, r, far())) for r in requests]
        await asyncio.sleep(0.01)
        gen.gate.set()
        await first
        return [(await f)[0] for f in rest]

    return asyncio.run(scenario())


def test_batch_closes_at_max_batch_size_and_answers_each_request() -> None:
    gen = FakeGenerator()
    batcher = make_batcher(max_batch_size=4)
    values = _held_then_released(batcher, FakeBundle(gen), [FakeRequest(i) for i in range(1, 11)])
    batcher.stop(5)
    assert values == [i * 10 for i in range(1, 11)]
    assert gen.batches[0] == [0]
    assert [len(b) for b in gen.batches[1:]] == [4, 4, 2]
    assert sorted(t for b in gen.batches for t in b) == list(range(11))


def test_batch_closes_at_beam_budget() -> None:
    gen = FakeGenerator()
    batcher = make_batcher(max_batch_size=16, max_beam_budget=10)
    requests = [FakeRequest(i, beam_width=4) for i in range(1, 6)]  # 4+4 fits, 4+4+4 does not
    values = _held_then_released(batcher, FakeBundle(gen), requests)
    batcher.stop(5)
    assert values == [i * 10 for i in range(1, 6)]
    assert [len(b) for b in gen.batches[1:]] == [2, 2, 1]


def test_batch_closes_after_max_wait_when_not_full() -> None:
    gen = FakeGenerator()
    batcher = make_batcher(max_batch_size=8, max_wait_s=0.05)

    async def scenario() -> float:
        started = time.monotonic()
        await _run_all(batcher, FakeBundle(gen), [FakeRequest(1), FakeRequest(2)])
        return time.monotonic() - started

    elapsed = asyncio.run(scenario())
    batcher.stop(5)
    assert gen.batches == [[1, 2]]
    assert 0.04 <= elapsed < 2.0


def test_full_queue_refuses_at_once() -> None:
    gen = FakeGenerator()
    batcher = make_batcher(max_batch_size=1, max_queue=2)
    bundle = FakeBundle(gen)

    async def scenario() -> tuple[int, int, float]:
        gen.gate.clear()
        running = asyncio.ensure_future(batcher.run(bundle, FakeRequest(0), far()))
        await asyncio.to_thread(gen.entered.wait, 5)
        queued = [asyncio.ensure_future(batcher.run(bundle, FakeRequest(i), far())) for i in (1, 2)]
        await asyncio.sleep(0.01)
        started = time.monotonic()
        refused = 0
        for i in range(3, 8):
            try:
                batcher.submit(bundle, FakeRequest(i), far())
            except Overloaded:
                refused += 1
        refuse_time = time.monotonic() - started
        gen.gate.set()
        done = len(await asyncio.gather(running, *queued))
        return refused, done, refuse_time

    refused, done, refuse_time = asyncio.run(scenario())
    batcher.stop(5)
    assert refused == 5 and done == 3
    assert refuse_time < 0.5  # refused immediately, not after waiting for room


def test_expired_request_is_dropped_before_compute() -> None:
    gen = FakeGenerator()
    batcher = make_batcher(max_batch_size=4)
    bundle = FakeBundle(gen)

    async def scenario() -> tuple[BaseException | None, Any]:
        gen.gate.clear()
        running = asyncio.ensure_future(batcher.run(bundle, FakeRequest(0), far()))
        await asyncio.to_thread(gen.entered.wait, 5)
        short = asyncio.ensure_future(batcher.run(bundle, FakeRequest(1), time.monotonic() + 0.02))
        long = asyncio.ensure_future(batcher.run(bundle, FakeRequest(2), far()))
        error: BaseException | None = None
        try:
            await short
        except DeadlineExceeded as exc:
            error = exc
        gen.gate.set()
        await running
        return error, (await long)[0]

    error, long_value = asyncio.run(scenario())
    batcher.stop(5)
    assert isinstance(error, DeadlineExceeded)
    assert long_value == 20
    assert all(1 not in batch for batch in gen.batches)  # the expired request never reached the model


def test_batches_never_mix_model_bundles() -> None:
    gen_old, gen_new = FakeGenerator(), FakeGenerator()
    old, new = FakeBundle(gen_old), FakeBundle(gen_new)
    batcher = make_batcher(max_batch_size=8, max_wait_s=0.05)

    async def scenario() -> list[Any]:
        jobs = [batcher.run(old if i % 2 else new, FakeRequest(i), far()) for i in range(6)]
        return [value for value, _ in await asyncio.gather(*jobs)]

    values = asyncio.run(scenario())
    batcher.stop(5)
    assert values == [i * 10 for i in range(6)]
    assert all(t % 2 == 1 for b in gen_old.batches for t in b)
    assert all(t % 2 == 0 for b in gen_new.batches for t in b)


def test_stop_drains_queued_requests() -> None:
    gen = FakeGenerator(delay=0.01)
    batcher = make_batcher(max_batch_size=1)
    bundle = FakeBundle(gen)

    async def scenario() -> list[Any]:
        futures = [asyncio.ensure_future(batcher.run(bundle, FakeRequest(i), far())) for i in range(5)]
        await asyncio.sleep(0)
        stopped = asyncio.ensure_future(asyncio.to_thread(batcher.stop, 5))
        values = [(await f)[0] for f in futures]
        assert await stopped
        return values

    assert asyncio.run(scenario()) == [0, 10, 20, 30, 40]


def test_generator_failure_fails_only_that_batch() -> None:
    class Exploding(FakeGenerator):
        def generate(self, requests: list[FakeRequest]) -> tuple[list[int], FakeStats]:
            if any(r.tag == 13 for r in requests):
                raise RuntimeError("boom")
            return super().generate(requests)

    gen = Exploding()
    batcher = make_batcher(max_batch_size=1)
    bundle = FakeBundle(gen)

    async def scenario() -> tuple[str, Any]:
        try:
            await batcher.run(bundle, FakeRequest(13), far())
            failed = "no error"
        except Exception as exc:  # the InferenceError the front ends map to 500
            failed = type(exc).__name__
        ok = await batcher.run(bundle, FakeRequest(2), far())
        return failed, ok[0]

    failed, ok = asyncio.run(scenario())
    batcher.stop(5)
    assert failed == "InferenceError"
    assert ok == 20


@pytest.mark.parametrize("max_wait_s", [0.0, 0.01])
def test_single_requests_are_not_delayed_beyond_max_wait(max_wait_s: float) -> None:
    gen = FakeGenerator()
    batcher = make_batcher(max_batch_size=16, max_wait_s=max_wait_s)

    async def scenario() -> float:
        started = time.monotonic()
        await batcher.run(FakeBundle(gen), FakeRequest(1), far())
        return time.monotonic() - started

    elapsed = asyncio.run(scenario())
    batcher.stop(5)
    assert elapsed < max_wait_s + 0.5


def test_expected_wait_beyond_the_budget_or_deadline_is_refused_up_front() -> None:
    """Once a batch has been timed, a request that could only start after its budget gets 429 at once."""
    gen = FakeGenerator(delay=0.05)  # 50 ms per batch of one
    batcher = make_batcher(max_batch_size=1, max_queue=100, max_queue_wait_s=0.12)
    bundle = FakeBundle(gen)

    async def scenario() -> tuple[list[int], int, int]:
        await batcher.run(bundle, FakeRequest(0), far())  # times one batch: about 50 ms per request
        gen.gate.clear()
        running = asyncio.ensure_future(batcher.run(bundle, FakeRequest(1), far()))
        await asyncio.to_thread(gen.entered.wait, 5)
        admitted, refused = [], 0
        for i in range(2, 10):
            try:
                admitted.append(batcher.submit(bundle, FakeRequest(i), far()))
            except Overloaded:
                refused += 1
        # a tight deadline is refused even with room in the budget's queue
        tight = 0
        try:
            batcher.submit(bundle, FakeRequest(99), time.monotonic() + 0.001)
        except Overloaded:
            tight = 1
        gen.gate.set()
        await running
        await asyncio.gather(*(job.future for job in admitted))
        return [job.request.tag for job in admitted], refused, tight

    admitted, refused, tight = asyncio.run(scenario())
    batcher.stop(5)
    # 0.12 s budget / 0.05 s per request: one batch in progress plus one or two queued fit; the rest do not
    assert 1 <= len(admitted) <= 3 and refused == 8 - len(admitted), (admitted, refused)
    assert tight == 1


def test_batch_timer_fits_time_against_size_and_bounds_an_unseen_slope() -> None:
    timer = BatchTimer()
    assert not timer.fitted and timer.seconds(4) == 0.0
    timer.observe(1, 0.05)
    timer.observe(1, 0.05)
    assert timer.seconds(4) == pytest.approx(0.2)  # one size seen: proportional, an upper bound
    timer = BatchTimer()
    for size in [1, 2, 3, 4, 5, 6, 7, 8] * 3:
        timer.observe(size, 0.01 + 0.02 * size)
    assert timer.seconds(16) == pytest.approx(0.01 + 0.02 * 16, rel=1e-6)
    assert timer.seconds(1) == pytest.approx(0.03, rel=1e-6)


def test_admission_prices_the_full_batches_a_burst_will_form() -> None:
    """Timed on small and full batches, a burst is admitted only as far as it can be answered in time.

    A batch of b takes 0.04 + 0.2 b seconds (0.24 s alone, 0.84 s full, batches of up to 4). With one
    request computing, a burst of 12 under a 1.62 s deadline: k admitted requests are answered by
    0.24 + 0.84 * (k // 4) + time(k % 4), so six make it (1.52 s) and a seventh would not (1.72 s).
    Pricing every batch at the average batch time seen (about 0.55 s) would admit eight, and the four
    of the second full batch (done at 1.92 s) would end in 504.
    """
    gen = FakeGenerator(delay=0.04, delay_per_request=0.2)
    batcher = make_batcher(max_batch_size=4, max_wait_s=0.005)
    bundle = FakeBundle(gen)
    for _ in range(3):  # time batches of 1 and of 4
        _held_then_released(batcher, bundle, [FakeRequest(i) for i in range(1, 5)])

    async def scenario() -> tuple[int, int, int]:
        gen.entered.clear()
        running = asyncio.ensure_future(batcher.run(bundle, FakeRequest(0), far()))
        await asyncio.to_thread(gen.entered.wait, 5)
        deadline = time.monotonic() + 1.62
        burst = [asyncio.ensure_future(batcher.run(bundle, FakeRequest(i), deadline)) for i in range(1, 13)]
        outcomes = await asyncio.gather(*burst, return_exceptions=True)
        await running
        ok = sum(1 for o in outcomes if not isinstance(o, BaseException))
        refused = sum(1 for o in outcomes if isinstance(o, Overloaded))
        late = sum(1 for o in outcomes if isinstance(o, DeadlineExceeded))
        return ok, refused, late

    ok, refused, late = asyncio.run(scenario())
    batcher.stop(5)
    assert late == 0, (ok, refused, late)
    assert ok >= 5 and refused == 12 - ok, (ok, refused, late)  # not so cautious that it refuses what fits


def test_admission_margin_is_a_high_quantile_of_the_prediction_error_never_below_one() -> None:
    margin = AdmissionMargin(window=100, every=10)
    for _ in range(100):
        margin.observe(0.1, 0.08)  # answers faster than predicted
    assert margin.factor == 1.0
    for i in range(100):
        margin.observe(0.1, 0.1 * (1.0 + 0.5 * (i % 10 == 0)))  # one in ten runs 50% late
    assert margin.factor == pytest.approx(1.5)
    margin.observe(0.001, 10.0)  # a prediction too short to judge is ignored
    assert margin.factor == pytest.approx(1.5)


def test_a_job_its_batch_cannot_answer_in_time_is_dropped_before_compute() -> None:
    """Admitted in time, then held up behind a batch that ran long: 504 without spending compute on it."""
    gen = FakeGenerator(delay=0.2)  # timed at 0.2 s per batch
    batcher = make_batcher(max_batch_size=1, max_wait_s=0.0)
    bundle = FakeBundle(gen)

    async def scenario() -> str:
        await batcher.run(bundle, FakeRequest(0), far())  # times a batch
        gen.gate.clear()
        gen.entered.clear()
        running = asyncio.ensure_future(batcher.run(bundle, FakeRequest(1), far()))
        await asyncio.to_thread(gen.entered.wait, 5)
        late = asyncio.ensure_future(batcher.run(bundle, FakeRequest(2), time.monotonic() + 0.7))  # fits: ~0.4 s
        await asyncio.sleep(0.4)  # the batch in progress overruns its 0.2 s
        gen.gate.set()  # ...and ends at about 0.6 s: too late to answer request 2 by 0.7 s
        try:
            await late
            outcome = "answered"
        except DeadlineExceeded:
            outcome = "deadline"
        await running
        return outcome

    outcome = asyncio.run(scenario())
    batcher.stop(5)  # joins the worker: every batch it computed is recorded
    assert outcome == "deadline"
    assert [2] not in gen.batches  # never computed
