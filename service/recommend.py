"""The recommend and events use cases, shared by the HTTP and gRPC front ends.

Per request: pick the serving version once; resolve the history (the request's own, else the feature
store's; if the store fails, the popularity fallback, marked degraded); map external ids to the
version's internal indices once (unknown ones are dropped and counted) and trim the history to the
encoder window once; send it to an engine under its deadline (``EnginePool.recommend`` admits or
sheds); map the answer back to external ids; and check DESIGN.md 4.2's guarantees one last time (live
catalogue, no duplicates, no excluded item, no own-history item). The generator enforces them by
construction, so that check is a safety net whose metric must stay at zero.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from service.capture import CaptureWriter, request_record
from service.engine.client import EnginePool
from service.engine.cost import request_cost
from service.engine.messages import Submit
from service.features import FeatureStore, FeatureStoreError
from service.logs import get_logger
from service.metrics import ServiceMetrics
from service.models import ModelManager
from service.schemas import EventsBody, RecommendBody, check_event_limits, check_limits
from service.settings import Settings

log = get_logger("recommend")


def new_request_id(candidate: str | None = None) -> str:
    """Honour a caller's id when it is sane (printable, <= 128 chars), else make one."""
    if candidate and len(candidate) <= 128 and candidate.isprintable():
        return candidate
    return uuid.uuid4().hex


@dataclass
class ResolvedHistory:
    items: list[str] | None  # external ids, newest last; None = unavailable (store failed)
    degraded: bool


class RecommendService:
    """Everything between a validated request body and its answer."""

    def __init__(
        self,
        settings: Settings,
        models: ModelManager,
        engines: EnginePool,
        features: FeatureStore,
        metrics: ServiceMetrics,
        capture: CaptureWriter | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.engines = engines
        self.features = features
        self.metrics = metrics
        self.capture = capture

    def deadline_for(self, body_timeout_ms: int | None, transport_remaining_s: float | None) -> float:
        """Monotonic deadline: what the caller asked for, else the default, never past the maximum.

        The caller's budget is the earlier of ``timeout_ms`` and the transport's (gRPC) deadline when
        either is given; the default applies only when neither is. Both are cut to
        ``max_request_timeout_ms``, so a 20 s gRPC deadline gets 20 s, not the 2 s default.
        """
        s = self.settings
        asked = [
            t
            for t in (None if body_timeout_ms is None else body_timeout_ms / 1000.0, transport_remaining_s)
            if t is not None
        ]
        budget = min(asked) if asked else s.request_timeout_ms / 1000.0
        return time.monotonic() + min(budget, s.max_request_timeout_ms / 1000.0)

    async def recommend(self, body: RecommendBody, request_id: str, deadline: float) -> dict[str, Any]:
        """Answer one request as the HTTP JSON dict (the gRPC front end converts it)."""
        check_limits(body, self.settings)
        bundle = self.models.serving()
        num_items = body.num_items or self.settings.default_num_items
        beam_width = body.beam_width or self.settings.default_beam_width
        self._capture(body, num_items, beam_width)
        resolved = await self._resolve_history(body, bundle.history_window)
        if resolved.items is None:
            items = self._fallback(bundle, body, num_items)
        else:
            items = await self._generate(bundle, body, resolved.items, num_items, beam_width, deadline)
        if resolved.degraded:
            self.metrics.degraded.labels("feature_store").inc()
        return {
            "request_id": request_id,
            "model": {"name": bundle.name, "version": str(bundle.version)},
            "items": items,
            "degraded": resolved.degraded,
        }

    async def record_events(self, body: EventsBody) -> list[str]:
        """Append the catalogue's items to the stored history; ids it does not know are dropped and counted.

        Raises FeatureStoreError when the store fails: ``kind == "timeout"`` means the outcome is
        unknown (the write may have landed), anything else means nothing was stored.
        """
        check_event_limits(body, self.settings)
        bundle = self.models.current
        items = list(body.items)
        limit = self.settings.max_request_history
        if bundle is not None:
            known = [item for item in items if bundle.item_index(item) is not None]
            if len(known) < len(items):
                self.metrics.unknown_event_items.inc(len(items) - len(known))
            items, limit = known, bundle.history_window
        if not items:
            return (await self.features.get_history(body.user_id, limit)) or []
        return await self.features.append_events(body.user_id, items, limit)

    # ---- steps -----------------------------------------------------------------------------------
    def _capture(self, body: RecommendBody, num_items: int, beam_width: int) -> None:
        if self.capture is None:
            return
        self.capture.offer(request_record(body, num_items, beam_width))

    async def _resolve_history(self, body: RecommendBody, limit: int) -> ResolvedHistory:
        if body.history:
            return ResolvedHistory(list(body.history), degraded=False)
        try:
            stored = await self.features.get_history(body.user_id, limit)
        except FeatureStoreError:
            return ResolvedHistory(None, degraded=True)
        return ResolvedHistory(stored or [], degraded=False)

    async def _generate(
        self,
        bundle: Any,
        body: RecommendBody,
        history: list[str],
        num_items: int,
        beam_width: int,
        deadline: float,
    ) -> list[dict[str, Any]]:
        window = history[-bundle.history_window :]  # the encoder window: the only place the history is trimmed
        known = [bundle.item_index(item) for item in window]
        internal_history = [i for i in known if i is not None]
        unknown = len(known) - len(internal_history)
        if unknown:
            self.metrics.unknown_history_items.inc(unknown)
        exclude = [i for i in (bundle.item_index(item) for item in body.exclude) if i is not None]
        submit = Submit(
            id=0,  # set by the pool
            version=bundle.version,
            history=internal_history,
            num_items=num_items,
            mode=body.mode,
            beam_width=beam_width,
            exclude=exclude,
            exclude_history=body.exclude_history,
            user_id=body.user_id,
            deadline=deadline,
        )
        cost = request_cost(body.mode, beam_width, num_items, bundle.session_items, len(bundle.semantic_id_shape))
        finished = await self.engines.recommend(submit, cost)
        self.metrics.queue_wait.observe(finished.queued_s)
        banned = set(exclude) | (set(internal_history) if body.exclude_history else set())
        return self._checked_items(bundle, finished.items, banned)

    def _checked_items(
        self, bundle: Any, rec_items: list[tuple[int, float, list[int]]], banned: set[int]
    ) -> list[dict[str, Any]]:
        """The engine's (item, score, semantic id) answer as response items: the one place they are mapped."""
        out: list[dict[str, Any]] = []
        seen: set[int] = set()
        for item, score, semantic_id in rec_items:
            kind = (
                "unknown"
                if not bundle.catalog.is_live(item)
                else "duplicate"
                if item in seen
                else "banned"
                if item in banned
                else None
            )
            if kind is not None:
                self.metrics.guarantee_violations.labels(kind).inc()
                continue
            seen.add(item)
            out.append({"item_id": bundle.item_id(item), "score": float(score), "semantic_id": list(semantic_id)})
        return out

    def _fallback(self, bundle: Any, body: RecommendBody, num_items: int) -> list[dict[str, Any]]:
        """Most popular live items not excluded (score = -rank), for answers without history."""
        excluded = {i for i in (bundle.item_index(item) for item in body.exclude) if i is not None}
        candidates = [i for i in bundle.popular if i not in excluded][: num_items * 2 + len(excluded)]
        trie = bundle.catalog.trie
        live = [(rank, item) for rank, item in enumerate(candidates) if trie.is_live(item)][:num_items]
        return self._checked_items(bundle, [(i, -float(r), list(trie.path_of_item(i))) for r, i in live], excluded)
