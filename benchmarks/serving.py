"""Serving benchmark: this service against the usual alternatives, in one run, on one machine.

The alternatives are how public OneRec / TIGER / MiniOneRec code serves: a Hugging Face
``T5ForConditionalGeneration`` of the same depth, width, heads and FFN size, decoding with
``generate(num_beams=B, num_return_sequences=..., prefix_allowed_tokens_fn=trie)`` over the same
catalogue trie, behind the same FastAPI request/response shape, served two ways:

* ``hf`` (report key ``hf_generate``): one request at a time;
* ``hf_batched``: a static-batching server. While a ``generate`` runs, requests queue; the next
  call takes the oldest request's group (same mode and beam width), up to ``--hf-max-batch``
  requests and ``--hf-max-rows`` decoder rows, right-pads and masks their encoder inputs, and gives
  ``generate`` a ``prefix_allowed_tokens_fn`` that dispatches on ``batch_id`` to each request's own
  bans (its history and ``exclude``).

Their weights are random (we compare speed, not quality), which the report states. Ours is started
by ``loadtest.launcher.start_service`` (``python -m service serve``): the front-end process spawns
the engine processes (``ONEREC_ENGINES``, scheduler ``ONEREC_SCHEDULER``; pass them with
``--service-env``), and the CPU monitor splits the service's cores between the front end and each
engine child (``/proc/<pid>/task/*/children``, ``/proc/<pid>/stat``).

The servers run as subprocesses, one after the other, and are driven by the same open-loop replay
(``loadtest``) at rising rates. For each row (mode x beam width) the report gives:
* single-request latency (p50/p99 of sequential requests),
* the highest offered rate whose p99 (from the scheduled send time) stays under the row's budget
  (CPU: items 100 ms, session 500 ms, as in the goals) with no errors, the latency and CPU of every
  step, and the throughput when saturated,
* ``rps_ratio`` = our sustainable rate / HF one at a time's, ``vs_hf_batched.rps_ratio`` the same
  against HF batched, and ``latency_ratio`` = the alternative's single-request p50 / ours (all > 1
  means we are better),
* ``cores_at_saturation``: the service's cores per process at each row's saturation step,
* the load average at the start and end (the machine may be shared).

Same work on every side: same history (exactly ``history_length`` items, sent in the request), same
beam width, same number of decoder steps (``L`` per item, ``m x L`` for a session: neither side
spends a BOS step per item), same constraints (the trie, no item of the history, no repeat in a
session).

Usage::

    python -m benchmarks.serving [--model-store STORE] [--quick] [--out REPORT.json]
    python -m benchmarks.serving --service-env ONEREC_ENGINES=2 --servers onerec,hf,hf_batched
    python -m benchmarks.serving --model-only [--device cuda]    # in-process, no HTTP (GPU row)
    python -m benchmarks.serving --profile [--batch 16]          # where one batch's time goes

Without ``--model-store`` the demo model is built into a temporary store first; ``--random-model
medium|large`` publishes a bigger random-weight model instead (speed only). Each server's torch
threads default to one core less than the machine has (ours: per engine): a Python server's event
loop needs the other one (with every core given to torch, intra-op threads and the front end fight,
and both sides got several times slower on the 2-core machine this was written on).

This module holds the command line and the report; its parts are ``workload`` (the model, rows and
requests), ``hf_baseline`` (the alternative and its server), ``servers`` (starting both),
``rate_sweep``, ``process_cpu``, ``server_metrics``, ``in_process`` (``--model-only``,
``--profile``) and ``random_store`` (``--random-model``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.in_process import model_only, profile_batch
from benchmarks.random_store import RANDOM_PRESETS, make_random_store
from benchmarks.rate_sweep import SweepSettings, single_latency, sweep
from benchmarks.report import emit
from benchmarks.server_metrics import batch_histogram_delta, batch_stats, breakdown_step
from benchmarks.servers import onerec_env, start_hf, start_onerec
from benchmarks.workload import NUM_ITEMS, Row, load_spec, log, make_records
from loadtest.launcher import ServerHandle

CPU_BUDGET_MS = 100.0  # items mode (and any mode given --budget-ms); session mode: below
CPU_SESSION_BUDGET_MS = 500.0  # a session is m x L decoder steps (20 for the demo) against L for items
GPU_BUDGET_MS = 30.0
GOAL_VS_HF = 10.0  # issue 9's goals: sustainable rps >= 10x HF one at a time ...
GOAL_VS_HF_BATCHED = 3.0  # ... and >= 3x HF batched
GOAL_CORES = 1.6  # ... and more than 1.6 of the 2 cores used at saturation

SERVERS = ("onerec", "hf", "hf_batched")


async def measure_server(
    url: str,
    rows: Sequence[Row],
    spec: dict[str, Any],
    history_length: int,
    settings: SweepSettings,
    single_count: int,
    first_rate_floor: float,
    with_metrics: bool = False,
    budgets: dict[str, float] | None = None,
    with_batch_stats: bool = False,
) -> dict[str, Any]:
    """Single-request latency and the rate sweep for every row against one running server.

    ``budgets`` gives the p99 budget per mode (else ``settings.budget_ms``). With ``with_metrics``
    (our service), one more step at the sustainable rate is bracketed by two scrapes of /metrics, to
    split a request's time between queueing, decode steps and the rest. With ``with_batch_stats``
    (the batched alternative), the batches it ran for the row are counted by size.
    """
    results = {}
    for row in rows:
        row_settings = replace(settings, budget_ms=(budgets or {}).get(row.mode, settings.budget_ms))
        records = make_records(spec, row, history_length)
        stats_before = await asyncio.to_thread(batch_stats, url) if with_batch_stats else None
        await single_latency(url, records, 3, 30)  # warm this shape (allocator, caches)
        single = await single_latency(url, records, single_count, max_seconds=row_settings.step_seconds * 2)
        p50_s = (single["p50"] or 1000.0) / 1000.0
        first_rate = max(first_rate_floor, 0.5 / p50_s)
        if p50_s * 1000.0 > row_settings.budget_ms:
            # A lone request already misses the budget: no rate can pass; measure throughput only.
            first_rate = 0.0
        log(
            f"{row.key}: single p50 {single['p50']} ms p99 {single['p99']} ms; budget {row_settings.budget_ms} ms; "
            f"sweep from {first_rate:.2f} rps"
        )
        measured: dict[str, Any] = {
            "budget_ms": row_settings.budget_ms,
            "single_request_ms": single,
            "sweep": await sweep(url, records, first_rate, replace(row_settings, single_rate_hint=1.0 / p50_s)),
        }
        rate = measured["sweep"]["sustainable_rps"]
        if with_metrics and rate > 0:
            measured["server_breakdown"] = await breakdown_step(url, records, rate, row_settings)
        if stats_before is not None:
            measured["batches"] = batch_histogram_delta(stats_before, await asyncio.to_thread(batch_stats, url))
        results[row.key] = measured
    return results


def ratios(ours: dict[str, Any], alt: dict[str, Any], goal: float) -> dict[str, Any]:
    """Ours against one alternative: rate (ours / theirs), saturated rate, and latency (theirs / ours)."""
    ours_rps, alt_rps = ours["sweep"]["sustainable_rps"], alt["sweep"]["sustainable_rps"]
    ours_sat, alt_sat = ours["sweep"]["saturated_throughput_rps"], alt["sweep"]["saturated_throughput_rps"]
    rps_ratio: float | None
    if alt_rps > 0:
        rps_ratio, basis = ours_rps / alt_rps, "sustainable rate at the p99 budget, ours / alternative"
    elif ours_rps == 0:
        rps_ratio = None
        basis = "neither side met the p99 budget at any rate tried: compare saturated_throughput_ratio"
    else:
        rps_ratio = (ours_rps / alt_sat) if alt_sat else None
        basis = (
            "the alternative met the p99 budget at no rate tried; ratio of our sustainable rate to the "
            "alternative's saturated throughput (budget ignored for it)"
        )
    ours_p50, alt_p50 = ours["single_request_ms"]["p50"], alt["single_request_ms"]["p50"]
    return {
        "rps_ratio": round(rps_ratio, 3) if rps_ratio is not None else None,
        "rps_ratio_basis": basis,
        "saturated_throughput_ratio": round(ours_sat / alt_sat, 3) if ours_sat and alt_sat else None,
        "latency_ratio": round(alt_p50 / ours_p50, 3) if ours_p50 and alt_p50 else None,
        "goal_rps_ratio": goal,
        "goal_met": bool(rps_ratio is not None and rps_ratio >= goal),
    }


def compare(
    row: Row,
    ours: dict[str, Any],
    hf: dict[str, Any],
    depth: int,
    session_items: int,
    hf_batched: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One report row: every side and the ratios (rate: ours over theirs; latency: theirs over ours).

    The top-level ratios are against HF one at a time (as in earlier reports); ``vs_hf_batched``
    holds them against the batched alternative.
    """
    one_at_a_time = ratios(ours, hf, GOAL_VS_HF)
    out: dict[str, Any] = {
        "device": row.device,
        "mode": row.mode,
        "beam_width": row.beam_width,
        "budget_ms": ours.get("budget_ms"),
        "decoder_steps": depth * (1 if row.mode == "items" else session_items),
        "num_items": NUM_ITEMS,
        "onerec": side(ours),
        "hf_generate": side(hf),
        "rps_ratio": one_at_a_time["rps_ratio"],
        "rps_ratio_basis": one_at_a_time["rps_ratio_basis"],
        "saturated_throughput_ratio": one_at_a_time["saturated_throughput_ratio"],
        "latency_ratio": one_at_a_time["latency_ratio"],
        "goal_10x_rps_met": one_at_a_time["goal_met"],
    }
    if hf_batched is not None:
        out["hf_batched"] = side(hf_batched)
        out["vs_hf_batched"] = ratios(ours, hf_batched, GOAL_VS_HF_BATCHED)
        out["goal_3x_vs_batched_rps_met"] = out["vs_hf_batched"]["goal_met"]
    return out


def key_of(label: str) -> str:
    """The report key of a server (``hf`` is reported as ``hf_generate``, as in earlier reports)."""
    return "hf_generate" if label == "hf" else label


def side(measured: dict[str, Any]) -> dict[str, Any]:
    sweep_result = measured["sweep"]
    saturation = [s for s in sweep_result["curve"] if s.get("saturation_step")]
    return {
        "sustainable_rps": sweep_result["sustainable_rps"],
        "p99_at_sustainable_ms": sweep_result["p99_at_sustainable_ms"],
        "single_p50_ms": measured["single_request_ms"]["p50"],
        "single_p99_ms": measured["single_request_ms"]["p99"],
        "saturated_throughput_rps": sweep_result["saturated_throughput_rps"],
        "cpu_cores_at_saturation": saturation[-1].get("cpu_cores") if saturation else None,
        "curve": sweep_result["curve"],
        **({"server_breakdown": measured["server_breakdown"]} if "server_breakdown" in measured else {}),
        **({"batches": measured["batches"]} if "batches" in measured else {}),
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Sustainable rps / p99 there / saturated rps per side, and our rate ratios against each alternative."""
    head = (
        f"{'mode':<8} {'beam':>4} {'budget':>6} | {'ours rps':>8} {'p99':>6} {'sat':>6} | "
        f"{'hf1 rps':>7} {'p99':>6} {'sat':>5} | {'hfB rps':>7} {'p99':>6} {'sat':>6} | "
        f"{'x hf1':>6} {'sat x':>6} | {'x hfB':>6} {'sat x':>6} | {'cores':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        o, h = r.get("onerec") or {}, r.get("hf_generate") or {}
        b = r.get("hf_batched") or {}
        vb = r.get("vs_hf_batched") or {}
        cores = (o.get("cpu_cores_at_saturation") or {}).get("server")
        lines.append(
            f"{r['mode']:<8} {r['beam_width']:>4} {_fmt(r.get('budget_ms'), 0):>6} | "
            f"{_fmt(o.get('sustainable_rps')):>8} {_fmt(o.get('p99_at_sustainable_ms'), 0):>6} "
            f"{_fmt(o.get('saturated_throughput_rps')):>6} | "
            f"{_fmt(h.get('sustainable_rps'), 2):>7} {_fmt(h.get('p99_at_sustainable_ms'), 0):>6} "
            f"{_fmt(h.get('saturated_throughput_rps')):>5} | "
            f"{_fmt(b.get('sustainable_rps'), 2):>7} {_fmt(b.get('p99_at_sustainable_ms'), 0):>6} "
            f"{_fmt(b.get('saturated_throughput_rps')):>6} | "
            f"{_fmt(r.get('rps_ratio')):>6} {_fmt(r.get('saturated_throughput_ratio')):>6} | "
            f"{_fmt(vb.get('rps_ratio')):>6} {_fmt(vb.get('saturated_throughput_ratio')):>6} | {_fmt(cores, 2):>5}"
        )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-store", type=Path, help="store holding the model (default: build the demo)")
    parser.add_argument("--model-name", help="model in the store (default: the only one)")
    parser.add_argument(
        "--random-model", choices=sorted(RANDOM_PRESETS), help="benchmark a random-weight model of this size instead"
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="short steps, one bisection, failures retried once, CPU only: every row of every server in about "
        "10 minutes on 2 cores",
    )  # fmt: skip
    parser.add_argument(
        "--servers", default=",".join(SERVERS),
        help="servers to measure: onerec (ours), hf (HF generate one at a time), hf_batched (HF generate, "
        "static batches); the report's rows need onerec and hf",
    )  # fmt: skip
    parser.add_argument(
        "--hf-max-batch", type=int, default=16,
        help="hf_batched: most requests per generate() call (default: ONEREC_MAX_BATCH_SIZE's default)",
    )  # fmt: skip
    parser.add_argument(
        "--hf-max-rows", type=int, default=2048,
        help="hf_batched: most decoder rows (requests x beams) per call (default: ONEREC_MAX_BEAM_BUDGET's)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument(
        "--budget-ms", type=float,
        help="p99 budget of every row (default on CPU: items 100, session 500; on GPU: 30)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1),
        help="torch threads of the alternative's server (default: one core left for its event loop)",
    )  # fmt: skip
    parser.add_argument(
        "--onerec-threads", type=int, default=max(1, (os.cpu_count() or 1) - 1),
        help="torch threads of our service (default: one core left for its event loop and front ends)",
    )  # fmt: skip
    parser.add_argument(
        "--service-env", action="append", default=[], metavar="KEY=VALUE",
        help="extra ONEREC_* setting for our service (repeatable), e.g. ONEREC_ENGINES=2, "
        "ONEREC_SCHEDULER=batch, ONEREC_MAX_BATCH_SIZE=32",
    )  # fmt: skip
    parser.add_argument("--beams", default="32,128", help="beam widths of the rows")
    parser.add_argument("--modes", default="items,session", help="modes of the rows")
    parser.add_argument("--history-length", type=int, help="history items per request (default: model's max)")
    parser.add_argument("--device", default=None, help="model-only: cpu or cuda (default: cuda if present)")
    parser.add_argument("--model-only", action="store_true", help="in-process comparison, no HTTP")
    parser.add_argument("--batch", type=int, default=16, help="model-only: batch size of our generator")
    parser.add_argument("--reps", type=int, default=20, help="model-only: repetitions per measurement")
    parser.add_argument("--profile", action="store_true", help="time the pieces of one batch, in-process")
    return parser.parse_args(argv)


def ensure_store(args: argparse.Namespace, workdir: Path) -> Path:
    if args.random_model:
        store = workdir / "random-store"
        log(f"publishing a random-weight '{args.random_model}' model into {store}")
        make_random_store(store, args.random_model)
        args.model_name = f"random-{args.random_model}"
        return store
    if args.model_store:
        return Path(args.model_store)
    from onerec.build import build_demo

    store = workdir / "store"
    log(f"no --model-store: building the demo model into {store}")
    build_demo(store)
    return store


def quick_settings(budget: float) -> SweepSettings:
    """Short steps, one bisection, a failure retried once (the machine may be shared): every row of all
    three servers in about 10 minutes on 2 cores (4 without the retries and bisection, but a lone
    noisy step then decided a row)."""
    return SweepSettings(
        budget_ms=budget,
        step_seconds=2.5,
        min_requests=15,
        max_step_seconds=4.0,
        growth=2.0,
        max_steps=4,
        refine_steps=1,
        time_limit_s=20.0,
        confirm_failures=True,
        saturation_doublings=3,
        saturation_extra_s=8.0,
    )


def budgets_for(args: argparse.Namespace, device: str) -> dict[str, float]:
    """p99 budget per mode: --budget-ms for all, else the goals' (items 100 ms, session 500 ms on CPU)."""
    if args.budget_ms:
        return {"items": args.budget_ms, "session": args.budget_ms}
    if device == "cuda":
        return {"items": GPU_BUDGET_MS, "session": GPU_BUDGET_MS}
    return {"items": CPU_BUDGET_MS, "session": CPU_SESSION_BUDGET_MS}


def saturation_cores(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The service's CPU at the saturation step of each row, and the most it used (the cores goal)."""
    per_row = {}
    for r in rows:
        cpu = (r.get("onerec") or {}).get("cpu_cores_at_saturation")
        if cpu:
            per_row[f"{r['mode']}/beam{r['beam_width']}"] = {
                "server": cpu.get("server"),
                "server_processes": cpu.get("server_processes"),
                "machine": cpu.get("machine"),
                "other": cpu.get("other"),
                "loadavg_1m": cpu.get("loadavg_1m"),
            }
    best = max((v["server"] or 0.0 for v in per_row.values()), default=None)
    return {
        "per_row": per_row,
        "max_server_cores": best,
        "goal_cores": GOAL_CORES,
        "goal_met": bool(best is not None and best > GOAL_CORES),
        "note": "cores of our service's process tree during the saturation step of each row (front end = the "
        "`onerec serve` process, engineN = its engine children, from /proc/<pid>/stat and "
        "/proc/<pid>/task/*/children); the machine is shared, see 'other' and loadavg_1m",
    }


def run_http(args: argparse.Namespace, store: Path, workdir: Path) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    load_start = os.getloadavg()
    spec = load_spec(store, args.model_name)
    cfg = spec["model_config"]
    history_length = args.history_length or int(cfg["history_window"])
    live_items = sum(spec["live"])
    history_length = min(history_length, live_items // 2)
    spec_path = workdir / "hf_spec.json"
    spec_path.write_text(json.dumps(spec))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.quick else [])
    beams = [int(b) for b in args.beams.split(",")]
    modes = args.modes.split(",")
    servers = [s for s in SERVERS if s in args.servers.split(",")]
    service_env = dict(item.split("=", 1) for item in args.service_env)
    all_rows = []
    budgets_by_device = {}
    for device in devices:
        budgets = budgets_for(args, device)
        budgets_by_device[device] = budgets
        settings = quick_settings(budgets["items"]) if args.quick else SweepSettings(budget_ms=budgets["items"])
        rows = [Row(mode, beam, device) for mode in modes for beam in beams]
        single_count = 8 if args.quick else 30
        measured: dict[str, dict[str, Any]] = {}
        for label in servers:
            log(f"starting {label} ({device})")
            server: ServerHandle
            if label == "onerec":
                env = onerec_env(args.model_name, device, args.onerec_threads, service_env)
                server = start_onerec(store, env, workdir)
            else:
                server = start_hf(
                    spec_path, device, args.threads, workdir,
                    max_batch=1 if label == "hf" else args.hf_max_batch, max_rows=args.hf_max_rows,
                )  # fmt: skip
            try:
                measured[label] = asyncio.run(
                    measure_server(
                        server.http_url,
                        rows, spec, history_length, replace(settings, server_pid=server.pid), single_count,
                        first_rate_floor=0.5,
                        with_metrics=label == "onerec",
                        budgets=budgets,
                        with_batch_stats=label == "hf_batched",
                    )
                )  # fmt: skip
            finally:
                server.stop()
        if not {"onerec", "hf"} <= set(measured):  # a partial run (--servers): each side alone, no ratios
            all_rows.extend(
                {"device": row.device, "mode": row.mode, "beam_width": row.beam_width, "budget_ms": budgets[row.mode],
                 **{key_of(label): side(measured[label][row.key]) for label in measured}}
                for row in rows
            )  # fmt: skip
            continue
        for row in rows:
            all_rows.append(
                compare(
                    row,
                    measured["onerec"][row.key],
                    measured["hf"][row.key],
                    len(cfg["level_sizes"]),
                    int(cfg["session_items"]),
                    hf_batched=measured.get("hf_batched", {}).get(row.key),
                )
            )
    load_end = os.getloadavg()
    return {
        "benchmark": "serving",
        "quick": bool(args.quick),
        "command": " ".join(["python -m benchmarks.serving", *sys.argv[1:]]) if sys.argv else None,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "torch_threads": {"hf": args.threads, "onerec": args.onerec_threads},
            "service_env": service_env,
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in load_end],
            "shared": "the machine was shared with other engineers' CPU-heavy jobs during the run (see "
            "loadavg_start/end, and each step's cpu_cores.other and loadavg_1m): absolute rates are "
            "lower and noisier than on an idle machine; the three servers ran one after another, "
            "so they did not all see the same background load",
            "nice": os.nice(0),
        },
        "service": {
            "engines": int(service_env.get("ONEREC_ENGINES", "1")),
            "scheduler": service_env.get("ONEREC_SCHEDULER", "continuous"),
            "started_by": "loadtest.launcher.start_service (python -m service serve); engines are children "
            "of that process",
        },
        "model": {
            "name": spec["name"],
            "version": spec["version"],
            "config": cfg,
            "catalog_size": len(spec["item_ids"]),
            "parameters": spec["parameters"],
        },
        "workload": {
            "history_length": history_length,
            "num_items": NUM_ITEMS,
            "decoder_steps": {
                "items": len(cfg["level_sizes"]),
                "session": len(cfg["level_sizes"]) * int(cfg["session_items"]),
            },
            "same_work": "all sides: same history (sent in each request), same beam width, same "
            "decoder steps (L per item, m*L per session, no BOS step), same trie, history excluded, "
            "no repeats within a session; all return the top num_items distinct items of the beams",
        },
        "alternatives": {
            "hf_generate": "transformers T5ForConditionalGeneration.generate(num_beams=B, "
            "num_return_sequences=..., prefix_allowed_tokens_fn=trie) behind FastAPI/uvicorn, one request "
            "at a time",
            "hf_batched": "the same model and server, batching: while a generate() runs, requests queue; the "
            "next call takes the oldest request's group (same mode and beam width), up to "
            f"{args.hf_max_batch} requests and {args.hf_max_rows} decoder rows (our engine's defaults "
            "ONEREC_MAX_BATCH_SIZE / ONEREC_MAX_BEAM_BUDGET), right-pads and masks the encoder inputs, "
            "and passes prefix_allowed_tokens_fn dispatching on batch_id to each request's own bans; "
            "no wait for a batch to fill",
            "weights": "random initialisation (speed comparison only, not quality)",
            "t5": {
                "d_model": cfg["d_model"],
                "num_heads": cfg["n_heads"],
                "num_layers": cfg["n_encoder_layers"],
                "num_decoder_layers": cfg["n_decoder_layers"],
                "d_ff": cfg["d_ff"],
                "feed_forward_proj": "gated-gelu",
                "vocab": 2 + sum(cfg["level_sizes"]),
            },
            "ffn_note": "T5's decoder FFN is dense with d_ff = one expert's width; ours routes each token to "
            f"top-{cfg['experts_top_k']} of {cfg['n_experts']} experts, so ours does at least the "
            "alternative's FFN work (the comparison is conservative for us)",
        },
        "budget_ms": budgets_by_device,
        "goals": {
            "rps_vs_hf_generate": GOAL_VS_HF,
            "rps_vs_hf_batched": GOAL_VS_HF_BATCHED,
            "cores_at_saturation": GOAL_CORES,
        },
        "method": "each server alone on the machine (one after another), driven by loadtest's open-loop "
        "replay at a fixed rate per step; latency from the scheduled send time; a step passes with zero "
        "errors and p99 <= the row's budget; rates rise geometrically until a step fails, then bisect; the "
        "highest passing offer (saturation offers included) is the sustainable rate; saturated rps = "
        "what the server completes when offered more than it keeps up with; --quick: 2.5-4 s steps of "
        "at least 15 requests, one bisection, a failed step retried once; "
        "single-request latency = p50 of sequential requests; rps_ratio = ours / alternative "
        "sustainable rate; latency_ratio = alternative single p50 / ours",
        "rows": all_rows,
        "cores_at_saturation": saturation_cores(all_rows),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers this run started are stopped by their finally blocks.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="onerec-bench-") as tmp:
        workdir = Path(tmp)
        store = ensure_store(args, workdir)
        if args.profile:
            import torch

            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            torch.set_num_threads(args.threads)
            cfg = load_spec(store, args.model_name)["model_config"]
            history = args.history_length or int(cfg["history_window"])
            report: dict[str, Any] = {
                "benchmark": "serving-profile",
                "profiles": [
                    profile_batch(store, args.model_name, device, Row(mode, int(beam), device), args.batch,
                                  history, max(3, args.reps // 4))
                    for mode in args.modes.split(",")
                    for beam in args.beams.split(",")
                ],
            }  # fmt: skip
        elif args.model_only:
            import torch

            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            torch.set_num_threads(args.threads)
            beams = [int(b) for b in args.beams.split(",")]
            rows = [Row(mode, beam, device) for mode in args.modes.split(",") for beam in beams]
            spec_cfg = load_spec(store, args.model_name)["model_config"]
            report = model_only(
                store,
                args.model_name,
                device,
                rows,
                args.history_length or int(spec_cfg["history_window"]),
                args.reps,
                args.batch,
            )
        else:
            report = run_http(args, store, workdir)
            print(table(list(report["rows"])), file=sys.stderr)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
