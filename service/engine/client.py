"""The front end's side of the engines: start and supervise them, route requests, admit or shed.

    front end (asyncio)                                  engine i (own process, own interpreter)
    EnginePool.recommend ── Submit ──> PUSH ipc://…/in-i-g ──> PULL ─┐
                                                                   loop: admit, step, answer
    reader task <── PULL ipc://…/out <── PUSH <── Finished / Failed / StepStats / ControlDone

ZeroMQ over ``ipc://`` sockets with msgspec msgpack: one copy in, one copy out, no pickle, and the
sockets survive either side restarting. Each engine incarnation gets a fresh inbox address, so a
restarted engine never receives requests queued for its dead predecessor.

Admission happens here, before a request is sent: the request goes to the engine that would answer it
soonest (``cost.expected_seconds`` over that engine's rows and backlog), and is refused at once (429)
when even that engine would answer after its deadline, or when too many requests already wait.

Supervision: when an engine process dies, every request it held fails at once with 503 (the caller
may retry), the engine is started again and given the serving model, and it serves again once it has
loaded it; the front end never restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from service.engine import messages as msg
from service.engine.core import EngineConfig
from service.engine.cost import AdmissionMargin, Cost, StepTimer, expected_seconds
from service.errors import DeadlineExceeded, InvalidArgument, NotReady, Overloaded, ServiceError
from service.logs import get_logger
from service.metrics import ServiceMetrics
from service.settings import Settings, effective_torch_threads

log = get_logger("engine-client")

SUPERVISE_EVERY_S = 0.05
RESTART_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0)


class InferenceError(ServiceError):
    """The engine failed on a request (a bug, never expected): 500 / INTERNAL."""

    code = "inference_error"
    reason = "inference_error"


class EngineRefused(Exception):
    """An engine could not load a model version (the front end refuses the version)."""


_FAILURES: dict[str, type[ServiceError]] = {
    "deadline": DeadlineExceeded,
    "invalid": InvalidArgument,
    "not_loaded": NotReady,
    "stopping": NotReady,
    "internal": InferenceError,
}


@dataclass
class _Pending:
    engine: _EngineSlot
    cost: Cost
    future: asyncio.Future[msg.Finished]
    sent_at: float
    predicted: float | None


@dataclass
class _EngineSlot:
    """One engine position: the current process of it, and what the front end knows of its load."""

    index: int
    generation: int = 0
    proc: subprocess.Popen[bytes] | None = None
    inbox: zmq.Socket[bytes] | None = None
    hello: asyncio.Event = field(default_factory=asyncio.Event)  # set when this incarnation said Hello
    model_version: int | None = None  # the serving version this incarnation has loaded
    pending: dict[int, _Pending] = field(default_factory=dict)
    controls: dict[int, asyncio.Future[msg.ControlDone]] = field(default_factory=dict)
    timer: StepTimer = field(default_factory=StepTimer)
    reported_backlog: int = 0
    reported_received: int = 0
    sent_rowsteps: int = 0
    restarts: int = 0
    started_at: float = 0.0

    @property
    def live_rows(self) -> int:
        return sum(p.cost.rows for p in self.pending.values())

    @property
    def backlog(self) -> int:
        """Row-steps still to compute: the engine's last report plus what was sent after it."""
        return self.reported_backlog + max(0, self.sent_rowsteps - self.reported_received)


@dataclass
class ServingModel:
    """What every engine must have loaded to serve: the version directory and the model's overlay."""

    version: int
    path: Path
    overlay: Path | None


class EnginePool:
    """N engine processes behind one front end (``ONEREC_ENGINES``)."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.ctx = zmq.asyncio.Context()  # the reply socket is read by the event loop
        self.send_ctx = zmq.Context()  # request sockets: non-blocking sends of small messages, no awaiting
        self.dir = Path(tempfile.mkdtemp(prefix="onerec-engines-"))
        self.outbox_addr = f"ipc://{self.dir}/out"
        self.outbox = self.ctx.socket(zmq.PULL)
        self.outbox.bind(self.outbox_addr)
        self.slots = [_EngineSlot(i) for i in range(settings.engines)]
        self.model: ServingModel | None = None
        self.margin = AdmissionMargin()
        self._ids = itertools.count(1)
        self._owner: dict[int, _EngineSlot] = {}  # request or control id -> engine slot
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False

    # ---- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)
        self._tasks = [
            asyncio.create_task(self._read_replies(), name="engine-replies"),
            asyncio.create_task(self._supervise(), name="engine-supervisor"),
        ]

    def _spawn(self, slot: _EngineSlot) -> None:
        slot.generation += 1
        inbox = f"ipc://{self.dir}/in-{slot.index}-{slot.generation}"
        if slot.inbox is not None:
            slot.inbox.close(0)
        slot.hello = asyncio.Event()
        slot.inbox = self.send_ctx.socket(zmq.PUSH)
        slot.inbox.setsockopt(zmq.LINGER, 0)
        # The engine binds its inbox and this side connects: a connecting PUSH socket queues messages
        # at once, so nothing sent after the engine's hello can find the pipe not there yet.
        slot.inbox.connect(inbox)
        s = self.settings
        cfg = EngineConfig(
            index=slot.index,
            generation=slot.generation,
            inbox=inbox,
            outbox=self.outbox_addr,
            device=s.device,
            kernels=s.kernels,
            torch_threads=effective_torch_threads(s.torch_threads),
            max_rows=s.max_beam_budget,
            max_requests=s.max_batch_size,
            scheduler=s.scheduler,
            log_level=s.log_level,
        )
        cmd = [sys.executable, "-m", "service.engine.core", json.dumps(asdict(cfg))]
        # Own session: a terminal's Ctrl-C reaches the front end only, which then stops the engines in order.
        slot.proc = subprocess.Popen(cmd, start_new_session=True)
        slot.model_version = None
        slot.started_at = time.monotonic()
        log.info("engine started", extra={"engine": slot.index, "generation": slot.generation, "pid": slot.proc.pid})

    async def stop(self, drain_s: float) -> None:
        """Let the engines finish what they hold (within ``drain_s``), then make sure they are gone."""
        self._stopping = True
        for slot in self.slots:
            with contextlib.suppress(NotReady):  # an engine that is not connected is killed below
                self._send(slot, msg.Stop(drain_s))
        deadline = time.monotonic() + drain_s + 2.0
        for slot in self.slots:
            while slot.proc is not None and slot.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.kill()
                slot.proc.wait(5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_all(NotReady("the service is shutting down"))
        self.close()

    def close(self) -> None:
        """Release the sockets and their folder (the last step of ``stop``; alone, for a pool never started)."""
        self.ctx.destroy(0)
        self.send_ctx.destroy(0)
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def ready(self) -> bool:
        return self.ready_engines() > 0

    def ready_engines(self) -> int:
        version = None if self.model is None else self.model.version
        return sum(1 for s in self.slots if version is not None and s.model_version == version and self._alive(s))

    @staticmethod
    def _alive(slot: _EngineSlot) -> bool:
        return slot.proc is not None and slot.proc.poll() is None

    # ---- models and catalogue ------------------------------------------------------------------------
    async def load(self, model: ServingModel, timeout_s: float = 600.0) -> None:
        """Every live engine loads and warms ``model``; EngineRefused if one refuses it.

        The serving model only changes once all engines have it, so a request planned against the new
        version never lands on an engine that lacks it.
        """
        replies = await asyncio.gather(
            *(
                self._control(slot, self._load_message(slot, model), timeout_s)
                for slot in self.slots
                if self._alive(slot)
            ),
            return_exceptions=True,
        )
        errors = [str(r) if isinstance(r, BaseException) else r.message for r in replies if not _ok(r)]
        if errors:
            raise EngineRefused("; ".join(errors))
        self.model = model
        for slot in self.slots:
            if self._alive(slot):
                slot.model_version = model.version

    def _load_message(self, slot: _EngineSlot, model: ServingModel) -> msg.LoadModel:
        overlay = None if model.overlay is None else str(model.overlay)
        return msg.LoadModel(self._new_id(slot), str(model.path), overlay)

    async def catalog_change(self, change: dict[str, Any], timeout_s: float = 30.0) -> None:
        """Apply live catalogue edits in every engine (between two decode steps) and wait for it."""
        if self.model is None:
            raise NotReady("no model loaded yet")
        version = self.model.version
        replies = await asyncio.gather(
            *(
                self._control(slot, msg.CatalogChange(self._new_id(slot), version, **change), timeout_s)
                for slot in self.slots
                if self._alive(slot) and slot.model_version == version
            ),
            return_exceptions=True,
        )
        errors = [str(r) if isinstance(r, BaseException) else r.message for r in replies if not _ok(r)]
        if errors:
            raise EngineRefused("; ".join(errors))

    async def _control(
        self, slot: _EngineSlot, message: msg.LoadModel | msg.CatalogChange, timeout_s: float
    ) -> msg.ControlDone:
        future: asyncio.Future[msg.ControlDone] = asyncio.get_running_loop().create_future()
        slot.controls[message.id] = future
        try:
            await asyncio.wait_for(slot.hello.wait(), timeout_s)  # a PUSH socket has no peer before that
            self._send(slot, message)
            return await asyncio.wait_for(future, timeout_s)
        finally:
            slot.controls.pop(message.id, None)
            self._owner.pop(message.id, None)

    # ---- requests ------------------------------------------------------------------------------------
    def admit(self, cost: Cost, deadline: float) -> tuple[_EngineSlot, float | None]:
        """The engine that would answer soonest, or Overloaded (429) / NotReady (503)."""
        version = None if self.model is None else self.model.version
        ready = [s for s in self.slots if version is not None and s.model_version == version and self._alive(s)]
        if not ready:
            raise NotReady("no engine is ready (starting, or restarting after a failure)")
        s = self.settings
        waiting = sum(max(0, len(slot.pending) - s.max_batch_size) for slot in ready)
        if waiting >= s.max_queue * len(ready):
            raise Overloaded(f"queue full ({waiting} requests waiting); retry later")
        best, best_wait = ready[0], None
        for slot in ready:
            if not slot.pending or not slot.timer.fitted:
                return slot, None  # an idle engine always admits: a slow past never locks the service out
            wait = expected_seconds(slot.timer, cost, slot.live_rows, slot.backlog, s.max_beam_budget)
            if best_wait is None or wait < best_wait:
                best, best_wait = slot, wait
        assert best_wait is not None
        limit = deadline - time.monotonic()
        if s.max_queue_wait_ms > 0:
            limit = min(limit, s.max_queue_wait_ms / 1000.0)
        if best_wait * self.margin.factor > limit:
            expected_ms = best_wait * self.margin.factor * 1000
            raise Overloaded(f"expected time to answer {expected_ms:.0f} ms exceeds {limit * 1000:.0f} ms; retry later")
        return best, best_wait

    async def recommend(self, submit: msg.Submit, cost: Cost) -> msg.Finished:
        """Admit, send, and wait for the engine's answer until the request's deadline."""
        if self._stopping:
            raise NotReady("the service is shutting down")
        slot, predicted = self.admit(cost, submit.deadline)
        submit.id = self._new_id(slot)
        try:
            self._send(slot, submit)
        except NotReady:
            self._owner.pop(submit.id, None)
            raise
        future: asyncio.Future[msg.Finished] = asyncio.get_running_loop().create_future()
        pending = _Pending(slot, cost, future, time.monotonic(), predicted)
        slot.pending[submit.id] = pending
        slot.sent_rowsteps += cost.rowsteps
        try:
            remaining = max(0.0, submit.deadline - time.monotonic())
            done = await asyncio.wait_for(asyncio.shield(future), remaining)
        except asyncio.TimeoutError:
            self._cancel(slot, submit.id)
            raise DeadlineExceeded("deadline passed before the answer was ready") from None
        except asyncio.CancelledError:
            self._cancel(slot, submit.id)  # the caller went away: free its rows
            raise
        if predicted is not None:
            self.margin.observe(predicted, time.monotonic() - pending.sent_at)
        return done

    def _cancel(self, slot: _EngineSlot, rid: int) -> None:
        if slot.pending.pop(rid, None) is not None:
            self._owner.pop(rid, None)
            with contextlib.suppress(NotReady):  # a dead engine holds nothing to cancel
                self._send(slot, msg.Cancel(rid))

    def _new_id(self, slot: _EngineSlot) -> int:
        rid = next(self._ids)
        self._owner[rid] = slot
        return rid

    def _send(self, slot: _EngineSlot, message: msg.ToEngine) -> None:
        """Queue a message for the engine without waiting; NotReady when it cannot take it now."""
        if slot.inbox is None:
            raise NotReady("the engine is not running")
        try:
            slot.inbox.send(msg.to_engine_encoder.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            raise NotReady("the engine is not taking requests (restarting or overwhelmed)") from None

    # ---- replies -------------------------------------------------------------------------------------
    async def _read_replies(self) -> None:
        while True:
            raw = await self.outbox.recv(copy=False)
            try:
                reply = msg.from_engine_decoder.decode(raw.buffer)
            except msgspec.DecodeError as exc:
                log.error("undecodable message from an engine", extra={"error": str(exc)})
                continue
            try:
                self._on_reply(reply)
            except Exception:  # the reader must survive anything
                log.exception("engine reply handling failed")

    def _on_reply(self, reply: msg.FromEngine) -> None:
        if isinstance(reply, msg.StepStats):
            self._on_stats(reply)
            return
        if isinstance(reply, msg.Hello):
            if 0 <= reply.engine < len(self.slots) and self.slots[reply.engine].generation == reply.generation:
                self.slots[reply.engine].hello.set()
            return
        slot = self._owner.pop(reply.id, None)
        if slot is None:
            return  # answered already (deadline, cancel) or from a dead incarnation
        if isinstance(reply, msg.ControlDone):
            control = slot.controls.get(reply.id)
            if control is not None and not control.done():
                control.set_result(reply)
            return
        pending = slot.pending.pop(reply.id, None)
        if pending is None or pending.future.done():
            return
        if isinstance(reply, msg.Finished):
            pending.future.set_result(reply)
        else:
            pending.future.set_exception(_FAILURES[reply.kind](reply.message))

    def _on_stats(self, stats: msg.StepStats) -> None:
        if not 0 <= stats.engine < len(self.slots):
            return
        slot = self.slots[stats.engine]
        slot.reported_backlog = stats.backlog_rowsteps
        slot.reported_received = stats.received_rowsteps
        m = self.metrics
        for requests, rows, seconds in stats.steps:
            slot.timer.observe(rows, seconds)
            m.batch_size.observe(requests)
            m.batch_rows.observe(rows)
            m.decode_seconds.observe(seconds)
        for seconds in stats.encodes:
            m.encode_seconds.observe(seconds)
        if stats.invalid_paths:
            m.invalid_beam_paths.inc(stats.invalid_paths)
        m.engine_rows.labels(str(slot.index)).set(stats.live_rows)
        m.queue_depth.set(stats.waiting)

    # ---- supervision ---------------------------------------------------------------------------------
    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_EVERY_S)
            for slot in self.slots:
                if self._stopping or self._alive(slot):
                    continue
                await self._restart(slot)

    async def _restart(self, slot: _EngineSlot) -> None:
        code = None if slot.proc is None else slot.proc.returncode
        log.error("engine process died; restarting it", extra={"engine": slot.index, "exit_code": code})
        self.metrics.engine_restarts.inc()
        self._fail_slot(slot, NotReady("the engine serving this request died; retry"))
        backoff = RESTART_BACKOFF_S[min(slot.restarts, len(RESTART_BACKOFF_S) - 1)]
        slot.restarts = slot.restarts + 1 if time.monotonic() - slot.started_at < 30 else 0
        await asyncio.sleep(backoff)
        self._spawn(slot)
        if self.model is not None:
            asyncio.create_task(self._reload_into(slot, self.model, slot.generation))

    async def _reload_into(self, slot: _EngineSlot, model: ServingModel, generation: int) -> None:
        """Give a restarted engine the serving model; it serves again once loaded."""
        try:
            reply = await self._control(slot, self._load_message(slot, model), 600.0)
        except (asyncio.TimeoutError, ServiceError) as exc:
            log.error("restarted engine did not load the model", extra={"engine": slot.index, "error": repr(exc)})
            return  # it died again (the supervisor restarts it) or hangs (it stays unready: visible)
        if not reply.ok:
            log.error("restarted engine refused the model", extra={"engine": slot.index, "error": reply.message})
        elif slot.generation == generation and self.model is model:
            slot.model_version = model.version
            log.info("engine serving again", extra={"engine": slot.index, "version": model.version})

    def _fail_slot(self, slot: _EngineSlot, error: ServiceError) -> None:
        for rid, pending in list(slot.pending.items()):
            self._owner.pop(rid, None)
            if not pending.future.done():
                pending.future.set_exception(error)
        slot.pending.clear()
        slot.reported_backlog = slot.reported_received = slot.sent_rowsteps = 0
        for rid, control in list(slot.controls.items()):
            self._owner.pop(rid, None)
            if not control.done():
                control.set_exception(error)
        slot.model_version = None

    def _fail_all(self, error: ServiceError) -> None:
        for slot in self.slots:
            self._fail_slot(slot, error)


def _ok(reply: object) -> bool:
    return isinstance(reply, msg.ControlDone) and reply.ok
