"""Dynamic batcher: a bounded queue in front of ONE inference worker thread.

Why one thread: the generator is thread-compatible, not thread-safe, and a single worker keeps the
model's intra-op threads busy while the asyncio event loop stays free to parse, validate, answer
health checks and shed load. Requests from both front ends meet in the same queue.

A batch closes when it holds `max_batch_size` requests, when one more request would exceed the
beam budget (sum of beam widths, i.e. decoder rows), or `max_wait_s` after its oldest request
arrived. A full queue refuses at once (Overloaded -> 429 / RESOURCE_EXHAUSTED), and so does a queue
whose expected wait (the batch in progress, then the batches the queue will form, each priced by
`BatchTimer` at its size, then widened by `AdmissionMargin`, the recent error of those predictions)
would outlast the request's deadline or `max_queue_wait_s`: under overload the service sheds with 429
up front instead of admitting work that can only end in a 504. A request whose deadline has passed,
whose caller stopped waiting, or whose deadline would pass before its batch is done, is dropped
before compute. Each job carries the model bundle it was planned against (its ids were mapped with
that bundle's catalogue), and a batch only holds jobs of one bundle, so a hot swap lets queued
requests finish on the old model.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.errors import DeadlineExceeded, NotReady, Overloaded, ServiceError
from service.logs import get_logger
from service.metrics import ServiceMetrics

log = get_logger("batcher")


class _Generator(Protocol):
    def generate(self, requests: list[Any]) -> tuple[list[Any], Any]: ...


class _Bundle(Protocol):
    @property
    def generator(self) -> _Generator: ...


@dataclass
class Job:
    """One request waiting for (or in) a batch."""

    bundle: _Bundle
    request: Any  # onerec.generate.RecRequest
    deadline: float  # time.monotonic() seconds
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    enqueued_at: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # set by the caller when it stops waiting (deadline passed)
    expected_wait: float | None = None  # admission's predicted seconds to answer (None: worker was idle)

    @property
    def beams(self) -> int:
        return int(getattr(self.request, "beam_width", 1))


class InferenceError(ServiceError):
    """The generator raised: the batch's requests fail with 500 / INTERNAL (never expected)."""

    code = "inference_error"
    reason = "inference_error"


def _resolve(job: Job, value: Any, error: BaseException | None) -> None:
    """Runs on the event loop: complete the caller's future unless the caller gave up already."""
    if job.abandoned or job.future.done():
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(value)


class BatchTimer:
    """Compute seconds of a batch as a function of its size, fitted online as ``t0 + t1 * size``.

    Why a line and not one average: when a burst builds the queue, the batches timed so far are small
    and fast while the ones the queue will form are full and slow, so an average prices them too low;
    the requests admitted on that estimate then miss their deadline (504) instead of being refused up
    front (429). The fit uses exponentially weighted moments, so it follows a model or load change.
    While every batch seen had the same size there is no slope to fit: the time then scales in
    proportion to the size, an upper bound (batching only ever amortises), so admission errs towards 429.
    """

    def __init__(self, alpha: float = 0.1, min_size_variance: float = 0.1) -> None:
        self.alpha = alpha
        self.min_size_variance = min_size_variance
        self._moments: list[float] | None = None  # E[b], E[t], E[b^2], E[b t]

    def observe(self, size: int, seconds: float) -> None:
        sample = [float(size), seconds, float(size * size), size * seconds]
        if self._moments is None:
            self._moments = sample
            return
        for i, value in enumerate(sample):
            self._moments[i] += self.alpha * (value - self._moments[i])

    @property
    def fitted(self) -> bool:
        return self._moments is not None

    def seconds(self, size: int) -> float:
        """Expected compute seconds of a batch of ``size`` requests (0 before the first batch is timed)."""
        if self._moments is None or size <= 0:
            return 0.0
        mean_b, mean_t, mean_bb, mean_bt = self._moments
        variance = mean_bb - mean_b * mean_b
        if variance < self.min_size_variance:
            return mean_t * size / max(mean_b, 1.0)
        slope = max(0.0, (mean_bt - mean_b * mean_t) / variance)
        intercept = max(0.0, mean_t - slope * mean_b)
        return intercept + slope * size


class AdmissionMargin:
    """The factor admission puts on its predicted time to answer: a high quantile of actual / predicted.

    Why: admission lets the queue grow right up to each request's deadline, so a prediction that is
    right on average still sends about half of the requests admitted near the limit past it (504).
    Scaling by the 95th percentile of the recent error keeps those to a few percent, and it follows
    whatever the prediction misses (other work on the cores, the event loop answering). Never below 1.
    """

    def __init__(self, window: int = 256, quantile: float = 0.95, every: int = 32, ceiling: float = 3.0) -> None:
        self.quantile = quantile
        self.every = every
        self.ceiling = ceiling
        self.factor = 1.0
        self._ratios: collections.deque[float] = collections.deque(maxlen=window)
        self._since = 0

    def observe(self, predicted: float, actual: float) -> None:
        if predicted < 0.005:  # too short to say anything about the error
            return
        self._ratios.append(actual / predicted)
        self._since += 1
        if self._since >= self.every:
            self._since = 0
            ordered = sorted(self._ratios)
            high = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
            self.factor = min(self.ceiling, max(1.0, high))


class Batcher:
    """Bounded queue + one worker thread calling `bundle.generator.generate(list[RecRequest])`."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_beam_budget: int,
        max_wait_s: float,
        max_queue: int,
        metrics: ServiceMetrics,
        thread_init: Callable[[], None] | None = None,
        max_queue_wait_s: float = 0.0,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_beam_budget = max_beam_budget
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self.thread_init = thread_init  # runs first on the worker thread (e.g. torch thread settings)
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.max_queue_wait_s = max_queue_wait_s  # 0 = admit whatever the deadline allows
        self._busy_until = 0.0  # monotonic time the batch in progress is expected to end
        self._timer = BatchTimer()  # compute seconds per batch by size, for admission
        self._margin = AdmissionMargin()  # how far actual answers run past the predictions
        self._thread = threading.Thread(target=self._worker, name="onerec-inference", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch being computed)."""
        return len(self._queue)

    def submit(self, bundle: _Bundle, request: Any, deadline: float) -> Job:
        """Enqueue without blocking; raises Overloaded when the queue is full, NotReady when draining."""
        loop = asyncio.get_running_loop()
        job = Job(bundle=bundle, request=request, deadline=deadline, future=loop.create_future(), loop=loop)
        with self._cond:
            if self._stopping:
                raise NotReady("the service is shutting down")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"queue full ({self.max_queue} requests waiting); retry later")
            wait = self._expected_wait(job.enqueued_at, job.beams)
            limit = deadline - job.enqueued_at
            if self.max_queue_wait_s > 0:
                limit = min(limit, self.max_queue_wait_s)
            if wait is not None and wait * self._margin.factor > limit:
                expected_ms = wait * self._margin.factor * 1000
                raise Overloaded(f"expected wait {expected_ms:.0f} ms exceeds {limit * 1000:.0f} ms; retry later")
            job.expected_wait = wait
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()
        return job

    def _expected_wait(self, now: float, beams: int) -> float | None:
        """Seconds until a request queued now is answered; None when it would start at once.

        The rest of the batch in progress, then the batches the queue ahead will form, the request's
        own included, each priced at its size (batches as large as the size limit and, at this
        request's beam width, the beam budget allow). An idle worker with an empty queue always
        admits, so a slow batch in the past can never lock the service out.
        """
        in_progress = max(0.0, self._busy_until - now)
        if not self._timer.fitted or (in_progress == 0.0 and not self._queue):
            return None
        per_batch = max(1, min(self.max_batch_size, self.max_beam_budget // max(beams, 1)))
        full, rest = divmod(len(self._queue) + 1, per_batch)
        return in_progress + full * self._timer.seconds(per_batch) + self._timer.seconds(rest)

    async def run(self, bundle: _Bundle, request: Any, deadline: float) -> tuple[Any, Any]:
        """Submit and wait for (RecResult, BatchStats); DeadlineExceeded when the deadline passes."""
        job = self.submit(bundle, request, deadline)
        remaining = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=max(remaining, 0.0))
        except asyncio.TimeoutError:
            job.abandoned = True
            raise DeadlineExceeded("deadline passed before the answer was ready") from None
        except asyncio.CancelledError:
            job.abandoned = True  # the client went away (gRPC cancel): skip the compute if not started
            raise

    def stop(self, timeout: float | None = None) -> bool:
        """Stop taking requests, let the worker finish everything queued, join it; True if it ended."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- worker side -----------------------------------------------------------------------------
    def _worker(self) -> None:
        if self.thread_init is not None:
            self.thread_init()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._compute(batch)

    def _next_batch(self) -> list[Job] | None:
        """Block for a first request, then fill the batch until a closing rule fires."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._queue[0]
            close_at = first.enqueued_at + self.max_wait_s
            batch: list[Job] = []
            beams = 0
            while True:
                beams = self._take_ready(batch, beams)
                if len(batch) >= self.max_batch_size or self._closed_by_head(batch, beams):
                    break
                wait = close_at - time.monotonic()
                if wait <= 0 or self._stopping:
                    break
                self._cond.wait(wait)
            self.metrics.queue_depth.set(len(self._queue))
            return self._without_unfinishable(batch)

    def _without_unfinishable(self, batch: list[Job]) -> list[Job]:
        """Drop (504 before compute) the jobs this batch cannot answer before their deadline (lock held).

        Computing them would only spend the worker's time on answers nobody waits for any more.
        """
        if not self._timer.fitted:
            return batch
        done_at = time.monotonic() + self._timer.seconds(len(batch))
        keep = []
        for job in batch:
            if job.deadline < done_at:
                self._expire(job, "deadline would pass before this batch is done; dropped before compute")
            else:
                keep.append(job)
        return keep

    def _take_ready(self, batch: list[Job], beams: int) -> int:
        """Move compatible queued jobs into the batch (lock held); drop expired ones on the way."""
        now = time.monotonic()
        while self._queue and len(batch) < self.max_batch_size:
            job = self._queue[0]
            if job.abandoned or job.deadline <= now:
                self._queue.popleft()
                self._expire(job)
                continue
            if batch and (job.bundle is not batch[0].bundle or beams + job.beams > self.max_beam_budget):
                break
            self._queue.popleft()
            batch.append(job)
            beams += job.beams
        return beams

    def _closed_by_head(self, batch: list[Job], beams: int) -> bool:
        """True when the next queued job cannot join (other bundle or beam budget): close now."""
        if not batch or not self._queue:
            return False
        head = self._queue[0]
        return head.bundle is not batch[0].bundle or beams + head.beams > self.max_beam_budget

    def _expire(self, job: Job, why: str = "deadline passed while queued; dropped before compute") -> None:
        self.metrics.rejections.labels("deadline").inc()
        job.loop.call_soon_threadsafe(_resolve, job, None, DeadlineExceeded(why))

    def _compute(self, batch: list[Job]) -> None:
        started = time.monotonic()
        for job in batch:
            self.metrics.queue_wait.observe(started - job.enqueued_at)
        generator = batch[0].bundle.generator
        if self._timer.fitted:
            self._busy_until = started + self._timer.seconds(len(batch))
        try:
            results, stats = generator.generate([job.request for job in batch])
            done = time.monotonic()
            self._time_batch(len(batch), done - started)
        except Exception as exc:  # a bug in the model must fail these requests, not the worker
            log.exception("inference failed", extra={"batch_size": len(batch)})
            error = InferenceError(f"inference failed: {type(exc).__name__}")
            for job in batch:
                job.loop.call_soon_threadsafe(_resolve, job, None, error)
            return
        self._observe(batch, stats)
        for job in batch:
            if job.expected_wait is not None:
                self._margin.observe(job.expected_wait, done - job.enqueued_at)
        for job, result in zip(batch, results, strict=True):
            job.loop.call_soon_threadsafe(_resolve, job, (result, stats), None)

    def _time_batch(self, size: int, seconds: float) -> None:  # worker thread
        with self._cond:  # the event loop reads the fit under the same lock
            self._timer.observe(size, seconds)
            self._busy_until = 0.0

    def _observe(self, batch: list[Job], stats: Any) -> None:
        m = self.metrics
        m.batch_size.observe(len(batch))
        m.batch_rows.observe(int(getattr(stats, "rows", sum(j.beams for j in batch))))
        m.encode_seconds.observe(float(getattr(stats, "encode_seconds", 0.0)))
        m.decode_seconds.observe(float(getattr(stats, "decode_seconds", 0.0)))
        invalid = int(getattr(stats, "invalid_paths", 0))
        if invalid:
            m.invalid_beam_paths.inc(invalid)
