"""Model lifecycle: pick the newest valid version, have every engine load and warm it, swap it in.

The front end holds a ``VersionInfo`` (catalogue and config, no weights): it maps external ids with
that catalogue and names the version in each request it sends. The engines hold the weights. A swap
happens only after every engine has loaded and warmed the new version, so a request never names a
version its engine lacks; a request in flight finishes on the version it started on (each engine
keeps a version's rows until its last one finishes).

Verification and catalogue reading run in a thread, off the event loop; the engines load in their own
processes, so serving continues on the old model meanwhile. A version that fails anything (its
checksums, its config against its weights, its catalogue, an engine's build or warm-up) is refused
with a log line and a metric, and the next older valid version is tried, at start-up as on a reload:
one bad version never keeps the service from becoming ready. A refusal is remembered under the
version's number and a fingerprint of its files (``model_store.RefusalMemory``), so it is not checked
or built again until those files change. An admin pin that is refused is undone. Reloads and
catalogue edits are serialised by one lock.

Live catalogue edits (withdraw, restore, add) are applied in every engine between two decode steps,
then in the front end's catalogue, then written to the model's overlay file beside its versions
(``model_store.overlay``), which every later load replays.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from model_store import (
    CorruptVersionError,
    NoValidVersionError,
    RefusalMemory,
    Rejection,
    list_versions,
    overlay_path,
    read_overlay,
    version_fingerprint,
    write_overlay,
)
from service.engine.client import EnginePool, EngineRefused, ServingModel
from service.errors import Conflict, InvalidArgument, NotReady
from service.logs import get_logger
from service.metrics import ServiceMetrics
from service.settings import Settings

log = get_logger("models")

# How many versions the engines may refuse in one reload before it gives up.
MAX_ENGINE_REFUSALS = 8
# An engine refusal may be transient (an engine restarting, a full socket at start-up): a version the
# engines refuse is skipped for that reload (the next older one serves) and tried again on later
# polls; only after this many refusals of the same files, with some version serving, is it
# remembered as refused.
ENGINE_ATTEMPTS = 3


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


def _rejection_dict(rejection: Rejection) -> dict[str, Any]:
    return {"version": rejection.version, "reason": rejection.reason}


def _unique(rejected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per version (the latest reason), newest version first: a fallback may meet one twice."""
    by_version = {r["version"]: r for r in rejected}
    return sorted(by_version.values(), key=lambda r: -1 if r["version"] is None else r["version"], reverse=True)


class ModelManager:
    """Holds the serving version (``onerec.bundle.VersionInfo``) and replaces it safely."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, engines: EnginePool) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engines = engines
        self.current: Any | None = None  # onerec.bundle.VersionInfo
        self.pinned: int | None = settings.pin_version
        self.refusals = RefusalMemory()  # refused versions, skipped until their files change
        self._engine_failures: dict[tuple[int, str], int] = {}  # (version, fingerprint) -> engine refusals
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
            "history_window": bundle.history_window,
            "max_history": bundle.history_window,  # the first name of history_window, kept for its clients
            "loaded_at": bundle.loaded_at,
            "pinned": self.pinned,
            "created": bundle.manifest.get("created"),
            "device": self.settings.device,
            "live_items": bundle.catalog.trie.num_live,
            "engines": len(self.engines.slots),
            "engines_ready": self.engines.ready_engines(),
        }

    def popular_items(self, limit: int) -> list[str]:
        """Up to ``limit`` live item ids, most popular first, then the others in catalogue order.

        What a load tester draws request histories from when it has only the wire (GET
        /v1/models?popular_items=N); withdrawn items are left out, as no answer would contain them.
        """
        bundle = self.current
        if bundle is None or limit <= 0:
            return []
        catalog = bundle.catalog
        chosen: list[str] = []
        seen: set[int] = set()
        for index in itertools.chain(catalog.popular, range(len(catalog.item_ids))):
            if index in seen or not catalog.trie.is_live(index):
                continue
            seen.add(index)
            chosen.append(catalog.item_ids[index])
            if len(chosen) == limit:
                break
        return chosen

    # ---- loading ---------------------------------------------------------------------------------
    async def reload(self, version: int | None = None, *, pin_change: bool = False) -> ReloadOutcome:
        """Load the newest valid version (or `version`), warm it and swap it in.

        With pin_change, `version` becomes the pin (None clears it): an admin rollback stays put
        until the next admin reload. A pin whose version is refused is undone, so a typo cannot
        freeze the service on its old version and keep newer ones from being picked up.
        """
        async with self._lock:
            previous_pin = self.pinned
            if pin_change:
                self.pinned = version
            target = self.pinned if version is None else version
            outcome = await self._load(target)
            if pin_change and outcome.result in ("refused", "error") and self.pinned != previous_pin:
                self.pinned = previous_pin
                log.warning(
                    "pin refused and undone",
                    extra={"asked": version, "pinned": previous_pin, "reason": outcome.message},
                )
            return outcome

    async def _load(self, target: int | None) -> ReloadOutcome:
        """Select the newest valid version (or `target`), have the engines load it; fall back on refusal.

        Without a target, a version an engine refuses is remembered as refused and the next older
        valid one is tried; with one (a pin), the refusal is the answer.
        """
        previous = None if self.current is None else self.current.version
        rejected: list[dict[str, Any]] = []
        attempt = self.refusals.copy()  # plus the versions the engines refused during this reload
        for _ in range(MAX_ENGINE_REFUSALS):
            try:
                selected = await asyncio.to_thread(self._read_version, target, attempt)
            except Exception as exc:
                self._remember(getattr(exc, "rejections", []))
                return self._refuse(previous, target, exc, rejected)
            self._remember(selected.rejections)
            rejected += self._note_rejections(selected.rejections)
            info = selected.value
            if self.current is not None and info.version == self.current.version:
                self.metrics.model_reloads.labels("unchanged").inc()
                return ReloadOutcome("unchanged", previous, previous, _unique(rejected), "already serving this version")
            started = time.perf_counter()
            try:
                await self.engines.load(ServingModel(info.version, info.path, self._overlay_path(info.name)))
            except EngineRefused as exc:
                refusal = self._engine_refusal(info, selected.fingerprint, exc)
                attempt.add(refusal)
                rejected.append(_rejection_dict(refusal))
                if target is not None:
                    return self._refuse(previous, target, exc, rejected)
                continue
            except Exception as exc:  # the engines are not there (stopping, restarting): not the version's fault
                return self._refuse(previous, target, exc, rejected)
            log.info(
                "model version loaded by the engines",
                extra={"model": info.name, "version": info.version, "load_s": round(time.perf_counter() - started, 3)},
            )
            self._swap(info)
            return ReloadOutcome("loaded", info.version, previous, _unique(rejected))
        error = RuntimeError(f"the engines refused {MAX_ENGINE_REFUSALS} versions in a row")
        return self._refuse(previous, target, error, rejected)

    def _remember(self, rejections: list[Rejection]) -> None:
        """Keep the new refusals of a selection (made on this reload's copy) in the lasting memory."""
        for rejection in rejections:
            if not rejection.remembered:
                self.refusals.add(rejection)

    def _engine_refusal(self, info: Any, fingerprint: str, exc: EngineRefused) -> Rejection:
        """Count an engine refusal of a version; remembered (and counted in the metric) at the last try."""
        key = (info.version, fingerprint)
        tries = self._engine_failures[key] = self._engine_failures.get(key, 0) + 1
        reason = f"refused by the engines ({tries} of {ENGINE_ATTEMPTS} tries): {exc}"
        refusal = Rejection(info.name, info.version, info.path, reason, fingerprint)
        # Remembered only once the engines have shown they can load a version (one is serving): before
        # that, a refusal says as much about the engines (starting, restarting) as about the version.
        if tries >= ENGINE_ATTEMPTS and self.current is not None:
            self.refusals.add(refusal)
            self._note_rejections([refusal])
        else:
            log.warning(
                "engines could not load this version; an older one is tried, this one again later",
                extra={"model": info.name, "version": info.version, "reason": reason},
            )
        return refusal

    def _read_version(self, pin: int | None, memory: RefusalMemory | None = None) -> Any:
        """Thread part: select the newest valid (or pinned) version, read its catalogue, replay the overlay.

        The overlay is read first: a broken overlay is an error of the model, not of any version, so it
        must not get versions remembered as refused.
        """
        from onerec.bundle import select_version_info

        name = self.model_name()
        overlay = read_overlay(self._overlay_path(name))
        memory = self.refusals if memory is None else memory
        selected = select_version_info(self.settings.model_store, name, pin=pin, memory=memory)
        skipped = selected.value.catalog.apply_overlay(overlay)
        if skipped:
            log.warning("catalogue overlay names items this version lacks", extra={"items": skipped[:20]})
        return selected

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

    def _refuse(
        self, previous: int | None, target: int | None, exc: Exception, rejected: list[dict[str, Any]]
    ) -> ReloadOutcome:
        """Nothing new could be loaded: count and log it; the serving version (if any) stays."""
        refusal = (CorruptVersionError, NoValidVersionError, EngineRefused, LookupError, ValueError, OSError)
        result = "refused" if isinstance(exc, refusal) else "error"
        self.metrics.model_reloads.labels(result).inc()
        if isinstance(exc, NoValidVersionError):
            rejected = rejected + self._note_rejections(exc.rejections)
            message = exc.reason  # the store's path stays out of answers and logs
        else:
            message = f"{type(exc).__name__}: {exc}"
        log.error(
            "model load refused; the serving version stays",
            extra={"target": target, "serving": previous, "error": message, "rejected": rejected},
        )
        if target is not None and not any(r["version"] == target for r in rejected):
            rejected = [*rejected, {"version": target, "reason": message}]
        return ReloadOutcome(result, previous, previous, _unique(rejected), message)

    def _note_rejections(self, rejections: list[Rejection]) -> list[dict[str, Any]]:
        """Count and log the refusals that are new (a remembered one was counted when it happened)."""
        for rejection in rejections:
            if not rejection.remembered:
                self.metrics.versions_rejected.inc()
                log.error(
                    "model version refused",
                    extra={"model": rejection.name, "version": rejection.version, "reason": rejection.reason},
                )
        return [_rejection_dict(r) for r in rejections]

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
        """Load a newer version if one appeared (refused ones count only once their files change)."""
        if self.pinned is not None or self.current is None:
            return None
        serving = self.current.version
        if not await asyncio.to_thread(self._newer_candidate, serving):
            return None
        return await self.reload()

    def _newer_candidate(self, serving: int) -> bool:
        """Thread part of a poll: is there a version above `serving` that is not refused as it stands?"""
        try:
            name = self.model_name()
            versions = list_versions(self.settings.model_store, name)
        except Exception:  # no model / unreadable store: nothing newer to offer
            return False
        model_dir = self.settings.model_store / name
        for version in (v for v in versions if v > serving):
            if self.refusals.get(version, version_fingerprint(model_dir / str(version))) is None:
                return True
        return False

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
