"""gRPC front end (grpc.aio, on the same event loop as uvicorn): DESIGN.md 4.3.

Requests are converted to the HTTP body models and validated by the same code, so both front ends
accept and refuse exactly the same inputs and give the same answers. The client's deadline is
honoured (the earlier of it and timeout_ms). The standard grpc.health.v1.Health service reports
SERVING once a model is warm (and NOT_SERVING while draining), and server reflection lists the
services. The request id comes from the `x-request-id` metadata when given and is returned both in
the response and as trailing metadata.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from onerec_proto import pb2, pb2_grpc
from service.auth import check_admin_token
from service.errors import InvalidArgument, NotReady, ServiceError, events_write_failed, outcome_for_status
from service.features import FeatureStoreError
from service.logs import get_logger, request_id_var
from service.recommend import new_request_id
from service.schemas import CatalogAddBody, CatalogItemsBody, EventsBody, RecommendBody, format_validation_errors
from service.state import AppState

log = get_logger("grpc")
SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["Recommender"].full_name


def _is_repeated(field: Any) -> bool:
    """Newer protobuf says so with ``is_repeated`` (and has dropped ``label``); older ones with ``label``."""
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(field.label == field.LABEL_REPEATED)


# RecommendRequest's fields as (name, repeated, has presence), read once from the descriptor.
_RECOMMEND_FIELDS: tuple[tuple[str, bool, bool], ...] = tuple(
    (field.name, _is_repeated(field), bool(field.has_presence))
    for field in pb2.DESCRIPTOR.message_types_by_name["RecommendRequest"].fields
)


def recommend_body_from_proto(message: Any) -> RecommendBody:
    """The HTTP body model from a RecommendRequest, read field by field as the proto declares them.

    An unset ``optional`` field and an empty repeated one are absent JSON fields (the server's
    default applies); a plain scalar (``user_id``) is always passed, so an empty one is refused by
    the same validation as over HTTP. Reading the descriptor keeps this in step with the proto.
    """
    data: dict[str, Any] = {}
    for name, repeated, has_presence in _RECOMMEND_FIELDS:
        value = getattr(message, name)
        if repeated:
            if value:
                data[name] = list(value)
        elif not has_presence or message.HasField(name):
            data[name] = value
    return _validate(RecommendBody, data)


def _validate(model: Any, data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, field = format_validation_errors(list(exc.errors()))  # type: ignore[arg-type]
        raise InvalidArgument(message, field=field) from None


def recommend_response_to_proto(result: dict[str, Any]) -> Any:
    return pb2.RecommendResponse(
        request_id=result["request_id"],
        model=pb2.ModelRef(name=result["model"]["name"], version=result["model"]["version"]),
        items=[
            pb2.Item(item_id=it["item_id"], score=it["score"], semantic_id=it["semantic_id"]) for it in result["items"]
        ],
        degraded=result["degraded"],
    )


@dataclass(frozen=True)
class _Malformed:
    """A request body that did not parse: the servicer answers INVALID_ARGUMENT (not grpc's UNKNOWN)."""

    kind: str
    error: str


def _lenient(message_class: Any) -> Any:
    """A request deserializer that hands a parse failure to the servicer instead of raising in grpc."""

    def parse(raw: bytes) -> Any:
        try:
            return message_class.FromString(raw)
        except DecodeError as exc:
            return _Malformed(message_class.DESCRIPTOR.name, str(exc) or "undecodable bytes")

    return parse


def _add_recommender(servicer: Any, server: grpc.aio.Server) -> None:
    """Register onerec.v1.Recommender as the generated helper does, with lenient deserializers."""
    service = pb2.DESCRIPTOR.services_by_name["Recommender"]
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=_lenient(getattr(pb2, method.input_type.name)),
            response_serializer=getattr(pb2, method.output_type.name).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


class RecommenderServicer(pb2_grpc.RecommenderServicer):  # type: ignore[misc]
    """onerec.v1.Recommender."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def Recommend(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._call("Recommend", context, self._recommend, request)

    async def RecordEvents(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._call("RecordEvents", context, self._record_events, request)

    async def WithdrawItems(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._call("WithdrawItems", context, self._catalog_edit("withdraw"), request)

    async def RestoreItems(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._call("RestoreItems", context, self._catalog_edit("restore"), request)

    async def AddItem(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._call("AddItem", context, self._catalog_edit("add"), request)

    def _catalog_edit(self, op: str) -> Any:
        """Handler of one admin RPC: the token first (an anonymous caller learns nothing), then the HTTP edit."""

        async def handler(request: Any, context: grpc.aio.ServicerContext, request_id: str) -> Any:
            metadata = dict(context.invocation_metadata() or ())
            check_admin_token(self.state.settings, str(metadata.get("authorization", "")))
            models = self.state.models
            if op == "add":
                body = _validate(CatalogAddBody, {"item_id": request.item_id, "semantic_id": list(request.semantic_id)})
                result = await models.edit_catalog([], [], [(body.item_id, list(body.semantic_id))])
            else:
                items = list(_validate(CatalogItemsBody, {"items": list(request.items)}).items)
                result = await models.edit_catalog(
                    items if op == "withdraw" else [], items if op == "restore" else [], []
                )
            return pb2.CatalogEditResponse(**result)

        return handler

    async def _recommend(self, request: Any, context: grpc.aio.ServicerContext, request_id: str) -> Any:
        if self.state.draining:
            raise NotReady("the service is shutting down")
        body = recommend_body_from_proto(request)
        service = self.state.service
        deadline = service.deadline_for(body.timeout_ms, context.time_remaining())
        gauge = self.state.metrics.inflight.labels("grpc")
        gauge.inc()
        try:
            result = await service.recommend(body, request_id, deadline)
        finally:
            gauge.dec()
        return recommend_response_to_proto(result)

    async def _record_events(self, request: Any, context: grpc.aio.ServicerContext, request_id: str) -> Any:
        body = _validate(EventsBody, {"user_id": request.user_id, "items": list(request.items)})
        try:
            history = await self.state.service.record_events(body)
        except FeatureStoreError as exc:
            raise events_write_failed(exc.kind) from None
        return pb2.RecordEventsResponse(request_id=request_id, user_id=body.user_id, history=history)

    async def _call(self, endpoint: str, context: grpc.aio.ServicerContext, handler: Any, request: Any) -> Any:
        """Request id, metrics, access log and error-to-status mapping around one RPC."""
        started = time.perf_counter()
        metadata = dict(context.invocation_metadata() or ())
        request_id = new_request_id(str(metadata.get("x-request-id", "")))
        token = request_id_var.set(request_id)
        context.set_trailing_metadata((("x-request-id", request_id),))
        status = 200
        try:
            if isinstance(request, _Malformed):
                raise InvalidArgument(f"body: not a valid {request.kind} message ({request.error})", field="body")
            return await handler(request, context, request_id)
        except ServiceError as exc:
            status = exc.http_status
            self.state.metrics.rejections.labels(exc.reason).inc()
            await context.abort(exc.grpc_code, exc.message)
        except asyncio.CancelledError:  # the caller cancelled or went away: not a success, not our error
            status = 499
            raise
        except Exception:
            if context.cancelled():
                status = 499
                raise
            status = 500
            log.exception("unhandled error", extra={"endpoint": endpoint})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            self._record(endpoint, status, time.perf_counter() - started)
            request_id_var.reset(token)

    def _record(self, endpoint: str, status: int, seconds: float) -> None:
        outcome = "cancelled" if status == 499 else outcome_for_status(status)
        metrics = self.state.metrics
        metrics.requests.labels("grpc", endpoint, outcome).inc()
        metrics.request_duration.labels("grpc", endpoint, outcome).observe(seconds)
        log.info(
            "request",
            extra={
                "api": "grpc",
                "method": endpoint,
                "status": status,
                "outcome": outcome,
                "duration_ms": round(seconds * 1000, 3),
            },
        )


class GrpcFrontEnd:
    """The grpc.aio server with the Recommender, health and reflection services."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        s = state.settings
        age_ms = int(s.grpc_max_connection_age_s * 1000)
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", s.max_body_bytes),
                ("grpc.so_reuseport", 0),
                # Idle or abandoned connections cost nothing for long: closed when idle, recycled by age
                # (a stream that never sends its message ends with its connection), dead peers found
                # by keepalive pings.
                ("grpc.server_handshake_timeout_ms", int(s.http_header_timeout_s * 1000)),
                ("grpc.max_connection_idle_ms", int(s.http_header_timeout_s * 6000)),
                ("grpc.max_connection_age_ms", age_ms),
                ("grpc.max_connection_age_grace_ms", int(s.drain_timeout_s * 1000)),
                ("grpc.keepalive_time_ms", 60000),
                ("grpc.keepalive_timeout_ms", 20000),
                ("grpc.max_concurrent_streams", 256),
            ]
        )
        _add_recommender(RecommenderServicer(state), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {host}:{port}")
        await self.set_serving(False)
        await self.server.start()
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def stop(self, grace: float) -> None:
        """Refuse new RPCs now, let in-flight ones finish within `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
