"""Ops and time of a decode step whose rows sit at one code level against one whose rows sit at many.

Continuous batching mixes levels: requests join at every step, so the live rows are at every
(slot, level) position at once, where a batch-at-a-time step has them all at one. This measures the
decode part of ``StepSearch.step`` (``_decode``: decoder, output head, constrained top-k, beam update)
in both situations, on the same model and the same number of requests:

- ``mixed``: one request joins every ``--every`` steps (30% ``items``), so the rows spread over every
  level; steps after the first ``--warm`` are measured;
- ``one_level``: as many session requests as ``mixed`` keeps live on average join together and step
  in lockstep, round after round.

Per situation: top-level aten ops per decode (``torch.profiler``, what the interpreter pays per op),
the median of this thread's CPU time per decode, and the mean number of live requests and of distinct
levels; and what joining and leaving cost beside it: top-level aten ops per re-layout (without its
encoder call), per encoder call, and re-layouts per decode. Without ``--store`` the model is the demo
configuration with random weights (``benchmarks.decode_step.build``); with it, the newest version of
``--name`` there.

    python -m benchmarks.step_mix [--store STORE --name NAME] [--out FILE]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.decode_step import build
from benchmarks.report import emit
from benchmarks.scheduler_profile import wrapped_phases
from benchmarks.workload import newest_version_dir
from onerec.generate import Generator, RecRequest, StepSearch

PHASES = {"_decode": "step_mix::decode", "_relayout": "step_mix::relayout", "_encode": "step_mix::encode"}


def phase_ops(prof: profile) -> dict[str, int]:
    """Top-level aten ops (called from Python, not from another aten op) by the innermost StepSearch
    phase they ran in: a re-layout's count leaves out the encoder call it makes."""
    marker_of = {marker: name for name, marker in PHASES.items()}
    counts = dict.fromkeys(PHASES, 0)
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        parent, phase = ev.cpu_parent, None
        while parent is not None and not parent.name.startswith("aten::"):
            phase = phase or marker_of.get(parent.name)
            parent = parent.cpu_parent
        if parent is None and phase is not None:
            counts[phase] += 1
    return counts


@contextmanager
def marked_phases() -> Iterator[dict[str, int]]:
    """Each StepSearch phase of ``PHASES`` inside a profiler scope, and its calls counted."""
    calls = dict.fromkeys(PHASES, 0)

    def marked(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: StepSearch, *args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            with record_function(PHASES[name]):
                return fn(self, *args, **kwargs)

        return wrapper

    with wrapped_phases(PHASES, marked):
        yield calls


@contextmanager
def decode_log() -> Iterator[list[tuple[float, int, int]]]:
    """(thread CPU seconds, live requests, distinct levels) of every ``StepSearch._decode`` in the block."""
    log: list[tuple[float, int, int]] = []

    def timed(_: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: StepSearch, snap: Any) -> Any:
            levels = len({job.t % self.cfg.depth for job in self._order})
            t0 = time.thread_time()
            out = fn(self, snap)
            log.append((time.thread_time() - t0, len(self._order), levels))
            return out

        return wrapper

    with wrapped_phases(["_decode"], timed):
        yield log


def request(rng: random.Random, n_items: int, key: int, mode: str) -> RecRequest:
    history = [rng.randrange(n_items) for _ in range(10)]
    return RecRequest(history=history, num_items=10, mode=mode, beam_width=32, user_id=f"u{key}")


def one_level(gen: Generator, requests: int, steps: int, seed: int) -> Callable[[], None]:
    def run() -> None:
        rng, n_items = random.Random(seed), gen.trie.tensors.item_codes.shape[0]
        search = StepSearch(gen)
        for _ in range(max(1, steps // (gen.cfg.session_positions - 1))):
            for key in range(requests):
                search.add(key, request(rng, n_items, key, "session"))
            while len(search):
                search.step()

    return run


def mixed(gen: Generator, every: int, steps: int, seed: int) -> Callable[[], None]:
    def run() -> None:
        rng, n_items = random.Random(seed), gen.trie.tensors.item_codes.shape[0]
        search = StepSearch(gen)
        for t in range(steps):
            if t % every == 0:
                mode = "items" if rng.random() < 0.3 else "session"
                search.add(t, request(rng, n_items, t, mode))
            search.step()

    return run


def measure(run: Callable[[], None], warm: int) -> dict[str, Any]:
    run()  # warm the allocator and the kernels
    with decode_log() as log:
        run()
    kept = log[warm:] if len(log) > warm else log
    with profile(activities=[ProfilerActivity.CPU]) as prof, marked_phases() as calls:
        run()
    ops = phase_ops(prof)
    per_call = {name: round(ops[name] / calls[name], 1) if calls[name] else None for name in PHASES}
    return {
        "decodes": len(kept),
        "aten_ops_per_decode": per_call["_decode"],
        "aten_ops_per_relayout": per_call["_relayout"],  # without its encoder call
        "aten_ops_per_encode": per_call["_encode"],
        "relayouts_per_decode": round(calls["_relayout"] / calls["_decode"], 3),
        "median_cpu_us_per_decode": round(statistics.median(t for t, _, _ in kept) * 1e6, 1),
        "mean_requests": round(statistics.mean(r for _, r, _ in kept), 2),
        "mean_levels": round(statistics.mean(lv for _, _, lv in kept), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--name", default="demo")
    ap.add_argument("--every", type=int, default=2, help="mixed: one request joins every N steps")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warm", type=int, default=40, help="mixed: steps before the row set is steady")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.store is None:
        gen, model = build(4000, args.seed), "demo_config (random weights, 4,000 items)"
    else:
        from onerec.bundle import load_bundle

        path = newest_version_dir(args.store, args.name)
        gen, model = load_bundle(path).generator, str(path)
    mix = mixed(gen, args.every, args.steps, args.seed)
    steady = measure(mix, args.warm)
    lockstep = measure(one_level(gen, max(1, round(steady["mean_requests"])), args.steps, args.seed), 0)
    report = {
        "benchmark": "step_mix",
        "model": model,
        "levels": gen.cfg.depth,
        "session_items": gen.cfg.session_items,
        "one_level": lockstep,
        "mixed": steady,
        "ops_mixed_over_one_level": round(steady["aten_ops_per_decode"] / lockstep["aten_ops_per_decode"], 3),
        "cpu_mixed_over_one_level": round(steady["median_cpu_us_per_decode"] / lockstep["median_cpu_us_per_decode"], 3),
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
