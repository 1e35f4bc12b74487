"""Model lifecycle: pick the newest valid version, have every engine load and warm it, swap it in.

The front end holds a ``VersionInfo`` (catalogue and config, no weights): it maps external ids with
that catalogue and names the version in each request it sends. The engines hold the weights. A swap
happens only after every engine has loaded and warmed the new version, so a request never names a
version its engine lacks; a request in flight finishes on the version it started on (each engine
keeps a version's rows until its last one finishes).

Verification and catalogue reading run in a thread, off the event loop; the engines load in their own
processes, so serving continues on the old model meanwhile. A version that fails verification or
loading is refused with a log line and a metric, remembered (not retried by the poller), and the
serving version stays. Reloads and catalogue edits are serialised by one lock.

Live catalogue edits (withdraw, restore, add) are applied in every engine between two decode steps,
then in the front end's catalogue, then written to the model's overlay file beside its versions
(``model_store.overlay``), which every later load replays.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from model_store import overlay_path, read_overlay, write_overlay
from service.engine.client import EnginePool, EngineRefused, ServingModel
from service.errors import Conflict, InvalidArgument, NotReady
from service.logs import get_logger
from service.metrics import ServiceMetrics
from service.settings import Settings

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
    """Holds the serving version (``onerec.bundle.VersionInfo``) and replaces it safely."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, engines: EnginePool) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engines = engines
        self.current: Any | None = None  # onerec.bundle.VersionInfo
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
            "catalog_size": len(bundle.catalog.item_ids),
            "semantic_id_shape": list(bundle.semantic_id_shape),
            "session_items": bundle.session_items,
            "max_history": bundle.max_history,
            "loaded_at": bundle.loaded_at,
            "pinned": self.pinned,
            "created": bundle.manifest.get("created"),
            "device": self.settings.device,
            "live_items": bundle.catalog.trie.num_live,
            "engines": len(self.engines.slots),
            "engines_ready": self.engines.ready_engines(),
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
                info, rejections = await asyncio.to_thread(self._read_version, target)
                rejected = [_rejection_dict(r) for r in rejections]
                for item in rejected:
                    self._count_refusal(item)
                if self.current is not None and info.version == self.current.version:
                    self.metrics.model_reloads.labels("unchanged").inc()
                    return ReloadOutcome("unchanged", previous, previous, rejected, "already serving this version")
                started = time.perf_counter()
                await self.engines.load(ServingModel(info.version, info.path, self._overlay_path(info.name)))
            except Exception as exc:
                return self._refuse(previous, target, exc)
            log.info(
                "model version loaded by the engines",
                extra={"model": info.name, "version": info.version, "load_s": round(time.perf_counter() - started, 3)},
            )
            self._swap(info)
            return ReloadOutcome("loaded", info.version, previous, rejected)

    def _read_version(self, pin: int | None) -> tuple[Any, list[Any]]:
        """Thread part: verify the newest valid (or pinned) version and read its catalogue and overlay."""
        from onerec.bundle import load_newest_version_info

        info, rejections = load_newest_version_info(self.settings.model_store, self.model_name(), pin=pin)
        skipped = info.catalog.apply_overlay(read_overlay(self._overlay_path(info.name)))
        if skipped:
            log.warning("catalogue overlay names items this version lacks", extra={"items": skipped[:20]})
        return info, rejections

    def _overlay_path(self, name: str) -> Any:
        return overlay_path(self.settings.model_store, name)

    # ---- live catalogue ----------------------------------------------------------------------------
    async def edit_catalog(
        self, withdraw: list[str], restore: list[str], add: list[tuple[str, list[int]]]
    ) -> dict[str, Any]:
        """Withdraw, restore or add items in every engine and in the front end, and keep the edit."""
        async with self._lock:
            info = self.serving()
            self._check_edit(info, withdraw, restore, add)
            try:
                await self.engines.catalog_change({"withdraw": withdraw, "restore": restore, "add": add})
            except EngineRefused as exc:
                raise InvalidArgument(f"catalogue edit refused: {exc}", field="items") from None
            catalog = info.catalog
            catalog.withdraw(withdraw)
            catalog.restore(restore)
            for item_id, path in add:
                catalog.add(item_id, path)
            path = self._overlay_path(info.name)
            overlay = read_overlay(path)
            overlay.withdraw(withdraw)
            overlay.restore(restore)
            for item_id, codes in add:
                overlay.add(item_id, codes)
            await asyncio.to_thread(write_overlay, path, overlay)
        for op, items in (("withdraw", withdraw), ("restore", restore), ("add", add)):
            if items:
                self.metrics.catalog_changes.labels(op).inc(len(items))
        log.info(
            "catalogue edited",
            extra={"withdrawn": len(withdraw), "restored": len(restore), "added": len(add), "version": info.version},
        )
        return {
            "version": str(info.version),
            "live_items": catalog.trie.num_live,
            "catalog_size": len(catalog.item_ids),
        }

    @staticmethod
    def _check_edit(info: Any, withdraw: list[str], restore: list[str], add: list[tuple[str, list[int]]]) -> None:
        """Refuse (422, naming the ids) what the catalogue cannot take, before any engine changes."""
        catalog = info.catalog
        for name, ids in (("withdraw", withdraw), ("restore", restore)):
            unknown = [i for i in ids if catalog.index(i) is None]
            if unknown:
                raise InvalidArgument(f"{name}: unknown item ids {unknown[:10]}", field="items")
        depth, sizes = len(catalog.level_sizes), catalog.level_sizes
        for item_id, path in add:
            if len(path) != depth or any(not 0 <= c < size for c, size in zip(path, sizes)):
                raise InvalidArgument(
                    f"add: semantic_id {path} of item {item_id!r} must have {depth} codes within {sizes}",
                    field="add.semantic_id",
                )
            owner = catalog.trie.item_of_path(path)
            if owner is not None and catalog.item_ids[owner] != item_id:
                raise InvalidArgument(
                    f"add: semantic_id {path} already names item {catalog.item_ids[owner]!r}", field="add.semantic_id"
                )

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

        refusal = (CorruptVersionError, NoValidVersionError, EngineRefused, LookupError, ValueError, OSError)
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
