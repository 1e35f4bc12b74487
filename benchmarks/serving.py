"""Serving benchmark: this service against the usual alternative, in one run, on one machine.

The usual alternative is how public OneRec / TIGER / MiniOneRec code serves: a Hugging Face
``T5ForConditionalGeneration`` of the same depth, width, heads and FFN size, decoding with
``generate(num_beams=B, num_return_sequences=..., prefix_allowed_tokens_fn=trie)`` over the same
catalogue trie, behind the same FastAPI request/response shape, one request at a time. Its weights
are random (we compare speed, not quality), which the report states.

Both servers run as subprocesses, one after the other, and are driven by the same open-loop
replay (``loadtest``) at rising rates. For each row (mode x beam width) the report gives:
* single-request latency (p50/p99 of sequential requests),
* the highest offered rate whose p99 (from the scheduled send time) stays under the budget with no
  errors, and the latency curve of every step,
* ``rps_ratio`` = our sustainable rate / the alternative's, and ``latency_ratio`` = the
  alternative's single-request p50 / ours (both > 1 means we are better).

Same work on both sides: same history (exactly ``history_length`` items, sent in the request), same
beam width, same number of decoder steps (``L`` per item, ``m x L`` for a session: neither side
spends a BOS step per item), same constraints (the trie, no item of the history, no repeat in a
session).

Usage::

    python benchmarks/serving.py [--model-store STORE] [--quick] [--out REPORT.json]
    python benchmarks/serving.py --model-only [--device cuda]    # in-process, no HTTP (GPU row)
    python benchmarks/serving.py --profile [--batch 16]          # where one batch's time goes

Without ``--model-store`` the demo model is built into a temporary store first; ``--random-model
medium|large`` publishes a bigger random-weight model instead (speed only). Each server's torch
threads default to one core less than the machine has: a Python server's event loop needs the
other one (with every core given to torch, intra-op threads and the front end fight, and both
sides got several times slower on the 2-core machine this was written on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# Run as a script, Python puts benchmarks/ first on sys.path, where benchmarks/kernels.py would shadow
# the `kernels` package: put the repository root there instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
sys.path.insert(0, str(REPO_ROOT))

from loadtest.replay import ReplayConfig, replay_async  # noqa: E402
from loadtest.report import latency_summary_ms  # noqa: E402
from loadtest.targets import HttpTarget, parse_target  # noqa: E402
from loadtest.trace import TraceRecord  # noqa: E402

CPU_BUDGET_MS = 100.0
GPU_BUDGET_MS = 30.0
NUM_ITEMS = 10


def log(message: str) -> None:
    print(f"[serving-bench] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# What both systems serve: the model's shape and its catalogue (written to JSON for the HF server)
# ------------------------------------------------------------------------------------------------


def load_spec(store: Path, name: str | None) -> dict[str, Any]:
    """Model config, catalogue (external ids and code paths) and version of the newest valid model."""
    from onerec.bundle import load_newest_bundle

    bundle, _ = load_newest_bundle(store, name)
    codes = bundle.catalog.trie.tensors.item_codes.tolist()
    return {
        "name": bundle.name,
        "version": bundle.version,
        "model_config": bundle.config.to_dict(),
        "item_ids": list(bundle.catalog.item_ids),
        "codes": codes,
        "live": [bool(x) for x in bundle.catalog.trie.tensors.item_live.tolist()],
        "parameters": int(sum(p.numel() for p in bundle.model.parameters())),
    }


# ------------------------------------------------------------------------------------------------
# The usual alternative: HF T5 + generate(prefix_allowed_tokens_fn=trie)
# ------------------------------------------------------------------------------------------------

PAD, EOS = 0, 1  # T5's decoder start token is PAD


class HFRecommender:
    """A T5 encoder-decoder over semantic-ID tokens, decoded by ``generate`` under the trie.

    Vocabulary: 0 pad / decoder start, 1 eos (never allowed), then level 0 codes, level 1 codes, ...
    The encoder reads one position per history item (the sum of its code embeddings, newest first)
    after a user position, exactly as OneRec's encoder does, through ``inputs_embeds``.
    """

    def __init__(self, spec: dict[str, Any], device: str = "cpu", seed: int = 0) -> None:
        import torch
        from transformers import T5Config, T5ForConditionalGeneration

        cfg = spec["model_config"]
        self.torch = torch
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.level_sizes: list[int] = list(cfg["level_sizes"])
        self.depth = len(self.level_sizes)
        self.session_items = int(cfg["session_items"])
        self.max_history = int(cfg["max_history"])
        self.user_buckets = int(cfg["user_buckets"])
        self.level_offset = [2 + sum(self.level_sizes[:level]) for level in range(self.depth)]
        t5_kwargs: dict[str, Any] = {
            "vocab_size": 2 + sum(self.level_sizes),
            "d_model": cfg["d_model"],
            "d_kv": cfg["d_model"] // cfg["n_heads"],
            "d_ff": cfg["d_ff"],
            "num_layers": cfg["n_encoder_layers"],
            "num_decoder_layers": cfg["n_decoder_layers"],
            "num_heads": cfg["n_heads"],
            "feed_forward_proj": "gated-gelu",
            "dropout_rate": 0.0,
            "pad_token_id": PAD,
            "eos_token_id": EOS,
            "decoder_start_token_id": PAD,
            "tie_word_embeddings": False,
        }
        self.t5_config = T5Config(**t5_kwargs)
        torch.manual_seed(seed)
        self.model = T5ForConditionalGeneration(self.t5_config).eval().to(self.device, self.dtype)
        self.user_embedding = torch.nn.Embedding(self.user_buckets, cfg["d_model"]).to(self.device, self.dtype)
        self.item_ids: list[str] = list(spec["item_ids"])
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        live = spec.get("live") or [True] * len(self.item_ids)
        self._build_trie(spec["codes"], live)

    def _build_trie(self, codes: Sequence[Sequence[int]], live: Sequence[bool]) -> None:
        """Prefix (tuple of tokens) -> allowed child tokens, live items under every prefix, leaf -> item."""
        self.item_tokens: list[tuple[int, ...]] = [
            tuple(self.level_offset[level] + int(c) for level, c in enumerate(path)) for path in codes
        ]
        children: dict[tuple[int, ...], set[int]] = {}
        self.live_count: Counter[tuple[int, ...]] = Counter()
        self.item_of: dict[tuple[int, ...], int] = {}
        for item, tokens in enumerate(self.item_tokens):
            if not live[item]:
                continue
            self.item_of[tokens] = item
            for level in range(self.depth):
                children.setdefault(tokens[:level], set()).add(tokens[level])
                self.live_count[tokens[: level + 1]] += 1
        self.children = {prefix: sorted(tokens) for prefix, tokens in children.items()}
        codes_tensor = self.torch.tensor([list(t) for t in self.item_tokens], dtype=self.torch.int64)
        self.item_token_tensor = codes_tensor.to(self.device)

    def _prefix_fn(self, banned: set[int]) -> Any:
        """The ``prefix_allowed_tokens_fn`` of one request: the trie minus banned and already chosen items."""
        depth, children, live_count, item_of = self.depth, self.children, self.live_count, self.item_of
        banned_prefixes: Counter[tuple[int, ...]] = Counter(
            tokens[: level + 1] for item in banned for tokens in (self.item_tokens[item],) for level in range(depth)
        )

        def allowed(batch_id: int, input_ids: Any) -> list[int]:
            seq = input_ids.tolist()[1:]  # drop the decoder start token
            start = len(seq) - len(seq) % depth
            prefix = tuple(seq[start:])
            chosen = [item_of.get(tuple(seq[i : i + depth]), -1) for i in range(0, start, depth)]
            session_prefixes: Counter[tuple[int, ...]] = Counter(
                self.item_tokens[item][: level + 1]
                for item in chosen
                if item >= 0 and item not in banned
                for level in range(depth)
            )
            options = children.get(prefix, [])
            if (prefix or not banned_prefixes) and prefix not in banned_prefixes and prefix not in session_prefixes:
                return options
            kept = [
                tok
                for tok in options
                if live_count[prefix + (tok,)]
                - banned_prefixes.get(prefix + (tok,), 0)
                - session_prefixes.get(prefix + (tok,), 0)
                > 0
            ]
            return kept or options  # HF raises on an empty list; such a beam is dropped when collected

        return allowed

    def _encoder_embeds(self, history: list[int], user_id: str) -> tuple[Any, Any]:
        from onerec.model import hash_user

        torch = self.torch
        hist = history[-self.max_history :][::-1]  # newest first
        shared = self.model.shared.weight
        user = self.user_embedding.weight[hash_user(user_id, self.user_buckets)][None]
        if hist:
            tokens = self.item_token_tensor[torch.tensor(hist, device=self.device)]  # (S, D)
            items = shared[tokens].sum(dim=1)  # (S, d)
            embeds = torch.cat([user, items], dim=0)[None]
        else:
            embeds = user[None]
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.int64, device=self.device)

    def recommend(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer one request in the service's JSON shape."""
        mode = body.get("mode") or "session"
        beams = int(body.get("beam_width") or 32)
        num_items = int(body.get("num_items") or NUM_ITEMS)
        history = [i for i in (self.index.get(str(x)) for x in body.get("history") or []) if i is not None]
        banned = set(history) | {
            i for i in (self.index.get(str(x)) for x in body.get("exclude") or []) if i is not None
        }
        slots = 1 if mode == "items" else self.session_items
        beams = max(beams, num_items) if mode == "items" else max(beams, -(-num_items // slots))
        returns = beams  # every beam comes back (free in HF's beam search): collected until num_items
        embeds, mask = self._encoder_embeds(history, str(body.get("user_id", "")))
        with self.torch.no_grad():
            out = self.model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                num_beams=beams,
                num_return_sequences=returns,
                max_new_tokens=slots * self.depth,
                do_sample=False,
                length_penalty=0.0,
                early_stopping=True,
                prefix_allowed_tokens_fn=self._prefix_fn(banned),
                return_dict_in_generate=True,
                output_scores=False,
            )
        return self._collect(out, slots, num_items, banned)

    def _collect(self, out: Any, slots: int, num_items: int, banned: set[int]) -> dict[str, Any]:
        sequences = out.sequences[:, 1:].tolist()
        scores = out.sequences_scores.tolist() if out.sequences_scores is not None else [0.0] * len(sequences)
        items: list[dict[str, Any]] = []
        seen: set[int] = set()
        for seq, score in zip(sequences, scores, strict=True):
            for slot in range(slots):
                item = self.item_of.get(tuple(seq[slot * self.depth : (slot + 1) * self.depth]), -1)
                if item < 0 or item in banned or item in seen:
                    continue
                seen.add(item)
                semantic_id = [tok - self.level_offset[level] for level, tok in enumerate(self.item_tokens[item])]
                items.append({"item_id": self.item_ids[item], "score": float(score), "semantic_id": semantic_id})
                if len(items) == num_items:
                    break
            if len(items) == num_items:
                break
        return {
            "request_id": uuid.uuid4().hex,
            "model": {"name": "hf-t5-random", "version": "0"},
            "items": items,
            "degraded": False,
        }


def hf_request_model() -> Any:
    """The request body of the alternative's server: the fields and limits of the service's own."""
    from pydantic import BaseModel, Field

    class RecommendBody(BaseModel):
        user_id: str = Field(min_length=1)
        history: list[str] | None = None
        num_items: int = Field(NUM_ITEMS, ge=1, le=100)
        mode: str = Field("session", pattern="^(session|items)$")
        beam_width: int = Field(32, ge=1, le=512)
        exclude: list[str] | None = None
        timeout_ms: int | None = None

    return RecommendBody


def serve_hf(spec_path: Path, port: int, device: str, threads: int) -> None:
    """The alternative's server: FastAPI + uvicorn, one ``generate`` at a time (how it is usually served).

    ``generate`` runs on one dedicated worker thread (a one-thread executor), so the event loop keeps
    accepting and parsing requests while it computes, and torch always runs on the same thread (its
    intra-op thread pool is per calling thread: a rotating thread pool would spawn a pool per thread).
    """
    import asyncio as aio
    from concurrent.futures import ThreadPoolExecutor

    import torch
    import uvicorn
    from fastapi import FastAPI

    torch.set_num_threads(threads)
    RecommendBody = hf_request_model()
    recommender = HFRecommender(json.loads(spec_path.read_text()), device=device)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")
    app = FastAPI(title="hf-t5 baseline")

    async def recommend(body: Any) -> dict[str, Any]:
        return await aio.get_running_loop().run_in_executor(worker, recommender.recommend, body.model_dump())

    # Annotated by hand: a string annotation (PEP 563) naming a local class cannot be resolved.
    recommend.__annotations__ = {"body": RecommendBody, "return": dict[str, Any]}
    app.post("/v1/recommend")(recommend)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    warm = {"user_id": "warmup", "history": recommender.item_ids[:3], "mode": "items", "beam_width": 8}
    worker.submit(recommender.recommend, warm).result()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server subprocess with a log file, a readiness poll and a bounded stop."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], ready_url: str, log_dir: Path) -> None:
        self.name, self.cmd, self.env, self.ready_url = name, cmd, env, ready_url
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        import httpx

        handle = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=str(REPO_ROOT),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.ready_url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout_s}s: {self.tail()}")

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def onerec_server(
    store: Path,
    name: str | None,
    device: str,
    threads: int,
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
) -> tuple[ServerProcess, str]:
    """``onerec serve`` on free ports, embedded feature store, no version polling; returns (server, url)."""
    http_port, grpc_port = free_port(), free_port()
    env = thread_env(threads)
    env.update(
        {
            "ONEREC_TORCH_THREADS": str(threads),
            "ONEREC_DEVICE": device,
            "ONEREC_POLL_INTERVAL_S": "0",
            "ONEREC_LOG_LEVEL": "WARNING",
            "ONEREC_HTTP_HOST": "127.0.0.1",
            "ONEREC_GRPC_HOST": "127.0.0.1",
        }
    )
    if name:
        env["ONEREC_MODEL_NAME"] = name
    env.update(extra_env or {})
    cmd = [
        sys.executable,
        "-c",
        "import sys; from onerec.cli import main; sys.exit(main())",
        "serve",
        "--model-store",
        str(store),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
    ]
    url = f"http://127.0.0.1:{http_port}"
    return ServerProcess("onerec", cmd, env, f"{url}/readyz", log_dir), url


def hf_server(spec_path: Path, device: str, threads: int, log_dir: Path) -> tuple[ServerProcess, str]:
    port = free_port()
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--serve-hf",
        str(spec_path),
        "--port",
        str(port),
        "--device",
        device,
        "--threads",
        str(threads),
    ]
    url = f"http://127.0.0.1:{port}"
    return ServerProcess("hf", cmd, thread_env(threads), f"{url}/healthz", log_dir), url


# ------------------------------------------------------------------------------------------------
# Workload and measurement
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    mode: str
    beam_width: int
    device: str = "cpu"

    @property
    def key(self) -> str:
        return f"{self.device}/{self.mode}/beam{self.beam_width}"


def make_records(
    spec: dict[str, Any], row: Row, history_length: int, users: int = 200, seed: int = 0
) -> list[TraceRecord]:
    """One request per user, each with exactly ``history_length`` distinct catalogue items as history."""
    rng = random.Random(seed)
    live = [item for item, ok in zip(spec["item_ids"], spec["live"], strict=True) if ok]
    return [
        TraceRecord(
            t=0.0,
            user_id=f"bench-u{u}",
            history=tuple(rng.sample(live, history_length)),
            num_items=NUM_ITEMS,
            mode=row.mode,
            beam_width=row.beam_width,
        )
        for u in range(users)
    ]


async def single_latency(url: str, records: Sequence[TraceRecord], count: int, max_seconds: float) -> dict[str, Any]:
    """Sequential requests (one at a time, closed loop on purpose): the latency of a lone request."""
    target = HttpTarget(parse_target(url))
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    deadline = time.perf_counter() + max_seconds
    try:
        for i in range(count):
            if time.perf_counter() > deadline and len(latencies) >= 3:
                break
            start = time.perf_counter()
            status, ok = await asyncio.wait_for(target.send(records[i % len(records)]), timeout=60)
            statuses[status] += 1
            if ok:
                latencies.append(time.perf_counter() - start)
    finally:
        await target.close()
    summary = latency_summary_ms(latencies)
    summary["statuses"] = dict(statuses)
    return summary


@dataclass
class SweepSettings:
    budget_ms: float
    step_seconds: float = 5.0
    min_requests: int = 40
    max_step_seconds: float = 10.0
    growth: float = 1.6
    max_steps: int = 8
    refine_steps: int = 2
    max_inflight: int = 512
    time_limit_s: float = 75.0
    down_steps: int = 3
    min_rate: float = 0.2
    single_rate_hint: float = 1.0  # 1 / single-request latency, set per row
    saturation_doublings: int = 5  # extra saturation steps, each offering twice the last, while it keeps up
    confirm_failures: bool = True
    server_pid: int | None = None


class CpuMonitor:
    """CPU used during a step, in cores: the whole machine, the server process, this client, and the rest.

    The machine is shared; "other" (busy time no benchmark process accounts for) tells a reader
    whether a step was disturbed by something else running.
    """

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        busy = 0.0
        try:
            with open("/proc/stat", encoding="ascii") as handle:
                fields = [float(x) for x in handle.readline().split()[1:]]
            busy = (sum(fields) - fields[3] - fields[4]) / self.TICK  # minus idle and iowait
        except (OSError, ValueError, IndexError):
            pass
        server = 0.0
        if self.server_pid:
            try:
                with open(f"/proc/{self.server_pid}/stat", encoding="ascii") as handle:
                    parts = handle.read().rsplit(")", 1)[1].split()
                server = (float(parts[11]) + float(parts[12])) / self.TICK  # utime + stime
            except (OSError, ValueError, IndexError):
                pass
        times = os.times()
        return time.monotonic(), busy, server, times.user + times.system

    def cores(self) -> dict[str, float]:
        end = self._read()
        wall = max(1e-9, end[0] - self.start[0])
        machine, server, client = ((end[i] - self.start[i]) / wall for i in (1, 2, 3))
        return {
            "machine": round(machine, 2),
            "server": round(server, 2),
            "client": round(client, 2),
            "other": round(max(0.0, machine - server - client), 2),
        }


async def run_step(
    url: str, records: Sequence[TraceRecord], rate: float, settings: SweepSettings, timeout_s: float | None = None
) -> dict[str, Any]:
    """One open-loop replay at a fixed rate; passes when there are no errors and p99 is within budget."""
    duration = min(settings.max_step_seconds, max(settings.step_seconds, settings.min_requests / rate))
    config = ReplayConfig(
        target=url,
        rate=rate,
        duration=duration,
        max_inflight=settings.max_inflight,
        timeout_s=timeout_s or max(5.0, 20 * settings.budget_ms / 1000.0),
    )
    monitor = CpuMonitor(settings.server_pid)
    result = await replay_async(records, config)
    cpu = monitor.cores()
    report = result.report
    lat = report["latency_ms"]
    passed = report["requests"]["errors"] == 0 and lat["p99"] is not None and lat["p99"] <= settings.budget_ms
    await asyncio.sleep(0.5)  # let the server drain before the next step
    return {
        "offered_rps": round(rate, 3),
        "achieved_rps": report["throughput_rps"]["achieved_ok"],
        "requests": report["requests"]["scheduled"],
        "p50_ms": lat["p50"],
        "p90_ms": lat["p90"],
        "p99_ms": lat["p99"],
        "p99.9_ms": lat["p99.9"],
        "max_ms": lat["max"],
        "errors": report["errors_by_status"],
        "late_share": report["late"]["share"],
        "cpu_cores": cpu,
        "pass": passed,
    }


async def sweep(url: str, records: Sequence[TraceRecord], first_rate: float, settings: SweepSettings) -> dict[str, Any]:
    """Find the highest rate that passes, then measure the saturated throughput.

    Rates rise geometrically from ``first_rate`` until a step fails (or fall from it until one passes),
    then bisect between the last pass and the first fail. A last step offers 1.5x the highest rate
    tried (doubled while the server keeps up with the offer): what the server completes there is its
    throughput when saturated (budget ignored).
    """
    started = time.perf_counter()
    curve: list[dict[str, Any]] = []

    async def step_at(rate: float, confirm: bool = True, timeout_s: float | None = None) -> dict[str, Any]:
        step = await run_step(url, records, rate, settings, timeout_s)
        log(
            f"  {url} rate {rate:8.2f} rps: p99 {step['p99_ms']} ms achieved {step['achieved_rps']} "
            f"errors {step['errors']} late {step['late_share']:.1%} cpu {step['cpu_cores']} "
            f"{'PASS' if step['pass'] else 'FAIL'}"
        )
        if not step["pass"] and confirm and settings.confirm_failures:
            # The machine is shared: a failure is believed only if a second run at that rate fails too.
            step["confirmed_by_retry"] = False
            retry = await step_at(rate, confirm=False, timeout_s=timeout_s)
            if retry["pass"]:
                curve.remove(retry)
                retry["passed_on_retry"] = True
                retry["first_try"] = {k: step[k] for k in ("p99_ms", "errors", "cpu_cores")}
                step = retry
            else:
                step["confirmed_by_retry"] = True
        if step not in curve:
            curve.append(step)
        return step

    def out_of_time() -> bool:
        return time.perf_counter() - started > settings.time_limit_s

    best_pass: dict[str, Any] | None = None
    first_fail: dict[str, Any] | None = None
    rate = first_rate
    for _ in range(settings.max_steps if first_rate > 0 else 0):
        step = await step_at(rate)
        if not step["pass"]:
            first_fail = step
            break
        best_pass = step
        rate *= settings.growth
        if out_of_time():
            break
    for _ in range(settings.down_steps if best_pass is None else 0):
        rate /= settings.growth**2
        if rate < settings.min_rate or out_of_time():
            break
        step = await step_at(rate)
        if step["pass"]:
            best_pass = step
            break
        first_fail = step
    if first_fail is not None and best_pass is not None:
        low, high = best_pass["offered_rps"], first_fail["offered_rps"]
        for _ in range(settings.refine_steps):
            if out_of_time():
                break
            mid = math.sqrt(low * high)
            step = await step_at(mid)
            if step["pass"]:
                best_pass, low = step, mid
            else:
                high = mid
    # Above every rate tried (not above the last failure: when nothing passes, the search walked
    # down, and 1.5x its lowest rate would "saturate" the server at a trickle).
    if curve:
        saturation_rate = 1.5 * max(s["offered_rps"] for s in curve)
    else:  # no sweep (a lone request misses the budget): 1.5x what one at a time serves
        saturation_rate = 1.5 * settings.single_rate_hint
    # A batching server completes what it is offered far above its one-at-a-time rate: double the
    # offer until the server falls behind it, so the figure is its capacity, not the offer.
    for _ in range(1 + settings.saturation_doublings):
        saturation = await step_at(max(settings.min_rate, saturation_rate), confirm=False, timeout_s=30.0)
        if (saturation["achieved_rps"] or 0.0) < 0.9 * saturation["offered_rps"] or out_of_time():
            break
        saturation_rate = 2 * saturation["offered_rps"]
    saturation["saturation_step"] = True
    if saturation["pass"] and (best_pass is None or saturation["offered_rps"] > best_pass["offered_rps"]):
        best_pass = saturation  # an earlier failure was noise: the higher rate also met the budget
    curve.sort(key=lambda s: s["offered_rps"])
    return {
        "sustainable_rps": best_pass["offered_rps"] if best_pass else 0.0,
        "p99_at_sustainable_ms": best_pass["p99_ms"] if best_pass else None,
        "max_achieved_rps": max((s["achieved_rps"] or 0.0) for s in curve),
        "saturated_throughput_rps": saturation["achieved_rps"],
        "curve": curve,
    }


async def measure_server(
    url: str,
    rows: Sequence[Row],
    spec: dict[str, Any],
    history_length: int,
    settings: SweepSettings,
    single_count: int,
    first_rate_floor: float,
    with_metrics: bool = False,
) -> dict[str, Any]:
    """Single-request latency and the rate sweep for every row against one running server.

    With ``with_metrics`` (our service), one more step at the sustainable rate is bracketed by two
    scrapes of /metrics, to split a request's time between queueing, model compute and the rest.
    """
    results = {}
    for row in rows:
        records = make_records(spec, row, history_length)
        await single_latency(url, records, 3, 30)  # warm this shape (allocator, caches)
        single = await single_latency(url, records, single_count, max_seconds=settings.step_seconds * 2)
        p50_s = (single["p50"] or 1000.0) / 1000.0
        first_rate = max(first_rate_floor, 0.5 / p50_s)
        if p50_s * 1000.0 > settings.budget_ms:
            # A lone request already misses the budget: no rate can pass; measure throughput only.
            first_rate = 0.0
        log(f"{row.key}: single p50 {single['p50']} ms p99 {single['p99']} ms; sweep from {first_rate:.2f} rps")
        measured: dict[str, Any] = {
            "single_request_ms": single,
            "sweep": await sweep(url, records, first_rate, replace(settings, single_rate_hint=1.0 / p50_s)),
        }
        rate = measured["sweep"]["sustainable_rps"]
        if with_metrics and rate > 0:
            measured["server_breakdown"] = await breakdown_step(url, records, rate, settings)
        results[row.key] = measured
    return results


def scrape_metrics(url: str) -> dict[str, float]:
    """Every sample of our service's /metrics summed over labels (histogram _sum and _count included)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


async def breakdown_step(
    url: str, records: Sequence[TraceRecord], rate: float, settings: SweepSettings
) -> dict[str, Any]:
    """Where a request's time goes at ``rate``: client latency vs the server's own measurements."""
    before = await asyncio.to_thread(scrape_metrics, url)
    step = await run_step(url, records, rate, settings)
    after = await asyncio.to_thread(scrape_metrics, url)
    delta = {name: after[name] - before.get(name, 0.0) for name in after}

    def mean_ms(name: str, per: str) -> float | None:
        count = delta.get(per, 0.0)
        return round(1000 * delta.get(name, 0.0) / count, 3) if count else None

    batches = delta.get("onerec_batch_size_count", 0.0)
    requests = delta.get("onerec_batch_size_sum", 0.0)
    compute = delta.get("onerec_batch_encode_seconds_sum", 0.0) + delta.get("onerec_batch_decode_seconds_sum", 0.0)
    return {
        "offered_rps": step["offered_rps"],
        "client_latency_ms": {"p50": step["p50_ms"], "p99": step["p99_ms"]},
        "server_request_mean_ms": mean_ms(
            "onerec_request_duration_seconds_sum", "onerec_request_duration_seconds_count"
        ),
        "queue_wait_mean_ms": mean_ms("onerec_queue_wait_seconds_sum", "onerec_queue_wait_seconds_count"),
        "batches": int(batches),
        "mean_batch_size": round(requests / batches, 2) if batches else None,
        "model_ms_per_batch": round(1000 * compute / batches, 3) if batches else None,
        "model_ms_per_request": round(1000 * compute / requests, 3) if requests else None,
        "note": "server_request = time inside the handler (queue wait + batch compute + feature store + "
        "response building); client latency minus it is the HTTP front end, the socket and the client",
    }


def compare(row: Row, ours: dict[str, Any], hf: dict[str, Any], depth: int, session_items: int) -> dict[str, Any]:
    """One report row: both sides and the ratios (rate: ours over theirs; latency: theirs over ours)."""
    ours_rps, hf_rps = ours["sweep"]["sustainable_rps"], hf["sweep"]["sustainable_rps"]
    ours_sat, hf_sat = ours["sweep"]["saturated_throughput_rps"], hf["sweep"]["saturated_throughput_rps"]
    rps_ratio: float | None
    if hf_rps > 0:
        rps_ratio, basis = ours_rps / hf_rps, "sustainable rate at the p99 budget, ours / alternative"
    elif ours_rps == 0:
        rps_ratio = None
        basis = "neither side met the p99 budget at any rate tried: compare saturated_throughput_ratio"
    else:
        rps_ratio = (ours_rps / hf_sat) if hf_sat else None
        basis = (
            "the alternative met the p99 budget at no rate tried; ratio of our sustainable rate to the "
            "alternative's saturated throughput (budget ignored for it)"
        )
    ours_p50, hf_p50 = ours["single_request_ms"]["p50"], hf["single_request_ms"]["p50"]
    return {
        "device": row.device,
        "mode": row.mode,
        "beam_width": row.beam_width,
        "decoder_steps": depth * (1 if row.mode == "items" else session_items),
        "num_items": NUM_ITEMS,
        "onerec": side(ours),
        "hf_generate": side(hf),
        "rps_ratio": round(rps_ratio, 3) if rps_ratio is not None else None,
        "rps_ratio_basis": basis,
        "saturated_throughput_ratio": round(ours_sat / hf_sat, 3) if ours_sat and hf_sat else None,
        "latency_ratio": round(hf_p50 / ours_p50, 3) if ours_p50 and hf_p50 else None,
        "goal_10x_rps_met": bool(rps_ratio is not None and rps_ratio >= 10.0),
    }


def side(measured: dict[str, Any]) -> dict[str, Any]:
    sweep_result = measured["sweep"]
    return {
        "sustainable_rps": sweep_result["sustainable_rps"],
        "p99_at_sustainable_ms": sweep_result["p99_at_sustainable_ms"],
        "single_p50_ms": measured["single_request_ms"]["p50"],
        "single_p99_ms": measured["single_request_ms"]["p99"],
        "saturated_throughput_rps": sweep_result["saturated_throughput_rps"],
        "curve": sweep_result["curve"],
        **({"server_breakdown": measured["server_breakdown"]} if "server_breakdown" in measured else {}),
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'device':<6} {'mode':<8} {'beam':>5} | {'ours rps':>9} {'p99 ms':>8} {'p50 1x':>8} | "
        f"{'hf rps':>8} {'p99 ms':>8} {'p50 1x':>8} | {'rps x':>7} {'lat x':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        o, h = r["onerec"], r["hf_generate"]
        lines.append(
            f"{r['device']:<6} {r['mode']:<8} {r['beam_width']:>5} | {o['sustainable_rps']:>9.1f} "
            f"{_fmt(o['p99_at_sustainable_ms']):>8} {_fmt(o['single_p50_ms']):>8} | "
            f"{h['sustainable_rps']:>8.2f} {_fmt(h['p99_at_sustainable_ms']):>8} "
            f"{_fmt(h['single_p50_ms']):>8} | {_fmt(r['rps_ratio']):>7} {_fmt(r['latency_ratio']):>7}"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# ------------------------------------------------------------------------------------------------
# Model-only comparison (no HTTP): used for the GPU row on machines without the web stack
# ------------------------------------------------------------------------------------------------


def known_indices(bundle: Any, item_ids: Sequence[str]) -> list[int]:
    """Internal indices of the catalogue items among ``item_ids`` (what the service does to a history)."""
    indices = (bundle.item_index(item) for item in item_ids)
    return [index for index in indices if index is not None]


def model_only(
    store: Path,
    name: str | None,
    device: str,
    rows: Sequence[Row],
    history_length: int,
    reps: int,
    batch: int,
) -> dict[str, Any]:
    """In-process: our Generator (alone and batched) against HF generate (one request at a time)."""
    import torch

    from onerec.bundle import load_newest_bundle
    from onerec.generate import RecRequest

    bundle, _ = load_newest_bundle(store, name, device=device)
    spec = load_spec(store, name)
    hf = HFRecommender(spec, device=device)
    out_rows = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for row in rows:
        records = make_records(spec, row, history_length, users=max(batch, reps))
        requests = [
            RecRequest(
                history=known_indices(bundle, r.history or ()),
                num_items=NUM_ITEMS,
                mode=row.mode,
                beam_width=row.beam_width,
                user_id=r.user_id,
            )
            for r in records
        ]
        bodies = [r.request_body() for r in records]

        def timed(fn: Any, n: int) -> list[float]:
            fn(0)
            fn(1)
            times = []
            for i in range(n):
                sync()
                start = time.perf_counter()
                fn(i)
                sync()
                times.append(time.perf_counter() - start)
            return times

        ours_single = timed(lambda i, rs=requests: bundle.generator.generate([rs[i % len(rs)]]), reps)
        ours_batch = timed(lambda i, rs=requests: bundle.generator.generate(rs[:batch]), max(3, reps // 4))
        hf_single = timed(lambda i, bs=bodies: hf.recommend(bs[i % len(bs)]), max(3, reps // 2))
        ours_p50 = latency_summary_ms(ours_single)["p50"]
        hf_p50 = latency_summary_ms(hf_single)["p50"]
        batch_p50 = latency_summary_ms(ours_batch)["p50"]
        ours_rps = batch / (batch_p50 / 1000.0)
        hf_rps = 1000.0 / hf_p50
        out_rows.append(
            {
                "device": device,
                "mode": row.mode,
                "beam_width": row.beam_width,
                "batch": batch,
                "onerec_single_p50_ms": ours_p50,
                "onerec_batch_p50_ms": batch_p50,
                "onerec_rps": round(ours_rps, 2),
                "hf_single_p50_ms": hf_p50,
                "hf_rps": round(hf_rps, 2),
                "rps_ratio": round(ours_rps / hf_rps, 3),
                "latency_ratio": round(hf_p50 / ours_p50, 3),
            }
        )
        log(json.dumps(out_rows[-1]))
    return {
        "benchmark": "serving-model-only",
        "device": device,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "model": {
            "name": spec["name"],
            "version": spec["version"],
            "config": spec["model_config"],
            "catalog_size": len(spec["item_ids"]),
            "parameters": spec["parameters"],
        },
        "history_length": history_length,
        "method": "in-process, no HTTP; ours: Generator.generate on 1 request and on a batch; HF: "
        "generate(num_beams, prefix_allowed_tokens_fn) one request at a time; p50 of repetitions; "
        "HF weights random",
        "rows": out_rows,
    }


# ------------------------------------------------------------------------------------------------
# Profile of one batch: where the time of a request goes, on our side and on the alternative's
# ------------------------------------------------------------------------------------------------


class Timers:
    """Wall time per named piece, collected by wrapping functions (with a device sync around each)."""

    def __init__(self, sync: Any) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self.calls: Counter[str] = Counter()

    def wrap(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] += 1

        return timed

    def table(self, divide: int) -> dict[str, Any]:
        return {
            name: {"ms": round(1000 * self.seconds[name] / divide, 3), "calls": self.calls[name] // divide}
            for name in sorted(self.seconds, key=lambda n: -self.seconds[n])
        }


def profile_batch(
    store: Path, name: str | None, device: str, row: Row, batch: int, history_length: int, reps: int
) -> dict[str, Any]:
    """Time the pieces of one batch of ``batch`` requests in-process (ours) and of one HF request."""
    import torch

    import onerec.generate as generate_module
    import onerec.model as model_module
    from onerec.bundle import load_newest_bundle
    from onerec.generate import RecRequest

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    bundle, _ = load_newest_bundle(store, name, device=device)
    spec = load_spec(store, name)
    records = make_records(spec, row, history_length, users=batch)
    requests = [
        RecRequest(history=known_indices(bundle, r.history or ()), num_items=NUM_ITEMS, mode=row.mode,
                   beam_width=row.beam_width, user_id=r.user_id)
        for r in records
    ]  # fmt: skip
    generator, model = bundle.generator, bundle.model
    generator.generate(requests)  # warm
    timers = Timers(sync)
    originals: dict[str, Any] = {
        "trie_topk": generate_module.trie_topk,
        "moe": model_module.moe,
    }
    setattr(generate_module, "trie_topk", timers.wrap("decode: trie_topk kernel", originals["trie_topk"]))  # noqa: B010
    setattr(model_module, "moe", timers.wrap("decode: moe kernel (inside decoder)", originals["moe"]))  # noqa: B010
    patched = {
        (model, "prepare_decoding"): "encode (encoder + cross K/V)",
        (model, "decode_step"): "decode: decoder layers + head (incl. moe)",
        (generator, "_request_bans"): "request bans (history, exclude)",
        (generator, "_with_session_bans"): "decode: session bans",
        (generator, "_encoder_inputs"): "encoder inputs",
        (generator, "_collect"): "collect answers",
        (generator, "generate"): "total generate()",
    }
    for (owner, attr), label in patched.items():
        setattr(owner, attr, timers.wrap(label, getattr(owner, attr)))
    try:
        for _ in range(reps):
            generator.generate(requests)
    finally:
        setattr(generate_module, "trie_topk", originals["trie_topk"])  # noqa: B010
        setattr(model_module, "moe", originals["moe"])  # noqa: B010
        for owner, attr in patched:
            delattr(owner, attr)  # back to the class attribute
    ours = timers.table(reps)

    hf = HFRecommender(spec, device=device)
    body = records[0].request_body()
    hf.recommend(body)
    hf_timers = Timers(sync)
    hf.model.forward = hf_timers.wrap("T5 forward (encoder + decoder steps)", hf.model.forward)
    original_prefix_fn = hf._prefix_fn

    def timed_prefix_fn(banned: set[int]) -> Any:
        return hf_timers.wrap("prefix_allowed_tokens_fn (Python, per beam per step)", original_prefix_fn(banned))

    hf._prefix_fn = timed_prefix_fn  # type: ignore[method-assign]
    hf.recommend = hf_timers.wrap("total generate() + collect", hf.recommend)  # type: ignore[method-assign]
    for _ in range(reps):
        hf.recommend(body)
    return {
        "device": device,
        "row": {"mode": row.mode, "beam_width": row.beam_width},
        "history_length": history_length,
        "onerec_batch": batch,
        "onerec_ms_per_batch": ours,
        "hf_ms_per_request": hf_timers.table(reps),
        "note": "wall time with a device sync around each timed piece; nested pieces are included in their "
        "parents (moe inside decoder layers, everything inside total)",
    }


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-store", type=Path, help="store holding the model (default: build the demo)")
    parser.add_argument("--model-name", help="model in the store (default: the only one)")
    parser.add_argument(
        "--random-model", choices=sorted(RANDOM_PRESETS), help="benchmark a random-weight model of this size instead"
    )
    parser.add_argument("--quick", action="store_true", help="one row, short steps: ends in about a minute")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument("--budget-ms", type=float, help="p99 budget (default 100 on CPU, 30 on GPU)")
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
        help="extra ONEREC_* setting for our service (repeatable), e.g. ONEREC_MAX_BATCH_SIZE=32",
    )  # fmt: skip
    parser.add_argument("--beams", default="32,128", help="beam widths of the rows")
    parser.add_argument("--modes", default="items,session", help="modes of the rows")
    parser.add_argument("--history-length", type=int, help="history items per request (default: model's max)")
    parser.add_argument("--device", default=None, help="model-only: cpu or cuda (default: cuda if present)")
    parser.add_argument("--model-only", action="store_true", help="in-process comparison, no HTTP")
    parser.add_argument("--batch", type=int, default=16, help="model-only: batch size of our generator")
    parser.add_argument("--reps", type=int, default=20, help="model-only: repetitions per measurement")
    parser.add_argument("--profile", action="store_true", help="time the pieces of one batch, in-process")
    parser.add_argument("--serve-hf", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# Bigger shapes than the demo, with random weights (speed only): published through onerec's own
# bundle API so the service loads them like any trained version.
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "medium": {
        "items": 20000,
        "model": {"level_sizes": [256, 256, 256], "session_items": 5, "max_history": 50, "d_model": 256,
                  "n_heads": 8, "n_encoder_layers": 4, "n_decoder_layers": 4, "d_ff": 512, "n_experts": 8,
                  "experts_top_k": 2, "user_buckets": 10000, "dropout": 0.0},
    },
    "large": {
        "items": 100000,
        "model": {"level_sizes": [1024, 1024, 1024], "session_items": 5, "max_history": 100, "d_model": 512,
                  "n_heads": 8, "n_encoder_layers": 6, "n_decoder_layers": 6, "d_ff": 1024, "n_experts": 16,
                  "experts_top_k": 2, "user_buckets": 10000, "dropout": 0.0},
    },
}  # fmt: skip


def make_random_store(root: Path, preset: str, seed: int = 0) -> Path:
    """Publish a random-weight model of a preset size with a random bijective catalogue; returns the store."""
    import numpy as np
    import torch

    from onerec.bundle import Catalog, save_bundle
    from onerec.model import ModelConfig, OneRecModel

    shape = RANDOM_PRESETS[preset]
    cfg = ModelConfig(**shape["model"])
    torch.manual_seed(seed)
    model = OneRecModel(cfg)
    rng = np.random.default_rng(seed)
    total = int(np.prod(cfg.level_sizes))
    flat = rng.choice(total, size=shape["items"], replace=False)
    codes = np.stack(np.unravel_index(flat, cfg.level_sizes), axis=1).astype(np.int64)
    item_ids = [str(i) for i in range(shape["items"])]
    catalog = Catalog.from_codes(item_ids, codes, list(cfg.level_sizes), list(range(200)))
    save_bundle(
        root,
        f"random-{preset}",
        model,
        catalog,
        {"dataset": {"kind": "random"}, "seed": seed, "note": "random weights: for speed benchmarks"},
    )
    return root


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


def run_http(args: argparse.Namespace, store: Path, workdir: Path) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    spec = load_spec(store, args.model_name)
    cfg = spec["model_config"]
    history_length = args.history_length or int(cfg["max_history"])
    live_items = sum(spec["live"])
    history_length = min(history_length, live_items // 2)
    spec_path = workdir / "hf_spec.json"
    spec_path.write_text(json.dumps(spec))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    beams = [int(b) for b in args.beams.split(",")]
    modes = args.modes.split(",")
    if args.quick:
        beams, modes, devices = beams[:1], modes[:1], ["cpu"]
    service_env = dict(item.split("=", 1) for item in args.service_env)
    all_rows = []
    for device in devices:
        budget = args.budget_ms or (GPU_BUDGET_MS if device == "cuda" else CPU_BUDGET_MS)
        settings = SweepSettings(budget_ms=budget)
        if args.quick:
            settings = SweepSettings(
                budget_ms=budget,
                step_seconds=1.5,
                min_requests=10,
                max_step_seconds=3.0,
                growth=2.0,
                max_steps=4,
                refine_steps=0,
                time_limit_s=12.0,
                confirm_failures=False,
            )
        rows = [Row(mode, beam, device) for mode in modes for beam in beams]
        single_count = 8 if args.quick else 30
        measured = {}
        for label, factory in (
            (
                "onerec",
                lambda d=device: onerec_server(store, args.model_name, d, args.onerec_threads, workdir, service_env),
            ),
            ("hf", lambda d=device: hf_server(spec_path, d, args.threads, workdir)),
        ):
            server, url = factory()
            log(f"starting {label} ({device})")
            server.start()
            try:
                measured[label] = asyncio.run(
                    measure_server(
                        url, rows, spec, history_length, replace(settings, server_pid=server.pid), single_count,
                        first_rate_floor=0.5,
                        with_metrics=label == "onerec" and not args.quick,
                    )
                )  # fmt: skip
            finally:
                server.stop()
        for row in rows:
            all_rows.append(
                compare(
                    row,
                    measured["onerec"][row.key],
                    measured["hf"][row.key],
                    len(cfg["level_sizes"]),
                    int(cfg["session_items"]),
                )
            )
    return {
        "benchmark": "serving",
        "quick": bool(args.quick),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "torch_threads": {"hf": args.threads, "onerec": args.onerec_threads},
            "service_env": service_env,
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
            "same_work": "both sides: same history (sent in each request), same beam width, same "
            "decoder steps (L per item, m*L per session, no BOS step), same trie, history excluded, "
            "no repeats within a session; both return the top num_items distinct items of the beams",
        },
        "alternative": {
            "what": "transformers T5ForConditionalGeneration.generate(num_beams=B, num_return_sequences=..., "
            "prefix_allowed_tokens_fn=trie) behind FastAPI/uvicorn, one request at a time",
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
        "budget_ms": {"cpu": args.budget_ms or CPU_BUDGET_MS, "gpu": args.budget_ms or GPU_BUDGET_MS},
        "method": "each server alone on the machine, driven by loadtest's open-loop replay at a fixed "
        "rate per step; latency from the scheduled send time; a step passes with zero errors and "
        "p99 <= budget; rates rise geometrically until a step fails, then bisect; single-request "
        "latency = p50 of sequential requests; rps_ratio = ours / alternative sustainable rate; "
        "latency_ratio = "
        "alternative single p50 / ours",
        "rows": all_rows,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_hf:
        serve_hf(args.serve_hf, args.port, args.device or "cpu", args.threads)
        return 0
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
            history = args.history_length or int(cfg["max_history"])
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
                args.history_length or int(spec_cfg["max_history"]),
                args.reps,
                args.batch,
            )
        else:
            report = run_http(args, store, workdir)
            print(table(list(report["rows"])), file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
