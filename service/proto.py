"""The generated gRPC modules, regenerated first when missing or stale (see service/proto_gen.py).

Import `pb2` (messages) and `pb2_grpc` (stubs and servicer base) from here, never from service._proto
directly, so a fresh clone or an edited .proto works without a manual build step.
"""

from __future__ import annotations

from typing import Any

from service.proto_gen import ensure_stubs

ensure_stubs()

from service._proto import recommender_pb2, recommender_pb2_grpc  # noqa: E402

pb2: Any = recommender_pb2
pb2_grpc: Any = recommender_pb2_grpc

__all__ = ["pb2", "pb2_grpc"]
