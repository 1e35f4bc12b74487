"""The wire contract in Python: the gRPC modules generated from proto/onerec/v1/recommender.proto.

``from onerec_proto import pb2, pb2_grpc`` gives the messages (``pb2``) and the stub and servicer
base (``pb2_grpc``). The service and the load tester both import them from here; the package imports
nothing of the project, so a load tester that talks to the service only over the wire needs the
contract and nothing else.

The modules are generated (``onerec_proto/generate.py``) into ``onerec_proto/_generated/`` at install
time and again on first use when missing or stale. They are looked up on first attribute access,
not when the package is imported, so that ``python -m onerec_proto.generate --check`` (which imports
this package first) sees the stubs as they are on disk rather than freshly regenerated.
"""

from __future__ import annotations

from typing import Any

__all__ = ["pb2", "pb2_grpc"]


def __getattr__(name: str) -> Any:
    """``pb2`` / ``pb2_grpc``: regenerate the stubs if needed, then import and keep them."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from onerec_proto.generate import ensure_stubs

    ensure_stubs()
    from onerec_proto._generated import recommender_pb2, recommender_pb2_grpc

    globals().update(pb2=recommender_pb2, pb2_grpc=recommender_pb2_grpc)
    return globals()[name]
