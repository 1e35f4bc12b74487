"""The front-end process: uvicorn (HTTP) and grpc.aio (gRPC) on one event loop, and the engines it runs.

Start order: start the engine processes (``service.engine``), bind both front ends (liveness answers
at once, readiness says 503), preload the embedded feature store if asked, then have every engine load
and warm the newest valid model; readiness turns true when it is swapped in. A background task then
polls the store for newer versions, and the engine pool's supervisor restarts an engine that dies.

SIGTERM / SIGINT: readiness goes false (gRPC health NOT_SERVING), both front ends stop accepting and
let in-flight requests finish, the engines finish what they hold and exit, the feature store and the
capture writer are closed, and the process exits 0. One budget, ``drain_timeout_s``, bounds the whole
drain. A second signal forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.capture import CaptureWriter
from service.engine.client import EnginePool
from service.features import make_feature_store
from service.grpc_api import GrpcFrontEnd
from service.http_api import create_app
from service.logs import configure_logging, get_logger, redact_url
from service.metrics import ServiceMetrics
from service.models import ModelManager
from service.recommend import RecommendService
from service.settings import Settings
from service.state import AppState

log = get_logger("server")


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers.

    uvicorn cancels its keep-alive timer on every byte received and sets none before the first
    request, so a client that connects and sends nothing, or drips a header a byte at a time, holds a
    connection (and its memory) forever. Here every wait for a request's headers, the first one and
    each one after a keep-alive response, must end within ``header_timeout_s``.
    """

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm_header_timer()  # headers are in: the body has its own timeout (FrontDoor)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


def _guarded_protocol(header_timeout_s: float) -> type[_GuardedH11]:
    return type("GuardedH11", (_GuardedH11,), {"header_timeout_s": header_timeout_s})


class _UvicornServer(uvicorn.Server):
    """uvicorn without its own signal handling: this process decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build_state(settings: Settings) -> tuple[AppState, CaptureWriter | None]:
    """Wire the components of one front-end process (no model loaded yet; engines not started)."""
    metrics = ServiceMetrics()
    features = make_feature_store(settings, metrics)
    capture = None
    if settings.capture_path is not None:
        capture = CaptureWriter(settings.capture_path, settings.capture_rate, settings.capture_max_bytes, metrics)
    engines = EnginePool(settings, metrics)
    models = ModelManager(settings, metrics, engines)
    service = RecommendService(settings, models, engines, features, metrics, capture)
    return AppState(settings, metrics, models, service, features, engines), capture


class ServiceProcess:
    """Runs until told to stop; `run()` returns the exit code."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state, self.capture = build_state(settings)
        self.grpc = GrpcFrontEnd(self.state)
        self.stop_requested = asyncio.Event()
        self._signals = 0

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        log.info("signal received; draining", extra={"signal": signal.Signals(signum).name})
        if self._signals > 1:
            log.warning("second signal: exiting without draining")
            os._exit(1)
        self.stop_requested.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        s = self.settings
        await self.state.engines.start()
        grpc_port = await self.grpc.start(s.grpc_host, s.grpc_port)
        http = _UvicornServer(
            uvicorn.Config(
                create_app(self.state),
                host=s.http_host,
                port=s.http_port,
                lifespan="off",
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=int(max(1, s.drain_timeout_s)),
                timeout_keep_alive=5,
                http=_guarded_protocol(s.http_header_timeout_s),
                limit_concurrency=s.max_connections,
            )
        )
        http_task = asyncio.create_task(http.serve(), name="http")
        while not http.started:
            if http_task.done():
                await http_task  # surfaces the bind error
                log.error("HTTP server exited during start")
                return 1
            await asyncio.sleep(0.01)
        log.info(
            "listening",
            extra={
                "http_port": _bound_port(http) or s.http_port,
                "grpc_port": grpc_port,
                "feature_store": self.state.features.describe(),
            },
        )
        await self._preload_features()
        lifecycle = asyncio.create_task(self._lifecycle(), name="models")
        stop_wait = asyncio.create_task(self.stop_requested.wait())
        await asyncio.wait({stop_wait, http_task}, return_when=asyncio.FIRST_COMPLETED)
        await self._shutdown(http, http_task, lifecycle)
        return 0

    async def _preload_features(self) -> None:
        path = self.settings.features_preload
        if path is None:
            return
        from onerec.data import read_histories  # the one sequence-file parser; numpy, only when preloading

        histories = await asyncio.to_thread(read_histories, path, strict=False)
        written = await self.state.features.load_histories(histories, self.settings.max_request_history)
        log.info("feature store preloaded", extra={"users": written, "path": str(path)})

    async def _lifecycle(self) -> None:
        """First load + warm-up, then polling for new versions; readiness follows the engines meanwhile."""
        models = self.state.models
        polling = asyncio.create_task(models.poll_forever())
        watching = asyncio.create_task(self._follow_readiness())
        try:
            await polling
            await watching
        finally:
            watching.cancel()

    async def _follow_readiness(self) -> None:
        """Mirror readiness into gRPC health and the ready gauge: it drops while an engine restarts."""
        ready = False
        while True:
            now = self.state.ready
            if now != ready:
                ready = now
                self.state.metrics.ready.set(1 if ready else 0)
                await self.grpc.set_serving(ready)
                log.info("ready" if ready else "not ready", extra={"model": self.state.models.describe()})
            await asyncio.sleep(0.05)

    async def _shutdown(self, http: _UvicornServer, http_task: asyncio.Task[Any], lifecycle: asyncio.Task[Any]) -> None:
        """Drain within one budget: front ends and engines share ``drain_timeout_s``, they do not add up."""
        s = self.settings
        ends_at = time.monotonic() + s.drain_timeout_s
        self.state.draining = True
        self.state.metrics.ready.set(0)
        lifecycle.cancel()
        log.info("draining", extra={"timeout_s": s.drain_timeout_s})
        http.should_exit = True
        await asyncio.gather(self.grpc.stop(s.drain_timeout_s), http_task, return_exceptions=True)
        await self.state.engines.stop(max(0.0, ends_at - time.monotonic()))
        await self.state.features.close()
        if self.capture is not None:
            await asyncio.to_thread(self.capture.close)
        log.info("stopped", extra={"drain_s": round(s.drain_timeout_s - max(0.0, ends_at - time.monotonic()), 3)})


def _bound_port(http: uvicorn.Server) -> int | None:
    for server in getattr(http, "servers", []):
        for sock in server.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                return int(sock.getsockname()[1])
    return None


def serve(settings: Settings) -> int:
    """Entry point of `onerec serve` / `python -m service`."""
    configure_logging(settings.log_level)
    shown = settings.model_dump(mode="json", exclude={"admin_token"})
    shown["redis_url"] = redact_url(settings.redis_url)
    log.info("starting", extra={"settings": shown})
    return asyncio.run(_run(settings))


async def _run(settings: Settings) -> int:
    # built inside the running loop: grpc.aio binds its server to the loop current at creation
    return await ServiceProcess(settings).run()
