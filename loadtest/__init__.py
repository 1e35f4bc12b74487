"""Load testing for the OneRec service: trace format, trace synthesis, open-loop replay and reports.

The package talks to the service only over the wire (HTTP or gRPC); the one thing it takes from
``service/`` is the generated gRPC stub module. Nothing here imports the model.
"""

from loadtest.trace import TraceError, TraceRecord, read_trace, write_trace

__all__ = ["TraceError", "TraceRecord", "read_trace", "write_trace"]
