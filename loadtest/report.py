"""Percentiles, the replay report (JSON), its one-screen summary, and the optional latency plot.

Percentiles use linear interpolation between closest ranks (numpy's default, "type 7"), so the
numbers in a report can be checked against ``numpy.percentile`` over the raw samples.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


@dataclass(frozen=True)
class Sample:
    """The fate of one scheduled request.

    Times are seconds. ``scheduled`` is the offset in the schedule; ``send_lag`` is how late the
    client actually wrote the request; ``latency`` runs from the *scheduled* time to the end of
    the response (NaN when no response came), so a client that falls behind cannot hide queueing.
    ``status`` is the HTTP status ("200", "429"), the gRPC code name ("OK", "RESOURCE_EXHAUSTED"),
    or a client-side outcome: "timeout", "connect_error", "protocol_error", "dropped_client"
    (over the in-flight limit, never sent) or "cancelled" (still in flight when the run ended).
    """

    index: int
    scheduled: float
    send_lag: float
    latency: float
    status: str
    ok: bool


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def latency_summary_ms(latencies_s: Sequence[float]) -> dict[str, Any]:
    """count, mean, p50/p90/p99/p99.9 and max in milliseconds (None where there are no samples)."""
    values = [value * 1000.0 for value in latencies_s if not math.isnan(value)]
    summary: dict[str, Any] = {"count": len(values)}
    for name, q in PERCENTILES:
        summary[name] = _round(percentile(values, q))
    summary["max"] = _round(max(values)) if values else None
    summary["mean"] = _round(sum(values) / len(values)) if values else None
    return summary


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def build_report(
    samples: Sequence[Sample],
    *,
    target: str,
    protocol: str,
    wall_seconds: float,
    late_threshold_s: float,
    settings: dict[str, Any],
    include_samples: bool = False,
) -> dict[str, Any]:
    """The replay report: what was offered, what came back, how fast, and whether the client kept up."""
    scheduled = len(samples)
    sent = [s for s in samples if s.status != "dropped_client"]
    ok = [s for s in samples if s.ok]
    responded = [s for s in samples if not math.isnan(s.latency)]
    status_counts = Counter(s.status for s in samples)
    errors = {status: count for status, count in status_counts.items() if status not in ("200", "OK")}
    span = (samples[-1].scheduled - samples[0].scheduled) if scheduled > 1 else 0.0
    offered = (scheduled - 1) / span if span > 0 else None
    end = max((s.scheduled + s.latency for s in responded), default=0.0)
    active = end - samples[0].scheduled if samples else 0.0
    late = [s for s in sent if s.send_lag > late_threshold_s]
    lags = [s.send_lag for s in sent]
    report: dict[str, Any] = {
        "target": target,
        "protocol": protocol,
        "settings": settings,
        "requests": {
            "scheduled": scheduled,
            "sent": len(sent),
            "responses": len(responded),
            "ok": len(ok),
            "errors": scheduled - len(ok),
            "dropped_client": status_counts.get("dropped_client", 0),
        },
        "throughput_rps": {
            "offered": round(offered, 3) if offered else None,
            "achieved_ok": round(len(ok) / active, 3) if active > 0 else None,
            "achieved_responses": round(len(responded) / active, 3) if active > 0 else None,
        },
        "latency_ms": latency_summary_ms([s.latency for s in ok]),
        "latency_ms_all_responses": latency_summary_ms([s.latency for s in responded]),
        "status_counts": dict(sorted(status_counts.items())),
        "errors_by_status": dict(sorted(errors.items())),
        "late": {
            "share": round(len(late) / len(sent), 6) if sent else 0.0,
            "count": len(late),
            "threshold_ms": late_threshold_s * 1000.0,
            "send_lag_ms": {
                "p50": _round(percentile(lags, 50) * 1000.0),
                "p99": _round(percentile(lags, 99) * 1000.0),
                "max": _round(max(lags) * 1000.0) if lags else None,
            },
        },
        "duration_s": {"schedule": round(span, 4), "wall": round(wall_seconds, 4)},
        "method": (
            "open loop: each request is sent at its scheduled time whatever earlier ones are doing; "
            "latency runs from the scheduled send time to the end of the response (no coordinated "
            "omission); percentiles by linear interpolation over successful responses"
        ),
    }
    if include_samples:
        report["samples"] = [
            {
                "i": s.index,
                "t": round(s.scheduled, 6),
                "lag": round(s.send_lag, 6),
                "latency": None if math.isnan(s.latency) else round(s.latency, 6),
                "status": s.status,
            }
            for s in samples
        ]
    return report


def format_summary(report: dict[str, Any]) -> str:
    """A few human lines; the late share comes first when the client fell behind."""
    lines = []
    late = report["late"]
    if late["share"] > 0.01:
        lines.append(
            f"WARNING: {late['share']:.1%} of requests were sent more than "
            f"{late['threshold_ms']:.0f} ms late "
            f"(client fell behind; send lag p99 {late['send_lag_ms']['p99']} ms): this run measures the "
            "client, not only the server"
        )
    req = report["requests"]
    thr = report["throughput_rps"]
    lat = report["latency_ms"]
    lines.append(
        f"target {report['target']}  scheduled {req['scheduled']}  sent {req['sent']}  ok {req['ok']}  "
        f"errors {req['errors']}  dropped by client {req['dropped_client']}"
    )
    lines.append(f"throughput: offered {thr['offered']} rps, achieved {thr['achieved_ok']} rps (ok responses)")
    lines.append(
        "latency ms (from scheduled time, ok only): "
        + "  ".join(f"{name} {lat[name]}" for name in ("p50", "p90", "p99", "p99.9", "max"))
    )
    lines.append(f"late sends: {late['share']:.2%} (> {late['threshold_ms']:.0f} ms)")
    if report["errors_by_status"]:
        lines.append("errors by status: " + ", ".join(f"{k}={v}" for k, v in report["errors_by_status"].items()))
    return "\n".join(lines)


def plot_latency(samples: Sequence[Sample], path: str | Path, title: str = "") -> None:
    """Latency against scheduled time (left) and the percentile spectrum (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [s for s in samples if s.ok]
    bad = [s for s in samples if not s.ok and not math.isnan(s.latency)]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.scatter([s.scheduled for s in ok], [s.latency * 1000 for s in ok], s=3, label="ok")
    if bad:
        left.scatter([s.scheduled for s in bad], [s.latency * 1000 for s in bad], s=3, c="red", label="error")
    left.set_xlabel("scheduled send time (s)")
    left.set_ylabel("latency from scheduled time (ms)")
    left.legend(loc="upper left")
    values = sorted(s.latency * 1000 for s in ok)
    if values:
        quantiles = [i / len(values) for i in range(len(values))]
        right.plot([1.0 / (1.0 - q) for q in quantiles], values)
        right.set_xscale("log")
        ticks = [1, 2, 10, 100, 1000]
        right.set_xticks(ticks, ["0%", "50%", "90%", "99%", "99.9%"])
    right.set_xlabel("percentile")
    right.set_ylabel("latency (ms)")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
