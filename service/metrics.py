"""Prometheus metrics of the service (prefix onerec_, base units, low-cardinality labels).

All families live on one registry owned by the process (not the global default registry), so tests
can build several services in one interpreter and the exposition carries only what we define plus
the process/platform collectors. Label values are closed sets (api, endpoint, outcome, reason,
backend, op, result): never user ids, item ids or versions except in onerec_model_info.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

# Latency buckets from 1 ms to 10 s: the CPU demo answers in milliseconds, big beams take longer.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)

# Every family name a scrape must carry (tests and the dashboard rely on this list).
FAMILIES = (
    "onerec_requests",
    "onerec_request_duration_seconds",
    "onerec_queue_wait_seconds",
    "onerec_queue_depth",
    "onerec_inflight_requests",
    "onerec_batch_size",
    "onerec_batch_rows",
    "onerec_batch_encode_seconds",
    "onerec_batch_decode_seconds",
    "onerec_rejections",
    "onerec_feature_store_duration_seconds",
    "onerec_feature_store_hits",
    "onerec_feature_store_misses",
    "onerec_feature_store_errors",
    "onerec_feature_store_evictions",
    "onerec_unknown_event_items",
    "onerec_degraded_responses",
    "onerec_unknown_history_items",
    "onerec_model_info",
    "onerec_model_reloads",
    "onerec_model_versions_rejected",
    "onerec_ready",
    "onerec_invalid_beam_paths",
    "onerec_guarantee_violations",
    "onerec_capture_records",
    "onerec_engine_restarts",
    "onerec_engine_rows",
    "onerec_engines_ready",
    "onerec_catalog_changes",
)


class ServiceMetrics:
    """The metric families of one service process, on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None, process_collectors: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if process_collectors:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "onerec_requests",
            "Requests answered, by front end, endpoint and outcome (ok or an error code).",
            ["api", "endpoint", "outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            "onerec_request_duration_seconds",
            "Time from receiving a request to its answer, by front end, endpoint and outcome.",
            ["api", "endpoint", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "onerec_queue_wait_seconds",
            "Time a request waited in its engine before its first decode step.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "onerec_queue_depth", "Requests waiting in an engine for rows to free (last engine report).", registry=r
        )
        self.inflight = Gauge("onerec_inflight_requests", "Recommend requests being served now.", ["api"], registry=r)
        self.batch_size = Histogram(
            "onerec_batch_size", "Requests per decode step (the live row set).", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "onerec_batch_rows",
            "Decoder rows (requests x beams) per decode step.",
            buckets=(32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            registry=r,
        )
        self.encode_seconds = Histogram(
            "onerec_batch_encode_seconds",
            "Encoder time of a decode step at which requests joined.",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "onerec_batch_decode_seconds",
            "Time of one decode step over all live rows of an engine.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "onerec_rejections",
            "Requests refused, by reason (invalid, body_too_large, queue_full, deadline, not_ready, ...).",
            ["reason"],
            registry=r,
        )
        self.fs_duration = Histogram(
            "onerec_feature_store_duration_seconds",
            "Feature-store call latency, by backend and operation.",
            ["backend", "op"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.fs_hits = Counter(
            "onerec_feature_store_hits", "History reads that found a stored history.", ["backend"], registry=r
        )
        self.fs_misses = Counter(
            "onerec_feature_store_misses",
            "History reads for users with no stored history.",
            ["backend"],
            registry=r,
        )
        self.fs_errors = Counter(
            "onerec_feature_store_errors",
            "Feature-store calls that failed, by operation and kind (timeout, connection, skipped, other).",
            ["backend", "op", "kind"],
            registry=r,
        )
        self.fs_evictions = Counter(
            "onerec_feature_store_evictions",
            "Users evicted from the embedded store (least recently used, beyond its bound).",
            ["backend"],
            registry=r,
        )
        self.unknown_event_items = Counter(
            "onerec_unknown_event_items",
            "Event item ids not in the serving catalogue (dropped at write time, not stored).",
            registry=r,
        )
        self.degraded = Counter(
            "onerec_degraded_responses",
            "Answers marked degraded, by reason (feature_store: stored history unavailable).",
            ["reason"],
            registry=r,
        )
        self.unknown_history_items = Counter(
            "onerec_unknown_history_items",
            "History item ids not in the serving catalogue (ignored).",
            registry=r,
        )
        self.model_info = Gauge(
            "onerec_model_info",
            "The serving model: 1 for its name and version.",
            ["name", "version"],
            registry=r,
        )
        self.model_reloads = Counter(
            "onerec_model_reloads",
            "Model load attempts by result (loaded, unchanged, refused, error).",
            ["result"],
            registry=r,
        )
        self.versions_rejected = Counter(
            "onerec_model_versions_rejected",
            "Model versions refused because they failed verification or loading.",
            registry=r,
        )
        self.ready = Gauge("onerec_ready", "1 when a warmed model serves and the process is not draining.", registry=r)
        self.invalid_beam_paths = Counter(
            "onerec_invalid_beam_paths",
            "Beams that reached an invalid code path (reported by the generator; must stay 0).",
            registry=r,
        )
        self.guarantee_violations = Counter(
            "onerec_guarantee_violations",
            "Generated items dropped by the service's final check (duplicate, excluded, history, "
            "unknown); must stay 0.",
            ["kind"],
            registry=r,
        )
        self.capture_records = Counter(
            "onerec_capture_records",
            "Captured request records by result (written, dropped).",
            ["result"],
            registry=r,
        )
        self.engine_restarts = Counter(
            "onerec_engine_restarts", "Engine processes that died and were started again.", registry=r
        )
        self.engine_rows = Gauge("onerec_engine_rows", "Live decoder rows per engine.", ["engine"], registry=r)
        self.engines_ready = Gauge(
            "onerec_engines_ready", "Engine processes that have the serving model loaded.", registry=r
        )
        self.catalog_changes = Counter(
            "onerec_catalog_changes",
            "Live catalogue edits applied, by operation (withdraw, restore, add), counted per item.",
            ["op"],
            registry=r,
        )
        self._init_label_sets()

    def _init_label_sets(self) -> None:
        """Create the usual label sets at zero so dashboards and alerts see 0, not 'no data'."""
        for reason in ("invalid", "body_too_large", "queue_full", "deadline", "not_ready", "feature_store"):
            self.rejections.labels(reason)
        self.degraded.labels("feature_store")
        for result in ("loaded", "unchanged", "refused", "error"):
            self.model_reloads.labels(result)
        for result in ("written", "dropped"):
            self.capture_records.labels(result)
        for api in ("http", "grpc"):
            self.inflight.labels(api)
        for kind in ("unknown", "duplicate", "banned"):
            self.guarantee_violations.labels(kind)
        for op in ("withdraw", "restore", "add"):
            self.catalog_changes.labels(op)

    def init_feature_store_labels(self, backend: str) -> None:
        """Zero series for the feature-store families of the backend in use."""
        self.fs_hits.labels(backend)
        self.fs_misses.labels(backend)
        for op in ("get", "append"):
            for kind in ("timeout", "connection", "skipped", "other"):
                self.fs_errors.labels(backend, op, kind)

    def exposition(self) -> bytes:
        """The text exposition of this registry (what GET /metrics returns)."""
        return generate_latest(self.registry)
