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
by ``service.launcher.start_service`` (``python -m service serve``): the front-end process spawns
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

    python benchmarks/serving.py [--model-store STORE] [--quick] [--out REPORT.json]
    python benchmarks/serving.py --service-env ONEREC_ENGINES=2 --servers onerec,hf,hf_batched
    python benchmarks/serving.py --model-only [--device cuda]    # in-process, no HTTP (GPU row)
    python benchmarks/serving.py --profile [--batch 16]          # where one batch's time goes

Without ``--model-store`` the demo model is built into a temporary store first; ``--random-model
medium|large`` publishes a bigger random-weight model instead (speed only). Each server's torch
threads default to one core less than the machine has (ours: per engine): a Python server's event
loop needs the other one (with every core given to torch, intra-op threads and the front end fight,
and both sides got several times slower on the 2-core machine this was written on).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

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

CPU_BUDGET_MS = 100.0  # items mode (and any mode given --budget-ms); session mode: below
CPU_SESSION_BUDGET_MS = 500.0  # a session is m x L decoder steps (20 for the demo) against L for items
GPU_BUDGET_MS = 30.0
GOAL_VS_HF = 10.0  # issue 9's goals: sustainable rps >= 10x HF one at a time ...
GOAL_VS_HF_BATCHED = 3.0  # ... and >= 3x HF batched
GOAL_CORES = 1.6  # ... and more than 1.6 of the 2 cores used at saturation
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


def effective_beams(mode: str, beam_width: int, num_items: int, session_items: int) -> int:
    """The beam width ``generate`` runs with: enough beams to fill ``num_items`` (as the service does)."""
    if mode == "items":
        return max(beam_width, num_items)
    return max(beam_width, -(-num_items // session_items))


Waiting = TypeVar("Waiting")


def take_batch(
    waiting: Sequence[Waiting],
    key: Callable[[Waiting], Hashable],
    rows: Callable[[Waiting], int],
    max_requests: int,
    max_rows: int,
) -> tuple[list[Waiting], list[Waiting]]:
    """The next batch of a static-batching server, and what keeps waiting (both in arrival order).

    The batch is the group of the oldest waiting request (same ``key``: mode and beam width), in
    arrival order, up to ``max_requests`` requests and ``max_rows`` decoder rows (requests x beams).
    The oldest request always goes, even alone over ``max_rows``, so nothing waits forever; a request
    of its group that would pass the row budget stays for the next batch, and so do the later ones
    of that group (no overtaking within a group).
    """
    if not waiting:
        return [], []
    group = key(waiting[0])
    batch: list[Waiting] = []
    rest: list[Waiting] = []
    used = 0
    full = False
    for item in waiting:
        if full or key(item) != group:
            rest.append(item)
            continue
        if batch and (len(batch) >= max_requests or used + rows(item) > max_rows):
            full = True
            rest.append(item)
            continue
        batch.append(item)
        used += rows(item)
    return batch, rest


@dataclass(frozen=True)
class PreparedRequest:
    """One request as ``generate`` sees it (``embeds``: its encoder input, (positions, d_model))."""

    mode: str
    beams: int
    slots: int
    num_items: int
    banned: frozenset[int]
    embeds: Any


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
        self.history_window = int(cfg["history_window"])
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

    def _encoder_embeds(self, history: list[int], user_id: str) -> Any:
        """The encoder input of one request, (1 + history, d): the user position, then items newest first."""
        from onerec.model import hash_user

        torch = self.torch
        hist = history[-self.history_window :][::-1]  # newest first
        shared = self.model.shared.weight
        user = self.user_embedding.weight[hash_user(user_id, self.user_buckets)][None]
        if not hist:
            return user
        tokens = self.item_token_tensor[torch.tensor(hist, device=self.device)]  # (S, D)
        items = shared[tokens].sum(dim=1)  # (S, d)
        return torch.cat([user, items], dim=0)

    def prepare(self, body: dict[str, Any]) -> PreparedRequest:
        """What ``generate`` needs of one request: its shape (mode, beams), bans and encoder input."""
        mode = body.get("mode") or "session"
        beams = int(body.get("beam_width") or 32)
        num_items = int(body.get("num_items") or NUM_ITEMS)
        history = [i for i in (self.index.get(str(x)) for x in body.get("history") or []) if i is not None]
        banned = set(history) | {
            i for i in (self.index.get(str(x)) for x in body.get("exclude") or []) if i is not None
        }
        slots = 1 if mode == "items" else self.session_items
        embeds = self._encoder_embeds(history, str(body.get("user_id", "")))
        return PreparedRequest(
            mode=mode,
            beams=effective_beams(mode, beams, num_items, self.session_items),
            slots=slots,
            num_items=num_items,
            banned=frozenset(banned),
            embeds=embeds,
        )

    def recommend(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer one request in the service's JSON shape (a batch of one: no padding)."""
        return self.recommend_batch([body])[0]

    def recommend_batch(self, bodies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answer requests that share mode and (effective) beam width with one ``generate`` call.

        The encoder inputs are right-padded to the longest history and masked (T5's relative position
        bias does not see the padding); ``prefix_allowed_tokens_fn`` dispatches on ``batch_id`` to
        each request's own trie view (its history and ``exclude`` banned).
        """
        torch = self.torch
        prepared = [self.prepare(body) for body in bodies]
        keys = {(p.mode, p.beams) for p in prepared}
        if len(keys) != 1:
            raise ValueError(f"a batch must share mode and beam width, got {sorted(keys)}")
        first = prepared[0]
        longest = max(p.embeds.shape[0] for p in prepared)
        embeds = torch.zeros((len(prepared), longest, first.embeds.shape[1]), dtype=self.dtype, device=self.device)
        mask = torch.zeros((len(prepared), longest), dtype=torch.int64, device=self.device)
        for row, p in enumerate(prepared):
            embeds[row, : p.embeds.shape[0]] = p.embeds
            mask[row, : p.embeds.shape[0]] = 1
        row_fns = [self._prefix_fn(set(p.banned)) for p in prepared]

        def allowed(batch_id: int, input_ids: Any) -> list[int]:
            return row_fns[batch_id](batch_id, input_ids)

        returns = first.beams  # every beam comes back (free in HF's beam search): collected until num_items
        with torch.no_grad():
            out = self.model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                num_beams=first.beams,
                num_return_sequences=returns,
                max_new_tokens=first.slots * self.depth,
                do_sample=False,
                length_penalty=0.0,
                early_stopping=True,
                prefix_allowed_tokens_fn=allowed,
                return_dict_in_generate=True,
                output_scores=False,
            )
        sequences = out.sequences[:, 1:].tolist()
        scores = out.sequences_scores.tolist() if out.sequences_scores is not None else [0.0] * len(sequences)
        return [
            self._collect(
                sequences[row * returns : (row + 1) * returns],
                scores[row * returns : (row + 1) * returns],
                p.slots,
                p.num_items,
                set(p.banned),
            )
            for row, p in enumerate(prepared)
        ]

    def _collect(
        self, sequences: list[list[int]], scores: list[float], slots: int, num_items: int, banned: set[int]
    ) -> dict[str, Any]:
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


class StaticBatcher:
    """The batched alternative's queue: requests wait while a ``generate`` runs; each next call takes a
    batch (``take_batch``) and runs it on one worker thread. ``run_batch(bodies)`` answers a batch in
    order; ``shape(body)`` is its (mode, effective beam width)."""

    def __init__(
        self,
        run_batch: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
        shape: Callable[[dict[str, Any]], tuple[str, int]],
        max_batch: int,
        max_rows: int,
        executor: Any,
    ) -> None:
        self.run_batch, self.shape, self.executor = run_batch, shape, executor
        self.max_batch, self.max_rows = max_batch, max_rows
        self.waiting: list[tuple[dict[str, Any], tuple[str, int], asyncio.Future[dict[str, Any]]]] = []
        self.wake = asyncio.Event()
        self.batch_sizes: Counter[int] = Counter()

    async def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting.append((body, self.shape(body), future))
        self.wake.set()
        return await future

    async def run(self) -> None:
        """Forever: wait for a request, run the next batch, answer each of its requests."""
        loop = asyncio.get_running_loop()
        while True:
            while not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            batch, rest = take_batch(self.waiting, lambda w: w[1], lambda w: w[1][1], self.max_batch, self.max_rows)
            self.waiting[:] = rest
            self.batch_sizes[len(batch)] += 1
            try:
                answers = await loop.run_in_executor(self.executor, self.run_batch, [w[0] for w in batch])
            except Exception as exc:  # noqa: BLE001 - every request of the batch learns why
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)


def serve_hf(spec_path: Path, port: int, device: str, threads: int, max_batch: int = 1, max_rows: int = 2048) -> None:
    """The alternative's server: FastAPI + uvicorn in front of HF ``generate``.

    With ``max_batch`` 1 it serves one request at a time (how it is usually served). Above 1 it is a
    static-batching server: while one ``generate`` runs, requests queue; the next call takes the
    oldest request's group (same mode and beam width, see ``take_batch``), up to ``max_batch``
    requests and ``max_rows`` decoder rows, pads their encoder inputs and decodes them together,
    each batch row under its own ``prefix_allowed_tokens_fn``. No wait for a batch to fill: a
    lone request starts at once (as our service does).

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

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        driver = aio.create_task(batcher.run())
        yield
        driver.cancel()

    title = "hf-t5 baseline" + (f" (batched, up to {max_batch})" if max_batch > 1 else "")
    app = FastAPI(title=title, lifespan=lifespan)

    def shape(body: dict[str, Any]) -> tuple[str, int]:
        mode = body.get("mode") or "session"
        beams = effective_beams(
            mode, int(body.get("beam_width") or 32), int(body.get("num_items") or NUM_ITEMS), recommender.session_items
        )
        return mode, beams

    batcher = StaticBatcher(recommender.recommend_batch, shape, max_batch, max_rows, worker)

    async def recommend(body: Any) -> dict[str, Any]:
        return await batcher.submit(body.model_dump())

    # Annotated by hand: a string annotation (PEP 563) naming a local class cannot be resolved.
    recommend.__annotations__ = {"body": RecommendBody, "return": dict[str, Any]}
    app.post("/v1/recommend")(recommend)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        """Batches run so far, by size (the report's mean batch of the batched alternative)."""
        sizes = sorted(batcher.batch_sizes.items())
        return {"batch_sizes": {str(k): v for k, v in sizes}, "waiting": len(batcher.waiting)}

    warm = {"user_id": "warmup", "history": recommender.item_ids[:3], "mode": "items", "beam_width": 8}
    worker.submit(recommender.recommend_batch, [warm, warm]).result()
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

    def start(self, timeout_s: float = 300.0) -> None:
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

    @property
    def url(self) -> str:
        return self.ready_url.rsplit("/", 1)[0]

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


class OnerecServer:
    """Our service, started by ``service.launcher.start_service`` (what the tests start): ``onerec serve``
    as a subprocess on free ports, whose front end spawns and supervises the engine processes."""

    name = "onerec"

    def __init__(self, store: Path, env: dict[str, str], log_dir: Path, ready_timeout_s: float = 300.0) -> None:
        self.store, self.env, self.log_path, self.ready_timeout_s = store, env, log_dir / "onerec.log", ready_timeout_s
        self.handle: Any = None

    def start(self) -> None:
        from service.launcher import start_service

        self.handle = start_service(self.store, self.log_path, env=self.env, ready_timeout=self.ready_timeout_s)

    @property
    def url(self) -> str:
        return str(self.handle.http_url)

    @property
    def pid(self) -> int | None:
        return int(self.handle.proc.pid) if self.handle else None

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.stop(30.0)


def onerec_env(name: str | None, device: str, threads: int, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Settings of our service in the benchmark: torch threads per engine, no version polling, quiet logs.

    The front end is one asyncio process; each engine (``ONEREC_ENGINES``, default 1) is a child
    process with ``threads`` torch threads; ``ONEREC_SCHEDULER`` (continuous by default) picks the
    engine's scheduler. Anything in ``extra_env`` (``--service-env``) overrides these.
    """
    env = thread_env(threads)
    env.update(
        {
            "ONEREC_TORCH_THREADS": str(threads),
            "ONEREC_DEVICE": device,
            "ONEREC_POLL_INTERVAL_S": "0",
            "ONEREC_LOG_LEVEL": "WARNING",
        }
    )
    if name:
        env["ONEREC_MODEL_NAME"] = name
    env.update(extra_env or {})
    return env


def hf_server(
    spec_path: Path, device: str, threads: int, log_dir: Path, max_batch: int = 1, max_rows: int = 2048
) -> tuple[ServerProcess, str]:
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
        "--hf-max-batch",
        str(max_batch),
        "--hf-max-rows",
        str(max_rows),
    ]
    url = f"http://127.0.0.1:{port}"
    name = "hf" if max_batch == 1 else "hf_batched"
    return ServerProcess(name, cmd, thread_env(threads), f"{url}/healthz", log_dir), url


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
    saturation_extra_s: float = 0.0  # the saturation steps may run this long past time_limit_s
    confirm_failures: bool = True
    server_pid: int | None = None


CLOCK_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float | None:
    """utime + stime of one process (all its threads), from ``/proc/<pid>/stat``; None when it is gone."""
    try:
        text = (proc / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
        fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
        return (float(fields[11]) + float(fields[12])) / CLOCK_TICK
    except (OSError, ValueError, IndexError):
        return None


def process_children(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Direct children of ``pid``: ``/proc/<pid>/task/<tid>/children`` of every thread (a child belongs
    to the thread that forked it, not always the main one)."""
    children: set[int] = set()
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            children.update(int(x) for x in (task / "children").read_text(encoding="ascii").split())
        except (OSError, ValueError):
            continue
    return sorted(children)


def process_role(pid: int, proc: Path = Path("/proc")) -> str:
    """``engineN`` for an engine process (``python -m service.engine.core '{"index": N, ...}'``), else
    ``child``: read from its command line."""
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "child"
    words = [a.decode(errors="replace") for a in argv if a]
    if "service.engine.core" in words:
        position = words.index("service.engine.core")
        try:
            return f"engine{int(json.loads(words[position + 1])['index'])}"
        except (IndexError, ValueError, KeyError, TypeError):
            return "engine"
    return "child"


def process_tree_cpu(root: int, proc: Path = Path("/proc")) -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) for ``root`` (role ``front_end``) and all its descendants."""
    tree: dict[int, tuple[str, float]] = {}
    todo = [(root, "front_end")]
    while todo:
        pid, role = todo.pop()
        seconds = process_cpu_seconds(pid, proc)
        if seconds is None or pid in tree:
            continue
        tree[pid] = (role, seconds)
        todo.extend((child, process_role(child, proc)) for child in process_children(pid, proc))
    return tree


def cpu_split(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], wall_s: float
) -> dict[str, float]:
    """Cores used per role between two ``process_tree_cpu`` readings ``wall_s`` apart.

    A process seen only at the end (an engine restarted mid-step) counts all its CPU time; one gone
    by the end is lost for that step (its last interval is not readable any more). Roles that repeat
    (several ``child`` processes) are summed.
    """
    wall = max(wall_s, 1e-9)
    split: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        used = seconds - before[pid][1] if pid in before else seconds
        split[role] = split.get(role, 0.0) + max(0.0, used) / wall
    return {role: round(cores, 2) for role, cores in sorted(split.items())}


class CpuMonitor:
    """CPU used during a step, in cores: the whole machine, the server (its process tree, split per
    process: front end and each engine), this client, and the rest, plus the load average.

    The machine is shared; "other" (busy time no benchmark process accounts for) tells a reader
    whether a step was disturbed by something else running.
    """

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.start = self._read()

    def _read(self) -> tuple[float, float, dict[int, tuple[str, float]], float]:
        busy = 0.0
        try:
            with open("/proc/stat", encoding="ascii") as handle:
                fields = [float(x) for x in handle.readline().split()[1:]]
            busy = (sum(fields) - fields[3] - fields[4]) / CLOCK_TICK  # minus idle and iowait
        except (OSError, ValueError, IndexError):
            pass
        tree = process_tree_cpu(self.server_pid) if self.server_pid else {}
        times = os.times()
        return time.monotonic(), busy, tree, times.user + times.system

    def cores(self) -> dict[str, Any]:
        end = self._read()
        wall = max(1e-9, end[0] - self.start[0])
        machine = (end[1] - self.start[1]) / wall
        client = (end[3] - self.start[3]) / wall
        split = cpu_split(self.start[2], end[2], wall)
        server = sum(split.values())
        return {
            "machine": round(machine, 2),
            "server": round(server, 2),
            "server_processes": split,
            "client": round(client, 2),
            "other": round(max(0.0, machine - server - client), 2),
            "loadavg_1m": round(os.getloadavg()[0], 2),
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
        if saturation["pass"] and (best_pass is None or saturation["offered_rps"] > best_pass["offered_rps"]):
            # Every offer while doubling counts, not only the last (which usually fails): a higher rate
            # that met the budget shows an earlier failure was noise or the search stopped short.
            best_pass = saturation
        over = time.perf_counter() - started > settings.time_limit_s + settings.saturation_extra_s
        if (saturation["achieved_rps"] or 0.0) < 0.9 * saturation["offered_rps"] or over:
            break
        saturation_rate = 2 * saturation["offered_rps"]
    saturation["saturation_step"] = True
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


def batch_stats(url: str) -> dict[str, int]:
    """Batches the batched alternative has run so far, by size (its /stats)."""
    import httpx

    sizes = httpx.get(f"{url}/stats", timeout=10).json()["batch_sizes"]
    return {str(k): int(v) for k, v in sizes.items()}


def batch_histogram_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """Batches run between two /stats readings: count by size, how many, and the mean size."""
    delta = {size: after[size] - before.get(size, 0) for size in after if after[size] - before.get(size, 0) > 0}
    batches = sum(delta.values())
    requests = sum(int(size) * count for size, count in delta.items())
    return {
        "by_size": dict(sorted(delta.items(), key=lambda kv: int(kv[0]))),
        "batches": batches,
        "mean_size": round(requests / batches, 2) if batches else None,
        "max_size": max((int(size) for size in delta), default=None),
    }


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
    """Where a request's time goes at ``rate``: client latency vs the server's own measurements.

    The engine reports per decode step (``onerec_batch_size``: requests in the step,
    ``onerec_batch_rows``: decoder rows, ``onerec_batch_decode_seconds``: its time), so the figures
    here are per step, not per batch as before the engine process.
    """
    before = await asyncio.to_thread(scrape_metrics, url)
    step = await run_step(url, records, rate, settings)
    after = await asyncio.to_thread(scrape_metrics, url)
    delta = {name: after[name] - before.get(name, 0.0) for name in after}

    def mean(name: str, per: str, scale: float = 1.0) -> float | None:
        count = delta.get(per, 0.0)
        return round(scale * delta.get(name, 0.0) / count, 3) if count else None

    return {
        "offered_rps": step["offered_rps"],
        "client_latency_ms": {"p50": step["p50_ms"], "p99": step["p99_ms"]},
        "cpu_cores": step["cpu_cores"],
        "server_request_mean_ms": mean(
            "onerec_request_duration_seconds_sum", "onerec_request_duration_seconds_count", 1000.0
        ),
        "queue_wait_mean_ms": mean("onerec_queue_wait_seconds_sum", "onerec_queue_wait_seconds_count", 1000.0),
        "decode_steps": int(delta.get("onerec_batch_size_count", 0.0)),
        "mean_requests_per_step": mean("onerec_batch_size_sum", "onerec_batch_size_count"),
        "mean_rows_per_step": mean("onerec_batch_rows_sum", "onerec_batch_rows_count"),
        "ms_per_step": mean("onerec_batch_decode_seconds_sum", "onerec_batch_decode_seconds_count", 1000.0),
        "encode_ms_per_joining_step": mean(
            "onerec_batch_encode_seconds_sum", "onerec_batch_encode_seconds_count", 1000.0
        ),
        "note": "server_request = time inside the front end's handler (engine queue wait + decode steps + "
        "feature store + response); client latency minus it is the HTTP front end, the socket and the client",
    }


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
        o, h = r["onerec"], r["hf_generate"]
        b = r.get("hf_batched") or {}
        vb = r.get("vs_hf_batched") or {}
        cores = (o.get("cpu_cores_at_saturation") or {}).get("server")
        lines.append(
            f"{r['mode']:<8} {r['beam_width']:>4} {_fmt(r.get('budget_ms'), 0):>6} | "
            f"{o['sustainable_rps']:>8.1f} {_fmt(o['p99_at_sustainable_ms'], 0):>6} "
            f"{_fmt(o['saturated_throughput_rps']):>6} | "
            f"{h['sustainable_rps']:>7.2f} {_fmt(h['p99_at_sustainable_ms'], 0):>6} "
            f"{_fmt(h['saturated_throughput_rps']):>5} | "
            f"{_fmt(b.get('sustainable_rps'), 2):>7} {_fmt(b.get('p99_at_sustainable_ms'), 0):>6} "
            f"{_fmt(b.get('saturated_throughput_rps')):>6} | "
            f"{_fmt(r['rps_ratio']):>6} {_fmt(r['saturated_throughput_ratio']):>6} | "
            f"{_fmt(vb.get('rps_ratio')):>6} {_fmt(vb.get('saturated_throughput_ratio')):>6} | {_fmt(cores, 2):>5}"
        )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


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
    parser.add_argument("--serve-hf", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# Bigger shapes than the demo, with random weights (speed only): published through onerec's own
# bundle API so the service loads them like any trained version.
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "medium": {
        "items": 20000,
        "model": {"level_sizes": [256, 256, 256], "session_items": 5, "history_window": 50, "d_model": 256,
                  "n_heads": 8, "n_encoder_layers": 4, "n_decoder_layers": 4, "d_ff": 512, "n_experts": 8,
                  "experts_top_k": 2, "user_buckets": 10000, "dropout": 0.0},
    },
    "large": {
        "items": 100000,
        "model": {"level_sizes": [1024, 1024, 1024], "session_items": 5, "history_window": 100, "d_model": 512,
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


SERVERS = ("onerec", "hf", "hf_batched")


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
        cpu = r["onerec"].get("cpu_cores_at_saturation")
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
            server: Any
            if label == "onerec":
                env = onerec_env(args.model_name, device, args.onerec_threads, service_env)
                server = OnerecServer(store, env, workdir)
            else:
                server, _ = hf_server(
                    spec_path, device, args.threads, workdir,
                    max_batch=1 if label == "hf" else args.hf_max_batch, max_rows=args.hf_max_rows,
                )  # fmt: skip
            log(f"starting {label} ({device})")
            server.start()
            try:
                measured[label] = asyncio.run(
                    measure_server(
                        server.url,
                        rows, spec, history_length, replace(settings, server_pid=server.pid), single_count,
                        first_rate_floor=0.5,
                        with_metrics=label == "onerec",
                        budgets=budgets,
                        with_batch_stats=label == "hf_batched",
                    )
                )  # fmt: skip
            finally:
                server.stop()
        if not {"onerec", "hf"} <= set(measured):
            continue  # a partial run (--servers): nothing to compare; the sides are in the log only
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
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
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
            "started_by": "service.launcher.start_service (python -m service serve); engines are children "
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
    if args.serve_hf:
        serve_hf(args.serve_hf, args.port, args.device or "cpu", args.threads, args.hf_max_batch, args.hf_max_rows)
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
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
