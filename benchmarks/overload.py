"""Overload and soak benchmark: does the service shed load cleanly, and does it stay healthy for long?

1. Sustainable rate: given by ``--rate`` or found by a short open-loop sweep (highest rate whose p99
   stays under the budget with no errors; the serving benchmark's search, ``benchmarks.rate_sweep``).
2. Overload: open-loop replay at 2x that rate. The service should answer the excess with 429 at
   once (queue full), keep the p99 of the requests it admits within the budget, and give no 5xx
   and no client timeouts. A batching server often completes far more than its p99-sustainable
   rate, so 2x may not overload it at all: a second phase offers 2x the most it has completed per
   second, which certainly does, and the same checks apply there.
3. Recovery: a short replay at half the sustainable rate right after: back within budget.
4. Soak: ``--soak-seconds`` (default 600) at 70% of the sustainable rate, sampling the service's
   resident memory (/proc/PID/status VmRSS) all along: RSS at start and end, errors, and the drift
   of p99 between the first and last windows.

Prints a JSON report (stdout) and a short summary (stderr); ``--quick`` shortens every phase.

    python -m benchmarks.overload [--model-store STORE] [--quick] [--rate RPS] [--mode items] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.rate_sweep import SweepSettings, single_latency, sweep
from benchmarks.report import emit
from benchmarks.servers import onerec_env, start_onerec
from benchmarks.serving import CPU_BUDGET_MS
from benchmarks.workload import Row, load_spec, log, make_records
from loadtest.replay import ReplayConfig, replay_async
from loadtest.report import Sample, latency_summary_ms
from loadtest.trace import MODES, TraceRecord


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process in MiB, from /proc (Linux); None when unavailable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds on a daemon thread."""

    def __init__(self, pid: int, interval: float = 2.0) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.monotonic()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()

    def _sample(self) -> None:
        value = rss_mb(self.pid)
        if value is not None:
            self.samples.append((round(time.monotonic() - self._start, 2), round(value, 1)))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)


def windows(samples: Sequence[Sample], window_s: float) -> list[dict[str, Any]]:
    """p50/p99 and errors per window of scheduled time: the drift of a long run."""
    if not samples:
        return []
    end = max(s.scheduled for s in samples)
    out = []
    for index in range(int(end // window_s) + 1):
        part = [s for s in samples if index * window_s <= s.scheduled < (index + 1) * window_s]
        lat = latency_summary_ms([s.latency for s in part if s.ok])
        out.append(
            {
                "start_s": index * window_s,
                "requests": len(part),
                "ok": lat["count"],
                "errors": sum(1 for s in part if not s.ok),
                "p50_ms": lat["p50"],
                "p99_ms": lat["p99"],
            }
        )
    return out


async def replay_phase(
    url: str,
    records: Sequence[TraceRecord],
    rate: float,
    seconds: float,
    timeout_s: float,
    progress_s: float | None = None,
) -> tuple[dict[str, Any], list[Sample]]:
    config = ReplayConfig(
        target=url,
        rate=rate,
        duration=seconds,
        max_inflight=4096,
        timeout_s=timeout_s,
        progress=progress_s is not None,
        progress_interval_s=progress_s or 1.0,
    )
    result = await replay_async(records, config)
    return result.report, result.samples


def phase_summary(report: dict[str, Any], budget_ms: float) -> dict[str, Any]:
    counts = report["status_counts"]
    total = report["requests"]["scheduled"]
    server_errors = {k: v for k, v in counts.items() if k.isdigit() and int(k) >= 500}
    return {
        "offered_rps": report["throughput_rps"]["offered"],
        "achieved_ok_rps": report["throughput_rps"]["achieved_ok"],
        "requests": total,
        "status_counts": counts,
        "shed_429_share": round(counts.get("429", 0) / total, 4) if total else 0.0,
        "admitted_latency_ms": report["latency_ms"],
        "admitted_p99_within_budget": (
            report["latency_ms"]["p99"] is not None and report["latency_ms"]["p99"] <= budget_ms
        ),
        "server_errors_5xx": sum(server_errors.values()),
        "client_timeouts": counts.get("timeout", 0),
        "late_share": report["late"]["share"],
    }


async def run(args: argparse.Namespace, store: Path, workdir: Path) -> dict[str, Any]:
    spec = load_spec(store, args.model_name)
    history_length = min(int(spec["model_config"]["history_window"]), sum(spec["live"]) // 2)
    row = Row(args.mode, args.beam_width)
    records = make_records(spec, row, history_length, users=500)
    extra_env = dict(item.split("=", 1) for item in args.service_env)
    if args.max_queue:
        extra_env["ONEREC_MAX_QUEUE"] = str(args.max_queue)
    budget = args.budget_ms
    log("starting the service")
    server = start_onerec(store, onerec_env(args.model_name, "cpu", args.threads, extra_env), workdir)
    url = server.http_url
    report: dict[str, Any] = {
        "benchmark": "overload",
        "quick": bool(args.quick),
        "budget_ms": budget,
        "request": {
            "mode": row.mode,
            "beam_width": row.beam_width,
            "num_items": 10,
            "history_length": history_length,
        },
        "service_env": extra_env or "defaults",
        "threads": args.threads,
        "model": {"name": spec["name"], "version": spec["version"]},
    }
    try:
        await single_latency(url, records, 5, 10)
        rate = args.rate
        if rate is None:
            single = await single_latency(url, records, 10, 10)
            quick = args.quick
            settings = SweepSettings(
                budget_ms=budget,
                step_seconds=2.0 if quick else 5.0,
                min_requests=20 if quick else 60,
                max_step_seconds=4.0 if quick else 10.0,
                growth=2.0 if quick else 1.5,
                max_steps=5 if quick else 8,
                refine_steps=0 if quick else 2,
                time_limit_s=25.0 if quick else 120.0,
                confirm_failures=not quick,
                server_pid=server.pid,
            )
            found = await sweep(url, records, max(0.5, 0.5 / ((single["p50"] or 100.0) / 1000.0)), settings)
            rate = found["sustainable_rps"] or found["max_achieved_rps"] or 1.0
            report["sustainable_search"] = found
        report["sustainable_rps"] = rate
        timeout_s = max(5.0, 30 * budget / 1000.0)
        log(f"overload: 2 x {rate:.1f} rps for {args.overload_seconds}s")
        overload_report, _ = await replay_phase(url, records, 2 * rate, args.overload_seconds, timeout_s)
        report["overload"] = phase_summary(overload_report, budget)
        await asyncio.sleep(1.0)
        # A batching server often serves far more than its p99-sustainable rate (bigger batches, higher
        # latency): 2x that rate may not exceed its capacity at all. So overload it for sure as well:
        # twice the most it has completed per second so far.
        capacity = max(
            report["overload"]["achieved_ok_rps"] or 0.0,
            (report.get("sustainable_search") or {}).get("max_achieved_rps") or 0.0,
        )
        log(f"overload beyond capacity: 2 x {capacity:.1f} rps for {args.overload_seconds}s")
        beyond_report, _ = await replay_phase(url, records, 2 * capacity, args.overload_seconds, timeout_s)
        report["overload_beyond_capacity"] = phase_summary(beyond_report, budget)
        await asyncio.sleep(1.0)
        recovery_report, _ = await replay_phase(url, records, 0.5 * rate, args.recovery_seconds, timeout_s)
        report["recovery"] = phase_summary(recovery_report, budget)
        log(f"soak: 0.7 x {rate:.1f} rps for {args.soak_seconds}s")
        rss_before = rss_mb(server.pid)
        with RssSampler(server.pid, interval=max(1.0, args.soak_seconds / 100)) as sampler:
            soak_report, soak_samples = await replay_phase(
                url,
                records,
                0.7 * rate,
                args.soak_seconds,
                timeout_s,
                progress_s=10.0 if args.soak_seconds >= 60 else None,
            )
        report["soak"] = soak_summary(soak_report, soak_samples, sampler.samples, rss_before, budget, args)
    finally:
        server.stop()
    report["checks"] = checks(report)
    return report


def soak_summary(
    report: dict[str, Any],
    samples: list[Sample],
    rss: list[tuple[float, float]],
    rss_before: float | None,
    budget: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    window_s = max(5.0, args.soak_seconds / 10)
    parts = [w for w in windows(samples, window_s) if w["p99_ms"] is not None]
    first, last = (parts[0]["p99_ms"], parts[-1]["p99_ms"]) if parts else (None, None)
    rss_values = [value for _, value in rss]
    return {
        **phase_summary(report, budget),
        "seconds": args.soak_seconds,
        "errors": report["requests"]["errors"],
        "rss_mb": {
            "start": rss_values[0] if rss_values else rss_before,
            "end": rss_values[-1] if rss_values else None,
            "max": max(rss_values) if rss_values else None,
            "growth": round(rss_values[-1] - rss_values[0], 1) if rss_values else None,
        },
        "rss_samples": rss[:: max(1, len(rss) // 50)],
        "p99_drift_ms": round(last - first, 3) if parts and first is not None and last is not None else None,
        "p99_first_last_ms": [first, last],
        "windows": parts,
    }


def checks(report: dict[str, Any]) -> dict[str, bool]:
    overload, beyond, soak = report["overload"], report["overload_beyond_capacity"], report["soak"]
    budget = report["budget_ms"]
    rss = soak["rss_mb"]
    return {
        "overload_2x_sustainable_admitted_p99_within_budget": overload["admitted_p99_within_budget"],
        "overload_2x_sustainable_no_5xx": overload["server_errors_5xx"] == 0,
        "beyond_capacity_sheds_with_429": beyond["status_counts"].get("429", 0) > 0,
        "beyond_capacity_admitted_p99_within_budget": beyond["admitted_p99_within_budget"],
        "beyond_capacity_no_5xx": beyond["server_errors_5xx"] == 0,
        "overload_no_client_timeouts": overload["client_timeouts"] == 0 and beyond["client_timeouts"] == 0,
        "recovery_p99_within_budget": report["recovery"]["admitted_p99_within_budget"],
        "soak_no_errors": soak["errors"] == 0,
        "soak_p99_within_budget": soak["admitted_p99_within_budget"],
        "soak_p99_drift_small": soak["p99_drift_ms"] is None or abs(soak["p99_drift_ms"]) <= 0.5 * budget,
        "soak_rss_growth_under_10pct": (
            rss["growth"] is None or rss["start"] is None or rss["growth"] <= 0.1 * rss["start"]
        ),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-store", type=Path, help="store holding the model (default: build the demo)")
    parser.add_argument("--model-name")
    parser.add_argument("--rate", type=float, help="sustainable rate (default: find it by a short sweep)")
    parser.add_argument("--budget-ms", type=float, default=CPU_BUDGET_MS)
    parser.add_argument("--mode", default="session", choices=MODES)
    parser.add_argument("--beam-width", type=int, default=32)
    parser.add_argument("--overload-seconds", type=float, default=30.0)
    parser.add_argument("--recovery-seconds", type=float, default=10.0)
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--max-queue", type=int, help="ONEREC_MAX_QUEUE for the service (default: its own)")
    parser.add_argument(
        "--service-env", action="append", default=[], metavar="KEY=VALUE",
        help="extra ONEREC_* setting for the service (repeatable), e.g. ONEREC_MAX_BATCH_SIZE=4",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1),
        help="torch threads of the service (default: one core left for its event loop)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="short phases (about a minute in all)")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.overload_seconds = min(args.overload_seconds, 6.0)
        args.recovery_seconds = min(args.recovery_seconds, 3.0)
        args.soak_seconds = min(args.soak_seconds, 10.0)
    for name in ("overload_seconds", "recovery_seconds", "soak_seconds"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers this run started are stopped by their finally blocks.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="onerec-overload-") as tmp:
        workdir = Path(tmp)
        store = args.model_store
        if store is None:
            from onerec.build import build_demo

            store = workdir / "store"
            log(f"no --model-store: building the demo model into {store}")
            build_demo(store)
        report = asyncio.run(run(args, store, workdir))
    emit(report, args.out)
    o, b, s = report["overload"], report["overload_beyond_capacity"], report["soak"]
    print(
        f"sustainable {report['sustainable_rps']:.1f} rps (p99 budget {report['budget_ms']} ms)\n"
        f"overload 2x: 429 share {o['shed_429_share']:.1%}, "
        f"admitted p99 {o['admitted_latency_ms']['p99']} ms, "
        f"5xx {o['server_errors_5xx']}, timeouts {o['client_timeouts']}\n"
        f"beyond capacity ({b['offered_rps']} rps): 429 share {b['shed_429_share']:.1%}, "
        f"admitted p99 {b['admitted_latency_ms']['p99']} ms, statuses {b['status_counts']}\n"
        f"soak {s['seconds']:.0f}s at 0.7x: errors {s['errors']}, "
        f"p99 first/last window {s['p99_first_last_ms']} ms, "
        f"RSS {s['rss_mb']['start']} -> {s['rss_mb']['end']} MiB\n"
        f"checks: {json.dumps(report['checks'])}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
