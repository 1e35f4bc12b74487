"""The load-testing commands of ``onerec``: ``onerec replay`` and ``onerec traffic synth``.

``onerec.cli`` imports this module lazily and calls :func:`register`, so the load tester's options
live next to its code. Each sub-command's handler is stored as ``func`` and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``replay`` and ``traffic`` (with ``synth``) to the ``onerec`` command line."""
    _add_replay(subparsers)
    traffic = subparsers.add_parser("traffic", help="make request traces for load tests")
    traffic_commands = traffic.add_subparsers(dest="traffic_command", required=True)
    _add_synth(traffic_commands)


def _add_replay(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="open-loop replay of a trace against a running service",
        description="Send each request of TRACE at its scheduled time (open loop) and report latency "
        "from the scheduled time, throughput, errors by status and the share of late sends.",
    )
    parser.add_argument("trace", type=Path, help="JSON Lines trace (onerec traffic synth or a capture)")
    parser.add_argument("--target", required=True, help="http://HOST:PORT or grpc://HOST:PORT (loopback only)")
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--speed", type=float, help="rescale trace time (2 = twice as fast)")
    timing.add_argument(
        "--rate",
        type=float,
        help="ignore trace times: fixed rate in requests/s (with --duration the trace is cycled to fill it)",
    )
    parser.add_argument("--duration", type=float, help="stop scheduling after this many seconds")
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=256,
        help="requests due while this many are outstanding are dropped (counted)",
    )
    parser.add_argument("--max-requests", type=int, help="send at most this many requests")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request client timeout, seconds")
    parser.add_argument(
        "--late-threshold-ms",
        type=float,
        default=5.0,
        help="a send later than this counts as late (client fell behind)",
    )
    parser.add_argument("--out", type=Path, help="write the JSON report here (default: stdout)")
    parser.add_argument("--plot", type=Path, help="write a latency plot (PNG, needs matplotlib)")
    parser.add_argument("--samples", action="store_true", help="include every raw sample in the report")
    parser.add_argument("--allow-remote", action="store_true", help="allow a target that is not loopback")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.set_defaults(func=run_replay)


def _add_synth(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="synthesise a trace: Poisson arrivals, Zipf users, a mix of request shapes",
        description="Users come from a sequence file (--users) or are made up over the item ids that a "
        "running service lists (--service); nothing of the model is needed.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--users",
        type=Path,
        metavar="FILE",
        help="sequence file 'user item item ...' (oldest first, as `onerec build --dataset` reads): "
        "its users, and their last --history-length items",
    )
    source.add_argument(
        "--service",
        metavar="URL",
        help="http://HOST:PORT of a running service: made-up users u0, u1, ... whose histories are drawn "
        "from the catalogue's most popular live items (GET /v1/models?popular_items=N)",
    )
    parser.add_argument("--num-users", type=int, default=1000, help="with --service: how many users")
    parser.add_argument(
        "--catalog-sample",
        type=int,
        default=1000,
        help="with --service: draw histories from this many of the most popular items",
    )
    parser.add_argument("--allow-remote", action="store_true", help="with --service: allow a non-loopback one")
    parser.add_argument("--rate", type=float, required=True, help="mean requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds of traffic")
    parser.add_argument("--out", type=Path, required=True, help="trace file to write (JSON Lines)")
    parser.add_argument("--diurnal", action="store_true", help="modulate the rate over a compressed day")
    parser.add_argument("--diurnal-amplitude", type=float, default=0.5, help="relative swing of the rate")
    parser.add_argument("--diurnal-period", type=float, help="seconds per cycle (default: --duration)")
    parser.add_argument("--mode-mix", help="e.g. session=0.5,items=0.5 (default: leave mode to the server)")
    parser.add_argument("--beam-widths", help="e.g. 32,128, drawn uniformly (default: server's)")
    parser.add_argument("--num-items", default="10", help="e.g. 10 or 5,10,20, drawn uniformly")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of user activity")
    parser.add_argument(
        "--history-length",
        type=int,
        default=50,
        help="carry each user's last N items in the request (0: use the feature store)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the trace (and of made-up histories)")
    parser.set_defaults(func=run_synth)


def run_replay(args: argparse.Namespace) -> int:
    """Handler of ``onerec replay``."""
    from loadtest.replay import ReplayConfig, replay
    from loadtest.report import format_summary, plot_latency
    from loadtest.targets import RemoteTargetError
    from loadtest.trace import TraceError, read_trace

    try:
        config = ReplayConfig(
            target=args.target,
            speed=args.speed,
            rate=args.rate,
            duration=args.duration,
            max_inflight=args.max_inflight,
            timeout_s=args.timeout,
            late_threshold_s=args.late_threshold_ms / 1000.0,
            allow_remote=args.allow_remote,
            max_requests=args.max_requests,
            progress=not args.quiet,
            include_samples=args.samples,
        )
        records = read_trace(args.trace)
        if not records:
            raise ValueError(f"{args.trace}: the trace holds no requests")
        result = replay(records, config)
    except (TraceError, RemoteTargetError, ValueError, OSError, ImportError) as exc:
        print(f"onerec replay: error: {exc}", file=sys.stderr)
        return 2
    report = result.report
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    if args.plot:
        plot_latency(result.samples, args.plot, title=f"replay of {args.trace.name} against {report['target']}")
    print(format_summary(report), file=sys.stderr)
    return 0


def run_synth(args: argparse.Namespace) -> int:
    """Handler of ``onerec traffic synth``."""
    from loadtest.synth import (
        fetch_popular_items,
        made_up_user_pool,
        parse_int_list,
        parse_mode_mix,
        read_user_pool,
        synthesize,
    )
    from loadtest.trace import write_trace

    try:
        if args.users is not None:
            pool = read_user_pool(args.users, history_length=args.history_length)
        else:
            items = fetch_popular_items(args.service, args.catalog_sample, allow_remote=args.allow_remote)
            pool = made_up_user_pool(items, args.num_users, args.history_length, seed=args.seed)
        records = synthesize(
            pool,
            args.rate,
            args.duration,
            seed=args.seed,
            diurnal_amplitude=args.diurnal_amplitude if args.diurnal else 0.0,
            diurnal_period=args.diurnal_period,
            mode_mix=parse_mode_mix(args.mode_mix) if args.mode_mix else None,
            beam_widths=parse_int_list(args.beam_widths, "--beam-widths") if args.beam_widths else None,
            num_items=parse_int_list(args.num_items, "--num-items") if args.num_items else None,
            zipf=args.zipf,
        )
        count = write_trace(args.out, records)
    except (ValueError, OSError) as exc:  # RemoteTargetError is a ValueError
        print(f"onerec traffic synth: error: {exc}", file=sys.stderr)
        return 2
    users = len({record.user_id for record in records})
    print(
        f"wrote {count} requests over {args.duration:g} s ({users} distinct users) to {args.out}",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m loadtest``) with the same commands as ``onerec``."""
    parser = argparse.ArgumentParser(prog="onerec-loadtest")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))
