"""The usual alternative: a Hugging Face T5 decoding with ``generate`` under the catalogue trie, and its server.

This is how public OneRec / TIGER / MiniOneRec code serves: a ``T5ForConditionalGeneration`` of the
same depth, width, heads and FFN size as our model, decoding with ``generate(num_beams=B,
num_return_sequences=..., prefix_allowed_tokens_fn=trie)``, behind the same FastAPI request and
response shape as the service. Its weights are random: the serving benchmark compares speed, not
quality. The server runs one request at a time (``--max-batch 1``) or as a static-batching server
(``StaticBatcher``, ``take_batch``).

The serving benchmark starts it as a subprocess (``benchmarks.servers.start_hf``)::

    python -m benchmarks.hf_baseline --spec SPEC.json --port PORT [--device cpu] [--threads N]
                                     [--max-batch 1] [--max-rows 2048]

where SPEC.json is ``benchmarks.workload.load_spec`` of the model store, written by the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.workload import NUM_ITEMS

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
        driver = asyncio.create_task(batcher.run())
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, required=True, help="the model's shape and catalogue (load_spec JSON)")
    parser.add_argument("--port", type=int, required=True, help="HTTP port on 127.0.0.1")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--max-batch", type=int, default=1, help="most requests per generate() call (1: no batching)")
    parser.add_argument("--max-rows", type=int, default=2048, help="most decoder rows (requests x beams) per call")
    args = parser.parse_args(argv)
    serve_hf(args.spec, args.port, args.device, args.threads, args.max_batch, args.max_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
