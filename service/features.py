"""Feature store: where user histories (item ids, newest last) live between requests.

One interface, two implementations:
- `EmbeddedFeatureStore` (default): a dict in this process. Good for a demo and a single replica;
  it is lost at restart and not shared between replicas.
- `RedisFeatureStore`: `redis.asyncio`, one client (connection pool) per process, every call bounded
  by a timeout of a few ms. Key layout (one key per user, a Redis list):

      onerec:hist:<user_id>   LIST of item ids (strings), oldest first / newest last,
                              trimmed with LTRIM to the model's history_window on every append.

  Reads are one LRANGE of the last `limit` entries; an append is RPUSH + LTRIM + LRANGE in one
  MULTI/EXEC pipeline (one round trip, atomic); the bulk loader pipelines DEL + RPUSH + LTRIM per
  user in chunks.

Failure policy: a store call that fails or times out raises `FeatureStoreError`; the recommend path
then answers from the request's own history or the popularity fallback and marks the answer
degraded (service/recommend.py). After a Redis failure the store is skipped for
`retry_after_s` (answers degrade at once instead of each waiting for a timeout), then tried again:
recovery needs no operator.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, TypeVar

from service.logs import get_logger
from service.metrics import ServiceMetrics

log = get_logger("features")
T = TypeVar("T")
KEY_PREFIX = "onerec:hist:"


def history_key(user_id: str) -> str:
    """Redis key of a user's history list."""
    return f"{KEY_PREFIX}{user_id}"


class FeatureStoreError(Exception):
    """A feature-store call failed; `kind` is timeout, connection, skipped or other."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class FeatureStore:
    """Interface (and shared metric plumbing) of both stores."""

    backend = "abstract"

    def __init__(self, metrics: ServiceMetrics | None) -> None:
        self.metrics = metrics
        if metrics is not None:
            metrics.init_feature_store_labels(self.backend)

    async def get_history(self, user_id: str, limit: int) -> list[str] | None:
        """The user's last `limit` item ids (newest last), or None when the user has none stored."""
        history = await self._timed("get", self._get(user_id, limit))
        if self.metrics is not None:
            (self.metrics.fs_hits if history else self.metrics.fs_misses).labels(self.backend).inc()
        return history or None

    async def append_events(self, user_id: str, items: list[str], limit: int) -> list[str]:
        """Append items (oldest first), trim to `limit`, return the stored history after it."""
        return await self._timed("append", self._append(user_id, items, limit))

    async def load_histories(self, histories: Mapping[str, list[str]], limit: int) -> int:
        """Replace the histories of many users at once (bulk load); returns the users written."""
        return await self._timed("load", self._load(histories, limit), bulk=True)

    async def ping(self) -> bool:
        """True when the store answers now (readiness reporting only; never gates serving)."""
        try:
            await self._timed("ping", self._ping())
        except FeatureStoreError:
            return False
        return True

    def describe(self) -> dict[str, Any]:
        """Static facts for /readyz and logs."""
        return {"backend": self.backend}

    async def close(self) -> None:
        """Release connections."""

    # implementation hooks --------------------------------------------------------------------------
    async def _get(self, user_id: str, limit: int) -> list[str]:
        raise NotImplementedError

    async def _append(self, user_id: str, items: list[str], limit: int) -> list[str]:
        raise NotImplementedError

    async def _load(self, histories: Mapping[str, list[str]], limit: int) -> int:
        raise NotImplementedError

    async def _ping(self) -> None:
        return None

    async def _timed(self, op: str, call: Awaitable[T], bulk: bool = False) -> T:
        started = time.perf_counter()
        try:
            return await self._guard(call, bulk)
        except FeatureStoreError as exc:
            if self.metrics is not None:
                self.metrics.fs_errors.labels(self.backend, op, exc.kind).inc()
            raise
        finally:
            if self.metrics is not None:
                self.metrics.fs_duration.labels(self.backend, op).observe(time.perf_counter() - started)

    async def _guard(self, call: Awaitable[T], bulk: bool) -> T:
        return await call


class EmbeddedFeatureStore(FeatureStore):
    """In-process store: an LRU of lists, touched only from the event loop thread.

    Bounded by ``max_users``: anyone can call /v1/events with new user ids, so the least recently
    used user is evicted (and counted) rather than letting memory grow without end.
    """

    backend = "embedded"

    def __init__(self, metrics: ServiceMetrics | None = None, max_users: int = 100_000) -> None:
        super().__init__(metrics)
        self.max_users = max_users
        self._histories: collections.OrderedDict[str, list[str]] = collections.OrderedDict()
        if metrics is not None:
            metrics.fs_evictions.labels(self.backend)

    async def _get(self, user_id: str, limit: int) -> list[str]:
        history = self._histories.get(user_id)
        if history is None:
            return []
        self._histories.move_to_end(user_id)
        return list(history[-limit:])

    async def _append(self, user_id: str, items: list[str], limit: int) -> list[str]:
        history = (self._histories.get(user_id, []) + list(items))[-limit:]
        self._put(user_id, history)
        return list(history)

    async def _load(self, histories: Mapping[str, list[str]], limit: int) -> int:
        for user_id, items in histories.items():
            self._put(user_id, list(items)[-limit:])
        return len(histories)

    def _put(self, user_id: str, history: list[str]) -> None:
        self._histories[user_id] = history
        self._histories.move_to_end(user_id)
        while len(self._histories) > self.max_users:
            self._histories.popitem(last=False)
            if self.metrics is not None:
                self.metrics.fs_evictions.labels(self.backend).inc()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "users": len(self._histories)}


class RedisFeatureStore(FeatureStore):
    """Redis lists, one client per process, per-call timeout, skip-after-failure."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        retry_after_s: float = 0.5,
        metrics: ServiceMetrics | None = None,
        bulk_timeout_s: float = 60.0,
        ttl_s: int = 0,
    ) -> None:
        super().__init__(metrics)
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.bulk_timeout_s = bulk_timeout_s
        self.ttl_s = ttl_s  # 0 = keys never expire
        self._skip_until = 0.0
        self._was_down = False
        # No client-side retries: the request path has a budget of a few ms and its own fallback.
        self.client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=max(timeout_s, 0.05),
            retry=Retry(NoBackoff(), 0),
            max_connections=64,
        )

    async def _guard(self, call: Awaitable[T], bulk: bool) -> T:
        import redis.exceptions as rexc

        if not bulk and time.monotonic() < self._skip_until:
            if asyncio.iscoroutine(call):
                call.close()  # never awaited: avoid the "coroutine was never awaited" warning
            raise FeatureStoreError("skipped", "redis marked down; skipping until the retry window ends")
        try:
            result = await asyncio.wait_for(call, self.bulk_timeout_s if bulk else self.timeout_s)
        except asyncio.TimeoutError:
            self._mark_down("timeout")
            raise FeatureStoreError("timeout", "redis call timed out") from None
        except (rexc.ConnectionError, OSError) as exc:
            self._mark_down("connection")
            raise FeatureStoreError("connection", f"redis unreachable: {exc}") from None
        except rexc.RedisError as exc:
            self._mark_down("other")
            raise FeatureStoreError("other", f"redis error: {exc}") from None
        if self._was_down:
            self._was_down = False
            log.info("feature store recovered", extra={"backend": self.backend})
        return result

    def _mark_down(self, kind: str) -> None:
        self._skip_until = time.monotonic() + self.retry_after_s
        if not self._was_down:
            log.warning("feature store failing; answering degraded", extra={"backend": self.backend, "kind": kind})
        self._was_down = True

    async def _get(self, user_id: str, limit: int) -> list[str]:
        items = await self.client.lrange(history_key(user_id), -limit, -1)
        return [str(item) for item in items]

    async def _append(self, user_id: str, items: list[str], limit: int) -> list[str]:
        key = history_key(user_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *items)
            pipe.ltrim(key, -limit, -1)
            if self.ttl_s:
                pipe.expire(key, self.ttl_s)
            pipe.lrange(key, 0, -1)
            results = await pipe.execute()
        return list(results[-1])

    async def _load(self, histories: Mapping[str, list[str]], limit: int, chunk: int = 1000) -> int:
        written = 0
        batch: list[tuple[str, list[str]]] = []
        for user_id, items in histories.items():
            batch.append((user_id, list(items)[-limit:]))
            if len(batch) >= chunk:
                written += await self._load_chunk(batch, limit)
                batch = []
        if batch:
            written += await self._load_chunk(batch, limit)
        return written

    async def _load_chunk(self, batch: Iterable[tuple[str, list[str]]], limit: int) -> int:
        count = 0
        async with self.client.pipeline(transaction=False) as pipe:
            for user_id, items in batch:
                key = history_key(user_id)
                pipe.delete(key)
                if items:
                    pipe.rpush(key, *items)
                    pipe.ltrim(key, -limit, -1)
                    if self.ttl_s:
                        pipe.expire(key, self.ttl_s)
                count += 1
            await pipe.execute()
        return count

    async def _ping(self) -> None:
        await self.client.ping()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "key_prefix": KEY_PREFIX, "down": self._was_down}

    async def close(self) -> None:
        await self.client.aclose()


def make_feature_store(settings: Any, metrics: ServiceMetrics | None) -> FeatureStore:
    """Redis when a URL is configured, else the embedded store (``settings``: service.settings.Settings)."""
    s = settings
    if s.redis_url:
        return RedisFeatureStore(
            s.redis_url,
            timeout_s=s.redis_timeout_ms / 1000.0,
            retry_after_s=s.redis_retry_after_ms / 1000.0,
            metrics=metrics,
            ttl_s=s.redis_history_ttl_s,
        )
    return EmbeddedFeatureStore(metrics, max_users=s.embedded_max_users)
