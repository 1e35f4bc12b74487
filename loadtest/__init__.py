"""Load testing for the OneRec service: trace format, trace synthesis, open-loop replay and reports.

The package talks to the service only over the wire (HTTP or gRPC), so it runs on a machine that has
the wire and nothing else: of the project it imports only ``onerec_proto`` (the gRPC contract), never
the model, the service, the kernels or the model store. ``grpc_client.py`` is a small grpcurl
stand-in (``python -m loadtest.grpc_client``).
"""

from loadtest.trace import TraceError, TraceRecord, read_trace, write_trace

__all__ = ["TraceError", "TraceRecord", "read_trace", "write_trace"]
