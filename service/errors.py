"""Service errors, each mapped once to an HTTP status, a gRPC code and a rejection reason.

Both front ends raise and translate the same exceptions, so a caller sees the same meaning whatever
the transport (DESIGN.md 4.2 and 4.3), and the rejections metric is labelled the same way.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base: an expected failure with a client-facing message."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    code = "internal"  # machine-readable error code in the JSON body
    reason = "internal"  # label of onerec_rejections_total

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(ServiceError):
    """Bad input: 422 / INVALID_ARGUMENT; the message names the field."""

    http_status = 422
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    code = "invalid_argument"
    reason = "invalid"


class BodyTooLarge(ServiceError):
    """Request body over max_body_bytes: 413 / RESOURCE_EXHAUSTED."""

    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = "body_too_large"
    reason = "body_too_large"


class RequestTimeout(ServiceError):
    """The request body stalled past http_body_timeout_s: 408 (HTTP only)."""

    http_status = 408
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    code = "request_timeout"
    reason = "body_timeout"


class Overloaded(ServiceError):
    """Batcher queue full: 429 / RESOURCE_EXHAUSTED, answered at once."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = "overloaded"
    reason = "queue_full"


class NotReady(ServiceError):
    """No model loaded and warmed yet, or the process is draining: 503 / UNAVAILABLE."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    code = "not_ready"
    reason = "not_ready"


class FeatureStoreUnavailable(ServiceError):
    """A write to the feature store failed (reads degrade instead): 503 / UNAVAILABLE."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    code = "feature_store_unavailable"
    reason = "feature_store"


class EventsOutcomeUnknown(ServiceError):
    """The feature store did not confirm an events write in time; it may have landed: 504.

    Retry contract (README): 503 feature_store_unavailable means nothing was stored (safe to retry);
    504 events_outcome_unknown means the write may have landed (a retry may store the events twice).
    """

    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    code = "events_outcome_unknown"
    reason = "feature_store"


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its answer was ready: 504 / DEADLINE_EXCEEDED."""

    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    code = "deadline_exceeded"
    reason = "deadline"


class Unauthorized(ServiceError):
    """Admin endpoint without the right bearer token: 401 / UNAUTHENTICATED."""

    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    code = "unauthorized"
    reason = "unauthorized"


class NotFound(ServiceError):
    """Admin endpoint switched off (no admin token configured), or unknown version: 404."""

    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    code = "not_found"
    reason = "not_found"


class Conflict(ServiceError):
    """A reload was refused (corrupt or missing version); the serving model stays: 409."""

    http_status = 409
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    code = "reload_refused"
    reason = "reload_refused"


_OUTCOMES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "body_too_large",
    422: "invalid",
    429: "overloaded",
    499: "client_closed",
    503: "unavailable",
    504: "deadline_exceeded",
}


def outcome_for_status(status: int) -> str:
    """Closed set of outcome labels shared by both front ends."""
    if 200 <= status < 400:
        return "ok"
    return _OUTCOMES.get(status, "internal" if status >= 500 else "client_error")


def events_write_failed(kind: str) -> ServiceError:
    """The error to answer when an events write failed with a FeatureStoreError of this kind."""
    if kind == "timeout":
        return EventsOutcomeUnknown("feature store did not confirm in time; the events may or may not be stored")
    return FeatureStoreUnavailable(f"feature store unavailable ({kind}); events not stored")
