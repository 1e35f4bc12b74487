"""What a request costs the engine, and how long that takes: the front end's basis for admission.

A request occupies ``rows`` decoder rows (its beams) for ``steps`` decode steps (``D`` code levels per
item, ``m`` items per session), so its work is ``rows * steps`` row-steps. The engine reports the time
of each decode step with the rows it ran; ``StepTimer`` fits ``seconds = t0 + t1 * rows`` online. A
request queued behind a backlog waits, at best, for the backlog to drain at the row budget's rate and
then runs its own steps, so pricing by rows and steps, not by request count, keeps one beam-256 request
from being priced like a beam-8 one (issue 12, item 10).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from onerec.generate import request_cost as generator_cost


@dataclass(frozen=True)
class Cost:
    rows: int
    steps: int

    @property
    def rowsteps(self) -> int:
        return self.rows * self.steps


def request_cost(mode: str, beam_width: int, num_items: int, session_items: int, depth: int) -> Cost:
    """Rows and decode steps of one request, by the generator's own rule (``onerec.generate.request_cost``)."""
    return Cost(*generator_cost(mode, beam_width, num_items, session_items, depth))


class StepTimer:
    """Seconds of one decode step as a function of its rows, fitted online as ``t0 + t1 * rows``.

    Exponentially weighted moments follow a model or load change. While every step seen had about the
    same rows there is no slope: the time then scales in proportion to the rows, an upper bound
    (batching only amortises), so admission errs towards 429.
    """

    def __init__(self, alpha: float = 0.05, min_rows_variance: float = 1.0) -> None:
        self.alpha = alpha
        self.min_rows_variance = min_rows_variance
        self._moments: list[float] | None = None  # E[r], E[t], E[r^2], E[r t]

    def observe(self, rows: int, seconds: float) -> None:
        sample = [float(rows), seconds, float(rows * rows), rows * seconds]
        if self._moments is None:
            self._moments = sample
            return
        for i, value in enumerate(sample):
            self._moments[i] += self.alpha * (value - self._moments[i])

    @property
    def fitted(self) -> bool:
        return self._moments is not None

    def seconds(self, rows: int) -> float:
        """Expected seconds of one step over ``rows`` rows (0 before the first step is timed)."""
        if self._moments is None or rows <= 0:
            return 0.0
        mean_r, mean_t, mean_rr, mean_rt = self._moments
        variance = mean_rr - mean_r * mean_r
        if variance < self.min_rows_variance:
            return mean_t * rows / max(mean_r, 1.0)
        slope = max(0.0, (mean_rt - mean_r * mean_t) / variance)
        intercept = max(0.0, mean_t - slope * mean_r)
        return intercept + slope * rows


def expected_seconds(timer: StepTimer, cost: Cost, live_rows: int, backlog_rowsteps: int, max_rows: int) -> float:
    """Time to answer a request admitted now, on an engine with this load.

    ``live_rows`` are the rows of every request the engine holds (running or waiting). If the new rows
    fit beside them, it starts at the next step and runs ``steps`` steps at the combined width.
    Otherwise it waits for the backlog to drain at the row budget's rate first.
    """
    if live_rows + cost.rows <= max_rows:
        return cost.steps * timer.seconds(live_rows + cost.rows)
    full = timer.seconds(max_rows)
    return (backlog_rowsteps / max(max_rows, 1)) * full + cost.steps * full


class AdmissionMargin:
    """The factor admission puts on its predicted time to answer: a high quantile of actual / predicted.

    Why: admission lets the backlog grow right up to each request's deadline, so a prediction that is
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
