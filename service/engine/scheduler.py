"""The scheduler of an engine: which requests run, one decode step at a time, Orca-style.

    step():  drop what is past its deadline (queued or mid-search: 504 at the front end)
             admit waiting requests while their rows fit the row budget (encode each once)
             one decode step for every live row, per model version
             answer the requests that finished at this step, at once

A request never waits for a batch that started before it: it joins the running rows at the next step
(``scheduler="continuous"``). ``scheduler="batch"`` keeps the old batch-at-a-time behaviour (admit
only when the row set is empty) so the two can be compared in one run.

Model versions: each loaded version has its own row set; a hot reload loads and warms the new version
in a thread while the old one keeps stepping, new requests name the new version, and the old one is
dropped once its last row finishes.

The scheduler owns no sockets: it takes messages through ``handle`` and emits replies through the
callback it is given, so tests drive it directly and ``core.Engine`` wires it to ZeroMQ.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.engine import messages as msg
from service.logs import get_logger

if TYPE_CHECKING:  # the engine imports torch and the model lazily, where it loads one
    from onerec.bundle import ModelBundle
    from onerec.generate import RecRequest, StepSearch

log = get_logger("engine")


@dataclass
class _Live:
    submit: msg.Submit
    arrived: float
    started: float = 0.0
    steps_done: int = 0
    steps: int = 0
    rows: int = 0

    @property
    def rowsteps(self) -> int:
        return self.rows * self.steps


@dataclass
class _Version:
    """A loaded model version and its row set."""

    bundle: ModelBundle
    search: StepSearch
    live: dict[int, _Live] = field(default_factory=dict)


class Scheduler:
    """Requests waiting and running in one engine, stepped one decode position at a time."""

    def __init__(
        self,
        emit: Callable[[msg.FromEngine], None],
        *,
        index: int = 0,
        device: str = "cpu",
        kernels: str = "auto",
        max_rows: int = 2048,
        max_requests: int = 16,
        mode: str = "continuous",
    ) -> None:
        self.emit = emit
        self.index = index
        self.device = device
        self.kernels = kernels
        self.max_rows = max_rows
        self.max_requests = max_requests
        self.mode = mode
        self.versions: dict[int, _Version] = {}
        self.current: int | None = None
        self.waiting: collections.deque[_Live] = collections.deque()
        self.loading: list[tuple[msg.LoadModel, threading.Thread, dict[str, Any]]] = []
        self.stopping_at: float | None = None  # monotonic time by which to stop
        self._step_log: list[tuple[int, int, float]] = []
        self._encode_log: list[float] = []
        self._invalid_paths = 0
        self._received_rowsteps = 0

    # ---- messages ------------------------------------------------------------------------------------
    def handle(self, m: msg.ToEngine) -> None:
        if isinstance(m, msg.Submit):
            self._submit(m)
        elif isinstance(m, msg.Cancel):
            self._cancel(m.id)
        elif isinstance(m, msg.LoadModel):
            self._start_load(m)
        elif isinstance(m, msg.CatalogChange):
            self._catalog_change(m)
        elif isinstance(m, msg.Stop):
            self.stopping_at = time.monotonic() + m.drain_s

    def _submit(self, m: msg.Submit) -> None:
        if self.stopping_at is not None:
            self.emit(msg.Failed(m.id, "stopping", "the engine is shutting down"))
            return
        version = self.versions.get(m.version)
        if version is None:
            self.emit(msg.Failed(m.id, "not_loaded", f"model version {m.version} is not loaded in this engine"))
            return
        rows, steps = version.search.cost(_request(m))
        live = _Live(m, time.monotonic(), steps=steps, rows=rows)
        self._received_rowsteps += live.rowsteps
        self.waiting.append(live)

    def _cancel(self, rid: int) -> None:
        for live in self.waiting:
            if live.submit.id == rid:
                self.waiting.remove(live)
                return
        for version in self.versions.values():
            if version.live.pop(rid, None) is not None:
                version.search.remove(rid)
                return

    # ---- the step ------------------------------------------------------------------------------------
    def step(self) -> None:
        """Finish loads, drop the expired, admit, and run one decode step for every live row."""
        self._finish_loads()
        self._expire(time.monotonic())
        self._admit()
        for number, version in list(self.versions.items()):
            if version.live:
                self._step_version(number, version)
            elif number != self.current and not any(w.submit.version == number for w in self.waiting):
                del self.versions[number]  # a superseded version whose last row has finished

    def _expire(self, now: float) -> None:
        """Drop what is past its deadline: queued (never computed) or mid-search (cut short)."""
        for live in [w for w in self.waiting if w.submit.deadline <= now]:
            self.waiting.remove(live)
            self.emit(msg.Failed(live.submit.id, "deadline", "deadline passed while queued; dropped before compute"))
        for version in self.versions.values():
            for rid in [rid for rid, live in version.live.items() if live.submit.deadline <= now]:
                del version.live[rid]
                version.search.remove(rid)
                self.emit(msg.Failed(rid, "deadline", "deadline passed mid-search; search cut short"))

    def _admit(self) -> None:
        """Waiting requests join the row set while their rows fit (at least one if the set is empty)."""
        if self.mode == "batch" and self.live_requests:
            return  # batch-at-a-time: a new batch starts only when the last one is done
        rows, count = self.live_rows, self.live_requests
        while self.waiting and count < self.max_requests:
            head = self.waiting[0]
            if count and rows + head.rows > self.max_rows:
                return
            self.waiting.popleft()
            version = self.versions.get(head.submit.version)
            if version is None:
                self.emit(msg.Failed(head.submit.id, "not_loaded", f"model version {head.submit.version} was unloaded"))
                continue
            try:
                version.search.add(head.submit.id, _request(head.submit))  # encoded at its first step
            except ValueError as exc:
                self.emit(msg.Failed(head.submit.id, "invalid", str(exc)))
                continue
            head.started = time.monotonic()
            version.live[head.submit.id] = head
            rows += head.rows
            count += 1

    def _step_version(self, number: int, version: _Version) -> None:
        rows, requests = version.search.rows, len(version.live)
        encoded, invalid = version.search.stats.encode_seconds, version.search.stats.invalid_paths
        started = time.perf_counter()
        try:
            finished = version.search.step()
        except Exception as exc:  # a bug must fail these requests, not the engine
            log.exception("decode step failed", extra={"version": number})
            for rid in list(version.live):
                version.search.remove(rid)
                self.emit(msg.Failed(rid, "internal", f"inference failed: {type(exc).__name__}"))
            version.live.clear()
            return
        self._step_log.append((requests, rows, time.perf_counter() - started))
        if version.search.stats.encode_seconds > encoded:  # requests that joined at this step were encoded
            self._encode_log.append(version.search.stats.encode_seconds - encoded)
        for running in version.live.values():
            running.steps_done += 1
        for rid, result in finished:
            done = version.live.pop(rid, None)
            if done is None:
                continue
            items = [(int(it.item), float(it.score), [int(c) for c in it.semantic_id]) for it in result.items]
            self.emit(msg.Finished(rid, items, done.started - done.arrived, done.steps_done))
        self._invalid_paths += version.search.stats.invalid_paths - invalid

    # ---- state ---------------------------------------------------------------------------------------
    @property
    def live_rows(self) -> int:
        return sum(v.search.rows for v in self.versions.values())

    @property
    def live_requests(self) -> int:
        return sum(len(v.live) for v in self.versions.values())

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or self.live_requests > 0

    def backlog(self) -> int:
        """Row-steps still to compute: the live rows' remaining steps plus every waiting request's."""
        running = sum(
            live.rows * max(0, live.steps - live.steps_done) for v in self.versions.values() for live in v.live.values()
        )
        return running + sum(w.rowsteps for w in self.waiting)

    def stats(self) -> msg.StepStats:
        """What was measured since the last call (the step and encode logs are handed over and reset)."""
        report = msg.StepStats(
            self.index,
            self._step_log,
            self._encode_log,
            self._invalid_paths,
            self.backlog(),
            self._received_rowsteps,
            self.live_rows,
            len(self.waiting),
        )
        self._step_log, self._encode_log, self._invalid_paths = [], [], 0
        return report

    def fail_everything(self, why: str) -> None:
        """At exit: whatever is still queued or running is answered, never left hanging."""
        for live in self.waiting:
            self.emit(msg.Failed(live.submit.id, "stopping", why))
        self.waiting.clear()
        for version in self.versions.values():
            for rid in version.live:
                self.emit(msg.Failed(rid, "stopping", why))
            version.live.clear()

    # ---- models and catalogue ------------------------------------------------------------------------
    def _start_load(self, m: msg.LoadModel) -> None:
        box: dict[str, Any] = {}
        thread = threading.Thread(target=self._load, args=(m, box), name="engine-load", daemon=True)
        thread.start()
        self.loading.append((m, thread, box))

    def _load(self, m: msg.LoadModel, box: dict[str, Any]) -> None:
        """Load thread: verify + build + apply the overlay + warm, all before the version is visible."""
        try:
            from model_store import read_overlay
            from onerec.bundle import load_bundle
            from onerec.generate import StepSearch

            bundle = load_bundle(Path(m.path), device=self.device, kernel_backend=self.kernels)
            if m.overlay:
                bundle.catalog.apply_overlay(read_overlay(Path(m.overlay)))
            bundle.warmup()
            box["version"] = _Version(bundle, StepSearch(bundle.generator))
        except Exception as exc:  # anything wrong with a version refuses it; the engine keeps serving
            box["error"] = f"{type(exc).__name__}: {exc}"

    def _finish_loads(self) -> None:
        for entry in [e for e in self.loading if not e[1].is_alive()]:
            self.loading.remove(entry)
            m, _, box = entry
            if "error" in box:
                log.error("model version refused by the engine", extra={"path": m.path, "error": box["error"]})
                self.emit(msg.ControlDone(m.id, False, box["error"]))
                continue
            loaded: _Version = box["version"]
            number = int(loaded.bundle.version)
            if number not in self.versions or not self.versions[number].live:
                self.versions[number] = loaded
            self.current = number
            log.info("model version loaded", extra={"version": number, "path": m.path})
            self.emit(msg.ControlDone(m.id, True, version=number))

    def _catalog_change(self, m: msg.CatalogChange) -> None:
        version = self.versions.get(m.version)
        if version is None:
            self.emit(msg.ControlDone(m.id, False, f"model version {m.version} is not loaded"))
            return
        try:
            catalog = version.bundle.catalog
            catalog.withdraw(m.withdraw)
            catalog.restore(m.restore)
            for item_id, path in m.add:
                catalog.add(item_id, path)
        except (KeyError, ValueError) as exc:
            self.emit(msg.ControlDone(m.id, False, str(exc)))
            return
        self.emit(msg.ControlDone(m.id, True, version=m.version))


def _request(m: msg.Submit) -> RecRequest:
    """The generator's request type from the wire message (internal ids already)."""
    from onerec.generate import RecRequest

    return RecRequest(
        history=m.history,
        num_items=m.num_items,
        mode=m.mode,
        beam_width=m.beam_width,
        exclude=m.exclude,
        exclude_history=m.exclude_history,
        user_id=m.user_id,
    )
