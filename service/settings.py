"""The service's single configuration object.

Every knob of `onerec serve` lives here, read from the environment with the prefix ONEREC_
(e.g. ONEREC_REDIS_URL, ONEREC_MAX_BATCH_SIZE); command-line flags override the environment by being
passed as init arguments. Keeping one object means the README table, the k8s manifests and the code
cannot drift apart silently: `python -m service.settings` prints the defaults as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of one service process (one replica)."""

    model_config = SettingsConfigDict(
        env_prefix="ONEREC_", extra="ignore", protected_namespaces=(), populate_by_name=True
    )

    # front ends
    http_host: str = Field(default="0.0.0.0", description="HTTP bind address")
    http_port: int = Field(default=8000, ge=0, le=65535, description="HTTP port (0 = pick a free one)")
    grpc_host: str = Field(default="0.0.0.0", description="gRPC bind address")
    grpc_port: int = Field(default=50051, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    http_header_timeout_s: float = Field(
        default=10.0, gt=0, description="close an HTTP connection whose request headers take longer than this"
    )
    http_body_timeout_s: float = Field(
        default=10.0, gt=0, description="answer 408 and close when a request body stalls longer than this"
    )
    max_connections: int = Field(
        default=2048, ge=1, description="HTTP connections and requests at once; beyond it new ones get 503"
    )
    grpc_max_connection_age_s: float = Field(
        default=300.0, gt=0, description="gRPC connections are recycled after this (streams left idle end with it)"
    )

    # model lifecycle
    model_store: Path = Field(default=Path("./model-store"), description="model store root directory")
    model_name: str | None = Field(default=None, description="model to serve (None = the only model in the store)")
    pin_version: int | None = Field(default=None, ge=1, description="serve exactly this version (no auto upgrade)")
    poll_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="how often to look for a newer version (0 = never; admin reload still works)",
    )
    device: str = Field(default="cpu", description="torch device for the model: cpu or cuda")
    kernels: Literal["auto", "torch", "triton"] = Field(
        default="auto",
        description="kernel backend of the model's hot path: auto (Triton on CUDA, PyTorch elsewhere), or force one",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads (None = usable cores - 1, at least 1)"
    )

    # feature store
    redis_url: str | None = Field(default=None, description="Redis URL; None = embedded in-process store")
    redis_timeout_ms: float = Field(default=20.0, gt=0, description="budget of one feature-store call")
    redis_retry_after_ms: float = Field(
        default=500.0,
        ge=0,
        description="after a Redis failure, skip Redis this long (answer degraded at once)",
    )
    redis_history_ttl_s: int = Field(
        default=30 * 24 * 3600,
        ge=0,
        description="Redis history keys expire this long after their last write (0 = never)",
    )
    embedded_max_users: int = Field(
        default=100_000, ge=1, description="embedded store: users kept (least recently used evicted beyond it)"
    )
    features_preload: Path | None = Field(
        default=None, description="sequence file (user item item ...) loaded into the embedded store at start"
    )

    # engines and their scheduler
    engines: int = Field(
        default=1,
        ge=1,
        le=64,
        description="engine processes behind the front end: one per GPU, or on CPU one per core "
        "(each holds a copy of the model)",
    )
    scheduler: Literal["continuous", "batch"] = Field(
        default="continuous",
        description="continuous: requests join the running rows between decode steps; "
        "batch: a new batch starts only when the last one is done (for comparison)",
    )
    max_batch_size: int = Field(default=16, ge=1, description="live requests per engine (1 = batching off)")
    max_beam_budget: int = Field(default=2048, ge=1, description="live decoder rows (sum of beam widths) per engine")
    max_queue: int = Field(default=256, ge=1, description="requests waiting per engine beyond the live ones before 429")
    max_queue_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="429 at once when the expected time to answer (the engine's backlog of rows x steps, priced "
        "by the measured time per decode step) "
        "exceeds this or the request's deadline (0 = the deadline alone); set it to the latency budget",
    )
    request_timeout_ms: float = Field(
        default=2000.0,
        gt=0,
        description="deadline of a request that gives neither timeout_ms nor a gRPC deadline",
    )
    max_request_timeout_ms: float = Field(
        default=60000.0,
        gt=0,
        description="longest deadline honoured: a caller's timeout_ms or gRPC deadline is cut to this",
    )

    # request limits
    default_beam_width: int = Field(default=32, ge=1, description="beam width when the request gives none")
    max_beam_width: int = Field(default=256, ge=1, description="largest accepted beam_width")
    default_num_items: int = Field(default=10, ge=1, description="num_items when the request gives none")
    max_num_items: int = Field(default=100, ge=1, description="largest accepted num_items")
    max_request_history: int = Field(
        default=1024,
        ge=1,
        # ONEREC_MAX_HISTORY is this setting's first name, still read (the model's window is history_window)
        validation_alias=AliasChoices("ONEREC_MAX_REQUEST_HISTORY", "ONEREC_MAX_HISTORY", "max_request_history"),
        description="largest accepted history / exclude / events list of a request",
    )
    max_body_bytes: int = Field(default=65536, ge=1024, description="largest accepted request body (HTTP and gRPC)")

    # operations
    admin_token: str | None = Field(default=None, description="bearer token of POST /v1/models/reload (None = off)")
    drain_timeout_s: float = Field(default=20.0, ge=0, description="SIGTERM: longest wait for in-flight requests")
    capture_path: Path | None = Field(default=None, description="JSON Lines trace of sampled requests (None = off)")
    capture_rate: float = Field(default=0.01, ge=0, le=1, description="share of recommend requests captured")
    capture_max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="rotate the capture file (one .1 kept) at this size"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="log level")

    @field_validator("kernels", mode="before")
    @classmethod
    def _kernels_spelling(cls, value: object) -> object:
        """ONEREC_KERNELS as kernels/ read it before it became a setting: any case, empty = auto."""
        if isinstance(value, str):
            return value.strip().lower() or "auto"
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        """Refuse settings whose defaults contradict their own limits, at start, not per request."""
        if self.default_beam_width > self.max_beam_width:
            raise ValueError("default_beam_width must be <= max_beam_width")
        if self.default_num_items > self.max_num_items:
            raise ValueError("default_num_items must be <= max_num_items")
        if self.request_timeout_ms > self.max_request_timeout_ms:
            raise ValueError("request_timeout_ms must be <= max_request_timeout_ms")
        return self


def effective_torch_threads(configured: int | None) -> int:
    """Configured value, else the usable cores minus one (the front end needs a core), at least 1.

    This is per engine process. Measured on a 2-core machine with the demo model (old in-process
    worker): 1 torch thread answered in about 42 ms at beam 32 where torch's default of 2 took about
    72 ms, because the model and the event loop then fight for both cores.
    """
    if configured:
        return configured
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, cores - 1)


def settings_table() -> list[dict[str, str]]:
    """Rows (env var, default, description) for documentation."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default
        rows.append(
            {
                "env": f"ONEREC_{name.upper()}",
                "default": "" if default is None else str(default),
                "description": field.description or "",
            }
        )
    return rows


if __name__ == "__main__":
    print(json.dumps(settings_table(), indent=1))
