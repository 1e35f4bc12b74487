"""A tiny grpcurl stand-in for the Recommender service (grpcurl is not always installed).

    python -m loadtest.grpc_client localhost:50051 Recommend '{"user_id": "u42", "history": ["17", "3"]}'
    python -m loadtest.grpc_client localhost:50051 RecordEvents '{"user_id": "u42", "items": ["8"]}'
    python -m loadtest.grpc_client localhost:50051 health

is the same call as
    grpcurl -plaintext -d '{"user_id": "u42", ...}' localhost:50051 onerec.v1.Recommender/Recommend
and prints the response as JSON with the proto field names (the same names as the HTTP JSON).
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf import json_format

from onerec_proto import pb2, pb2_grpc

METHODS = {
    "Recommend": (pb2.RecommendRequest, "Recommend"),
    "RecordEvents": (pb2.RecordEventsRequest, "RecordEvents"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.grpc_client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("target", help="host:port of the gRPC front end")
    parser.add_argument("method", choices=[*METHODS, "health"])
    parser.add_argument("body", nargs="?", default="{}", help="request as JSON (proto field names)")
    parser.add_argument("--timeout", type=float, default=5.0, help="gRPC deadline in seconds")
    parser.add_argument("--request-id", default=None, help="sent as x-request-id metadata")
    args = parser.parse_args(argv)
    metadata = (("x-request-id", args.request_id),) if args.request_id else None
    with grpc.insecure_channel(args.target) as channel:
        try:
            if args.method == "health":
                from grpc_health.v1 import health_pb2, health_pb2_grpc

                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
            else:
                message_type, rpc = METHODS[args.method]
                request = json_format.Parse(args.body, message_type())
                reply = getattr(pb2_grpc.RecommenderStub(channel), rpc)(
                    request, timeout=args.timeout, metadata=metadata
                )
        except grpc.RpcError as exc:
            print(json.dumps({"code": exc.code().name, "details": exc.details()}), file=sys.stderr)
            return 1
    as_dict = json_format.MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    print(json.dumps(as_dict, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
