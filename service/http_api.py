"""HTTP front end (FastAPI under uvicorn): DESIGN.md 4.2.

A pure-ASGI middleware (`FrontDoor`) wraps every request: it takes the request id from X-Request-ID
(or makes one) and puts it in the log context and the response headers, refuses bodies over
max_body_bytes with 413 before anything parses them, and records the request count, latency and one
JSON access-log line. Errors are always JSON: {"error": {"code", "message", "field", "request_id"}}.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.auth import check_admin_token
from service.errors import (
    BodyTooLarge,
    DeadlineExceeded,
    FeatureStoreUnavailable,
    InvalidArgument,
    NotReady,
    RequestTimeout,
    ServiceError,
    events_write_failed,
    outcome_for_status,
)
from service.features import FeatureStoreError
from service.logs import get_logger, request_id_var
from service.recommend import new_request_id
from service.schemas import (
    MAX_POPULAR_ITEMS,
    CatalogAddBody,
    CatalogEditResponse,
    CatalogItemsBody,
    ErrorResponse,
    EventsBody,
    EventsResponse,
    RecommendBody,
    RecommendResponse,
    ReloadBody,
    format_validation_errors,
)
from service.state import AppState

log = get_logger("http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENDPOINTS = frozenset(
    {
        "/v1/recommend",
        "/v1/events",
        "/v1/models",
        "/v1/models/reload",
        "/v1/catalog/withdraw",
        "/v1/catalog/restore",
        "/v1/catalog/add",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/docs",
    }
)
QUIET_ENDPOINTS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes: access-logged at debug only


def error_body(error: ServiceError) -> dict[str, Any]:
    return {
        "error": {
            "code": error.code,
            "message": error.message,
            "field": error.field,
            "request_id": request_id_var.get(),
        }
    }


class FrontDoor:
    """ASGI middleware: request id, body limit (413), metrics and access log."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = new_request_id(headers.get(b"x-request-id", b"").decode("latin-1"))
        token = request_id_var.set(request_id)
        status = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            replay = await self._read_body(scope, receive, headers)
            if isinstance(replay, ServiceError):
                await self._send_error(send_with_id, replay)
            elif replay is _ABANDONED:
                status[0] = 499  # the client hung up before its body was complete: nothing is acted on
            else:
                await self.app(scope, replay, send_with_id)
        finally:
            self._record(scope, status[0], time.perf_counter() - started)
            request_id_var.reset(token)

    def _too_large_message(self) -> str:
        return f"request body larger than {self.state.settings.max_body_bytes} bytes"

    async def _read_body(self, scope: Scope, receive: Receive, headers: dict[bytes, bytes]) -> Any:
        """Buffer the body; a replaying receive, or the error to answer, or _ABANDONED.

        Nothing parses a body before it is complete: one over the size limit is refused (413), one
        that stalls past ``http_body_timeout_s`` is refused (408), and one whose client hung up
        before sending all of it is dropped without an answer, so a half-sent event is never stored.
        """
        settings = self.state.settings
        limit = settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return BodyTooLarge(self._too_large_message(), field="body")
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), settings.http_body_timeout_s)
            except asyncio.TimeoutError:
                return RequestTimeout(f"request body not received within {settings.http_body_timeout_s:g} s")
            if message["type"] != "http.request":
                return _ABANDONED
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return BodyTooLarge(self._too_large_message(), field="body")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if declared is not None and declared.isdigit() and size != int(declared):
            return _ABANDONED  # shorter than declared: the server never acts on part of a request
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    async def _send_error(self, send: Send, error: ServiceError) -> None:
        self.state.metrics.rejections.labels(error.reason).inc()
        response = JSONResponse(error_body(error), status_code=error.http_status, headers={"connection": "close"})
        await response({"type": "http"}, _no_receive, send)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        outcome = outcome_for_status(status)
        metrics = self.state.metrics
        metrics.requests.labels("http", endpoint, outcome).inc()
        metrics.request_duration.labels("http", endpoint, outcome).observe(seconds)
        fields = {
            "api": "http",
            "method": scope.get("method"),
            "path": path,
            "status": status,
            "outcome": outcome,
            "duration_ms": round(seconds * 1000, 3),
        }
        if endpoint in QUIET_ENDPOINTS and status < 400:
            log.debug("request", extra=fields)
        else:
            log.info("request", extra=fields)


_ABANDONED = object()  # _read_body's answer when the client went away mid-body


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(state: AppState) -> Any:
    """The FastAPI application wrapped in the FrontDoor middleware (an ASGI callable)."""
    app = FastAPI(
        title="OneRec recommender",
        version="1",
        description="Generative recommendations (OneRec) over HTTP; the same API is served over gRPC.",
        responses={
            422: {"model": ErrorResponse, "description": "invalid input"},
            413: {"model": ErrorResponse, "description": "body too large"},
        },
    )
    _add_error_handlers(app, state)
    _add_routes(app, state)
    return FrontDoor(app, state)


def _add_error_handlers(app: FastAPI, state: AppState) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        state.metrics.rejections.labels(exc.reason).inc()
        if exc.http_status >= 500 and not isinstance(exc, (NotReady, FeatureStoreUnavailable, DeadlineExceeded)):
            log.error("request failed", extra={"code": exc.code, "error": exc.message})
        elif isinstance(exc, DeadlineExceeded):  # the caller's own budget: anyone can ask for 1 ms
            log.warning("request failed", extra={"code": exc.code, "error": exc.message})
        headers = {"retry-after": "1"} if exc.http_status in (429, 503) else None
        return JSONResponse(error_body(exc), status_code=exc.http_status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = format_validation_errors(list(exc.errors()))
        error = InvalidArgument(message, field=field)
        state.metrics.rejections.labels(error.reason).inc()
        return JSONResponse(error_body(error), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # the body did not parse: the documented 422, naming the body, counted
            error = InvalidArgument(f"body: {exc.detail}", field="body")
            state.metrics.rejections.labels(error.reason).inc()
            return JSONResponse(error_body(error), status_code=422)
        code = outcome_for_status(exc.status_code)
        body = {
            "error": {
                "code": code,
                "message": str(exc.detail),
                "field": None,
                "request_id": request_id_var.get(),
            }
        }
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        body = {
            "error": {
                "code": "internal",
                "message": "internal error",
                "field": None,
                "request_id": request_id_var.get(),
            }
        }
        return JSONResponse(body, status_code=500)


def _add_routes(app: FastAPI, state: AppState) -> None:
    service = state.service

    @app.post("/v1/recommend", response_model=RecommendResponse, tags=["recommend"])
    async def recommend(body: RecommendBody) -> RecommendResponse:
        """Ranked items for a user (DESIGN.md 4.2)."""
        if state.draining:
            raise NotReady("the service is shutting down")
        gauge = state.metrics.inflight.labels("http")
        gauge.inc()
        try:
            deadline = service.deadline_for(body.timeout_ms, None)
            result = await service.recommend(body, request_id_var.get() or new_request_id(), deadline)
        finally:
            gauge.dec()
        return RecommendResponse.model_validate(result)

    @app.post("/v1/events", response_model=EventsResponse, tags=["recommend"])
    async def events(body: EventsBody) -> EventsResponse:
        """Append behaviours to the user's stored history (newest last, trimmed)."""
        try:
            history = await service.record_events(body)
        except FeatureStoreError as exc:
            raise events_write_failed(exc.kind) from None
        return EventsResponse(request_id=request_id_var.get() or "", user_id=body.user_id, history=history)

    @app.get("/v1/models", tags=["models"])
    async def models(
        popular_items: int = Query(
            0,
            ge=0,
            le=MAX_POPULAR_ITEMS,
            description="also list up to this many live item ids, most popular first (load-test traffic)",
        ),
    ) -> dict[str, Any]:
        """The loaded model, version, catalogue size, semantic-ID shape and load time.

        With ``?popular_items=N`` it also lists item ids of the live catalogue, so a load tester can
        make plausible requests knowing nothing but the wire.
        """
        described = state.models.describe()
        if popular_items and described["loaded"]:
            described["popular_items"] = state.models.popular_items(popular_items)
        return described

    async def require_admin(request: Request) -> None:
        """A dependency, so the token is checked before the body is validated: no schema for strangers."""
        check_admin_token(state.settings, request.headers.get("authorization"))

    admin = [Depends(require_admin)]

    @app.post("/v1/models/reload", tags=["models"], dependencies=admin)
    async def reload(body: ReloadBody | None = None) -> dict[str, Any]:
        """Admin: reload the newest valid version, or pin one ({"version": N}). Bearer token required."""
        outcome = await state.models.admin_reload(body.version if body is not None else None)
        return {**outcome.to_dict(), "model": state.models.describe()}

    @app.post("/v1/catalog/withdraw", response_model=CatalogEditResponse, tags=["catalog"], dependencies=admin)
    async def withdraw(body: CatalogItemsBody) -> CatalogEditResponse:
        """Admin: take items out of the live catalogue (no answer after this call contains them)."""
        return CatalogEditResponse(**await state.models.edit_catalog(list(body.items), [], []))

    @app.post("/v1/catalog/restore", response_model=CatalogEditResponse, tags=["catalog"], dependencies=admin)
    async def restore(body: CatalogItemsBody) -> CatalogEditResponse:
        """Admin: make withdrawn items live again."""
        return CatalogEditResponse(**await state.models.edit_catalog([], list(body.items), []))

    @app.post("/v1/catalog/add", response_model=CatalogEditResponse, tags=["catalog"], dependencies=admin)
    async def add(body: CatalogAddBody) -> CatalogEditResponse:
        """Admin: add an item under its semantic-ID path, without retraining."""
        return CatalogEditResponse(**await state.models.edit_catalog([], [], [(body.item_id, list(body.semantic_id))]))

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process and its event loop answer."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> Response:
        """Readiness: a warmed model serves and the process is not draining; feature-store state reported."""
        store_ok = await state.features.ping()
        body = {
            "ready": state.ready,
            "draining": state.draining,
            "model": state.models.describe(),
            "feature_store": {**state.features.describe(), "ok": store_ok},
        }
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        """Prometheus text exposition."""
        state.metrics.ready.set(1 if state.ready else 0)
        state.metrics.engines_ready.set(state.engines.ready_engines())
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
