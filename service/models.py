"""Model lifecycle: load the newest valid version, warm it, swap it in atomically, poll for newer ones.

Atomic swap: the serving bundle is one attribute (`current`). A request reads it once, maps its ids
with that bundle's catalogue and queues a job that holds the bundle, so a swap never changes the
model under a request already in flight: it finishes on the old one (the batcher never mixes
bundles in a batch) and the old bundle is freed when its last job completes.

Loading (verification, weights, trie) and warm-up run in a thread, off the event loop and before the
new bundle becomes visible, so serving continues on the old model meanwhile. A version that fails
verification or loading is refused with a log line and a metric, remembered (not retried by the
poller), and the serving version stays. Reloads are serialised by a lock.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from service.errors import Conflict, NotReady
from service.logs import get_logger
from service.metrics import ServiceMetrics
from service.settings import Settings, effective_torch_threads

log = get_logger("models")


@dataclass
class ReloadOutcome:
    """What one load attempt did; the admin endpoint returns it as JSON."""

    result: str  # loaded | unchanged | refused | error
    version: int | None
    previous: int | None
    rejected: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "version": None if self.version is None else str(self.version),
            "previous": None if self.previous is None else str(self.previous),
            "rejected": self.rejected,
            "message": self.message,
        }


def _rejection_dict(rejection: Any) -> dict[str, Any]:
    version = getattr(rejection, "version", None)
    path = getattr(rejection, "path", None)
    if version is None and path is not None:
        name = getattr(path, "name", str(path))
        version = int(name) if str(name).isdigit() else None
    return {"version": version, "reason": str(getattr(rejection, "reason", rejection))}


class ModelManager:
    """Holds the serving ModelBundle and replaces it safely."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.current: Any | None = None  # onerec.bundle.ModelBundle
        self.pinned: int | None = settings.pin_version
        self.refused: set[int] = set()
        self._lock = asyncio.Lock()

    # ---- reading ---------------------------------------------------------------------------------
    def serving(self) -> Any:
        """The bundle to use for a new request; NotReady before the first load."""
        bundle = self.current
        if bundle is None:
            raise NotReady("no model loaded yet")
        return bundle

    def describe(self) -> dict[str, Any]:
        """GET /v1/models."""
        bundle = self.current
        if bundle is None:
            return {"loaded": False, "pinned": self.pinned}
        return {
            "loaded": True,
            "name": bundle.name,
            "version": str(bundle.version),
            "path": str(bundle.path),
            "catalog_size": len(bundle.catalog.item_ids),
            "semantic_id_shape": list(bundle.semantic_id_shape),
            "session_items": bundle.session_items,
            "max_history": bundle.max_history,
            "loaded_at": bundle.loaded_at,
            "pinned": self.pinned,
            "created": bundle.manifest.get("created"),
            "device": self.settings.device,
        }

    # ---- loading ---------------------------------------------------------------------------------
    async def reload(self, version: int | None = None, *, pin_change: bool = False) -> ReloadOutcome:
        """Load the newest valid version (or `version`), warm it and swap it in.

        With pin_change, `version` becomes the pin (None clears it): an admin rollback stays put
        until the next admin reload. Raises Conflict when an explicitly requested version is refused.
        """
        async with self._lock:
            if pin_change:
                self.pinned = version
            target = self.pinned if version is None else version
            previous = None if self.current is None else self.current.version
            try:
                bundle, rejections = await asyncio.to_thread(self._load_and_warm, target)
            except Exception as exc:
                return self._refuse(previous, target, exc)
            rejected = [_rejection_dict(r) for r in rejections]
            for item in rejected:
                self._count_refusal(item)
            if self.current is not None and bundle.version == self.current.version:
                self.metrics.model_reloads.labels("unchanged").inc()
                return ReloadOutcome("unchanged", previous, previous, rejected, "already serving this version")
            self._swap(bundle)
            return ReloadOutcome("loaded", bundle.version, previous, rejected)

    def _load_and_warm(self, pin: int | None) -> tuple[Any, list[Any]]:
        """Worker-thread part: verify + build + warm. Warm-up runs before the bundle is visible."""
        import torch

        from onerec.bundle import load_newest_bundle

        torch.set_num_threads(effective_torch_threads(self.settings.torch_threads))
        started = time.perf_counter()
        bundle, rejections = load_newest_bundle(
            self.settings.model_store, self.model_name(), pin=pin, device=self.settings.device
        )
        if self.current is not None and bundle.version == self.current.version:
            return bundle, rejections  # nothing new: skip the warm-up, it will be dropped
        loaded = time.perf_counter()
        bundle.warmup()
        log.info(
            "model version loaded",
            extra={
                "model": bundle.name,
                "version": bundle.version,
                "load_s": round(loaded - started, 3),
                "warmup_s": round(time.perf_counter() - loaded, 3),
            },
        )
        return bundle, rejections

    def _swap(self, bundle: Any) -> None:
        old = self.current
        self.current = bundle  # the atomic step: new requests see the new bundle from here on
        if old is not None:
            self.metrics.model_info.remove(old.name, str(old.version))
        self.metrics.model_info.labels(bundle.name, str(bundle.version)).set(1)
        self.metrics.model_reloads.labels("loaded").inc()
        log.info(
            "model swapped in",
            extra={
                "model": bundle.name,
                "version": bundle.version,
                "previous": None if old is None else old.version,
            },
        )

    def model_name(self) -> str:
        """The configured model, else the store's only model (an ambiguous store is an error)."""
        from model_store import NoValidVersionError, list_models

        if self.settings.model_name:
            return self.settings.model_name
        if self.current is not None:
            return str(self.current.name)
        names = list_models(self.settings.model_store)
        if len(names) == 1:
            return names[0]
        if not names:
            raise NoValidVersionError(self.settings.model_store, "no model in the store")
        raise ValueError(f"store {self.settings.model_store} holds {names}: set ONEREC_MODEL_NAME")

    def _refuse(self, previous: int | None, target: int | None, exc: Exception) -> ReloadOutcome:
        from model_store import CorruptVersionError, NoValidVersionError

        refusal = (CorruptVersionError, NoValidVersionError, LookupError, ValueError, OSError)
        result = "refused" if isinstance(exc, refusal) else "error"
        self.metrics.model_reloads.labels(result).inc()
        for rejection in getattr(exc, "rejections", []):
            self._count_refusal(_rejection_dict(rejection))
        if isinstance(exc, CorruptVersionError) and target is not None and target not in self.refused:
            self._count_refusal({"version": target, "reason": exc.reason})
        log.error(
            "model load refused; the serving version stays",
            extra={"target": target, "serving": previous, "error": f"{type(exc).__name__}: {exc}"},
        )
        message = f"{type(exc).__name__}: {exc}"
        return ReloadOutcome(result, previous, previous, [{"version": target, "reason": message}], message)

    def _count_refusal(self, item: dict[str, Any]) -> None:
        version = item.get("version")
        if isinstance(version, int) and version not in self.refused:
            self.refused.add(version)
            self.metrics.versions_rejected.inc()
            log.error("model version refused", extra={"version": version, "reason": item.get("reason")})

    async def admin_reload(self, version: int | None) -> ReloadOutcome:
        """POST /v1/models/reload: version pins it; none clears the pin and loads the newest valid.

        A refusal of the version the caller asked for (explicit, or the newest in the store) is a
        Conflict (409), so an operator cannot mistake "still on the old model" for success.
        """
        outcome = await self.reload(version, pin_change=True)
        newest = self.newest_in_store()
        asked = version if version is not None else newest
        if outcome.result in ("refused", "error") or (
            asked is not None and outcome.version != asked and any(r["version"] == asked for r in outcome.rejected)
        ):
            detail = outcome.message or outcome.rejected
            raise Conflict(f"version {asked} refused; serving version {outcome.version} stays: {detail}")
        return outcome

    def newest_in_store(self) -> int | None:
        """Highest version number present (valid or not) of the served model name."""
        from model_store import list_versions

        try:
            versions = list_versions(self.settings.model_store, self.model_name())
        except Exception:  # no model / unreadable store: nothing newer to offer
            return None
        return max(versions) if versions else None

    async def poll_once(self) -> ReloadOutcome | None:
        """Load a newer version if one appeared (and was not refused before); None when idle."""
        if self.pinned is not None or self.current is None:
            return None
        newest = await asyncio.to_thread(self.newest_in_store)
        if newest is None or newest <= self.current.version or newest in self.refused:
            return None
        return await self.reload()

    async def poll_forever(self) -> None:
        """Background task: the first load (retried until it works), then polling for new versions."""
        interval = self.settings.poll_interval_s
        while self.current is None:
            outcome = await self.reload()
            if self.current is None:
                log.error("no servable model yet; retrying", extra={"outcome": outcome.to_dict()})
                await asyncio.sleep(max(interval, 1.0) if interval > 0 else 2.0)
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll_once()
            except Exception:  # the poller must survive anything (a half-written store, a bug)
                log.exception("model poll failed")
