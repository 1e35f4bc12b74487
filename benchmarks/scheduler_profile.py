"""The engine's scheduler alone, in this process: where a step's time goes, continuous against batch.

``benchmarks.join_time`` measures the whole service (client, front end and engine share the cores);
this drives ``service.engine.scheduler.Scheduler`` directly with the same kind of traffic (open-loop
Poisson arrivals, a share of ``items`` requests among ``session`` ones, beam 32) so the engine's own
share of the latency is seen without the front end, the IPC and the client. For each scheduler it
reports per-mode latency from arrival to answer, the decode steps it ran, and the time spent in each
phase of ``onerec.generate.StepSearch`` (re-layout of the rows when requests join or leave, the
encoder call of the joiners, the decode step, the finishing bookkeeping).

    python -m benchmarks.scheduler_profile --store model-store [--rate 36] [--seconds 15] [--items-share 0.3]
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import emit
from benchmarks.workload import catalogue_ids, newest_version_dir
from onerec.generate import StepSearch
from service.engine import messages as msg
from service.engine.scheduler import Scheduler

PHASES = ("_relayout", "_encode", "_decode", "_finish")
DEADLINE_S = 60.0  # latency is measured, nothing is shed
Arrival = tuple[float, str, list[int]]  # (offset in seconds, mode, history)


@contextmanager
def wrapped_phases(
    names: Iterable[str], wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """StepSearch's methods ``names`` replaced by ``wrap(name, original)`` inside the block, restored after."""
    originals = {name: getattr(StepSearch, name) for name in names}
    for name, fn in originals.items():
        setattr(StepSearch, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(StepSearch, name, fn)


@contextmanager
def phase_timers() -> Iterator[dict[str, list[float]]]:
    """Time every call of the StepSearch phases (wrapped for the duration of the block)."""
    spent: dict[str, list[float]] = collections.defaultdict(list)

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: StepSearch, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                spent[name].append(time.perf_counter() - t0)

        return wrapper

    with wrapped_phases(PHASES, timed):
        yield spent


def quantile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))] * 1000, 2)


def summary(latencies: list[float]) -> dict[str, Any]:
    return {"n": len(latencies), "p50_ms": quantile_ms(latencies, 0.5), "p99_ms": quantile_ms(latencies, 0.99)}


def arrivals(rate: float, seconds: float, items_share: float, catalogue: int, seed: int) -> list[Arrival]:
    """(offset s, mode, history) of each request: Poisson arrivals, histories of 3-20 random items."""
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        mode = "items" if rng.random() < items_share else "session"
        out.append((t, mode, [rng.randrange(catalogue) for _ in range(rng.randint(3, 20))]))


def run(store: Path, name: str, mode: str, traffic: list[Arrival], beam: int) -> dict[str, Any]:
    answered: dict[int, float] = {}
    loaded: list[msg.ControlDone] = []

    def on_reply(m: msg.FromEngine) -> None:
        if isinstance(m, msg.Finished | msg.Failed):
            answered[m.id] = time.perf_counter()
        elif isinstance(m, msg.ControlDone):
            loaded.append(m)

    scheduler = Scheduler(on_reply, mode=mode)
    scheduler.handle(msg.LoadModel(0, str(newest_version_dir(store, name)), None))
    while not loaded:  # the load runs in a thread, finished by step()
        scheduler.step()
        time.sleep(0.01)
    version = loaded[0].version
    assert loaded[0].ok and version is not None, loaded[0].message
    sent: dict[int, tuple[float, str]] = {}
    steps: list[float] = []
    with phase_timers() as spent:
        start = time.perf_counter()
        i = 0
        while i < len(traffic) or scheduler.busy:
            now = time.perf_counter() - start
            while i < len(traffic) and traffic[i][0] <= now:
                at, kind, history = traffic[i]
                deadline = time.monotonic() + DEADLINE_S
                scheduler.handle(msg.Submit(i, version, history, 10, kind, beam, [], True, f"u{i}", deadline))  # type: ignore[arg-type]
                sent[i] = (start + at, kind)
                i += 1
            if not scheduler.busy:
                time.sleep(min(0.001, max(0.0, traffic[i][0] - now)))
                continue
            t0 = time.perf_counter()
            scheduler.step()
            steps.append(time.perf_counter() - t0)
        wall = time.perf_counter() - start
    latency: dict[str, list[float]] = {"items": [], "session": []}
    for key, (sent_at, kind) in sent.items():
        latency[kind].append(answered[key] - sent_at)
    busy = sum(steps)
    return {
        "requests": len(sent),
        "wall_s": round(wall, 2),
        "busy_share": round(busy / wall, 3),
        **{
            kind: {"n": len(v), "p50_ms": quantile_ms(v, 0.5), "p99_ms": quantile_ms(v, 0.99)}
            for kind, v in latency.items()
        },
        "steps": len(steps),
        "step_ms": {"p50": quantile_ms(steps, 0.5), "p99": quantile_ms(steps, 0.99)},
        "phases": {
            name: {
                "calls": len(v),
                "seconds": round(sum(v), 3),
                "share_of_busy": round(sum(v) / busy, 3) if busy else None,
            }
            for name, v in spent.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("model-store"))
    parser.add_argument("--name", default="demo")
    parser.add_argument("--rate", type=float, default=36.0, help="offered requests per second")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--items-share", type=float, default=0.3)
    parser.add_argument("--beam", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    catalogue = len(catalogue_ids(args.store, args.name))
    traffic = arrivals(args.rate, args.seconds, args.items_share, catalogue, args.seed)
    report: dict[str, Any] = {
        "benchmark": "scheduler_profile",
        "command": " ".join(["python -m benchmarks.scheduler_profile", *sys.argv[1:]]),
        "schedulers": {mode: run(args.store, args.name, mode, traffic, args.beam) for mode in ("continuous", "batch")},
    }
    cont, batch = report["schedulers"]["continuous"], report["schedulers"]["batch"]
    report["items_p99_ratio_batch_over_continuous"] = round(batch["items"]["p99_ms"] / cont["items"]["p99_ms"], 2)
    emit(report, args.out)


if __name__ == "__main__":
    main()
