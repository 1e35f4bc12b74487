"""The recommend request's shape, held together across the places that spell it out.

RecommendBody (service/schemas.py) is the HTTP body and what both front ends validate; the proto's
RecommendRequest is the gRPC message; TraceRecord (loadtest/trace.py) is a trace line, which loadtest
may not import from the service; the capture record (service/capture.py) is derived from the body.
These tests hold them to one another field by field, through the code that converts between them,
so a field added to one and forgotten in another fails here. The request modes have one definition
(onerec.generate) and one copy (loadtest), compared here too. Last, the recipe the README gives an
outside Python client (standard protoc stubs, imported as ``onerec.v1``) is run.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import pytest

from loadtest import trace
from loadtest.trace import REQUEST_FIELDS, TraceRecord, parse_record
from onerec import generate
from onerec_proto import pb2
from service.capture import request_record
from service.engine.messages import Submit
from service.grpc_api import recommend_body_from_proto
from service.schemas import RecommendBody

ROOT = Path(__file__).resolve().parent.parent

# A request that sets every field to something other than its default.
FULL = {
    "user_id": "u7",
    "history": ["3", "17"],
    "num_items": 5,
    "mode": "items",
    "beam_width": 12,
    "exclude": ["9"],
    "exclude_history": False,
    "timeout_ms": 250,
}


def proto_fields() -> dict[str, Any]:
    return {f.name: f for f in pb2.RecommendRequest.DESCRIPTOR.fields}


def test_the_four_spellings_name_the_same_fields() -> None:
    body = set(RecommendBody.model_fields)
    assert body == set(FULL), "extend FULL (and the capture round trip in test_loadtest_capture.py)"
    assert set(proto_fields()) == body
    assert set(REQUEST_FIELDS) == body
    full = RecommendBody.model_validate(FULL)
    assert set(request_record(full, full.num_items or 0, full.beam_width or 0)) == body


def is_list(annotation: Any) -> bool:
    """``list[X]``, ``tuple[X, ...]`` or either of them ``| None``."""
    return any(get_origin(a) in (list, tuple) for a in (annotation, *get_args(annotation)))


def test_required_optional_and_repeated_agree() -> None:
    """user_id alone is required everywhere; every other field may be absent; the same ones are lists."""
    body = RecommendBody.model_fields
    trace_types = get_type_hints(TraceRecord)
    trace_fields = {f.name: f for f in dataclasses.fields(TraceRecord) if f.name in REQUEST_FIELDS}
    empty = pb2.RecommendRequest()
    proto_repeated = {name for name in proto_fields() if not isinstance(getattr(empty, name), (str, int, float))}
    proto_plain = {name for name, f in proto_fields().items() if not f.has_presence} - proto_repeated

    assert {name for name, f in body.items() if f.is_required()} == {"user_id"}
    assert {name for name, f in trace_fields.items() if f.default is dataclasses.MISSING} == {"user_id"}
    assert proto_plain == {"user_id"}  # every other scalar is `optional`: unset = absent JSON field
    assert all(f.default is None for name, f in trace_fields.items() if name != "user_id")  # None = absent
    assert {name for name, f in body.items() if is_list(f.annotation)} == proto_repeated
    assert {name for name in trace_fields if is_list(trace_types[name])} == proto_repeated


def test_absent_fields_mean_the_body_defaults_over_every_path() -> None:
    """An unset proto field and an absent trace field both give RecommendBody's default."""
    defaults = RecommendBody(user_id="u1")
    assert recommend_body_from_proto(pb2.RecommendRequest(user_id="u1")) == defaults
    bare = parse_record({"t": 0, "user_id": "u1"})
    assert RecommendBody.model_validate(bare.request_body()) == defaults
    # and a default body is captured with only what the server fills in
    captured = request_record(defaults, 10, 32)
    assert captured == {"user_id": "u1", "num_items": 10, "mode": "session", "beam_width": 32}


def test_a_full_request_survives_every_conversion() -> None:
    body = RecommendBody.model_validate(FULL)
    for name, field in RecommendBody.model_fields.items():
        if not field.is_required():
            assert getattr(body, name) != field.get_default(call_default_factory=True), name
    assert recommend_body_from_proto(pb2.RecommendRequest(**FULL)) == body
    record = parse_record({"t": 1.5, **request_record(body, FULL["num_items"], FULL["beam_width"])})
    assert not record.extra  # the trace reader knows every captured key
    assert RecommendBody.model_validate(record.request_body()) == body
    assert pb2.RecommendRequest(**record.request_body()) == pb2.RecommendRequest(**FULL)


def test_one_set_of_modes() -> None:
    assert trace.MODES == generate.MODES  # loadtest's copy
    assert get_args(RecommendBody.model_fields["mode"].annotation) == generate.MODES
    assert get_args(get_type_hints(Submit)["mode"]) == generate.MODES


@pytest.mark.parametrize("stubs_first", [False, True])
def test_an_outside_client_imports_standard_stubs_beside_the_project(tmp_path: Path, stubs_first: bool) -> None:
    """README, "An outside Python client": plain protoc output imported as onerec.v1, project installed."""
    from grpc_tools import protoc

    gen = tmp_path / "gen"
    gen.mkdir()
    proto = "onerec/v1/recommender.proto"
    assert protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={gen}", f"--grpc_python_out={gen}", proto]) == 0
    assert not (gen / "onerec" / "__init__.py").exists()  # what makes it a namespace portion
    client = """
import importlib.util, sys
import onerec
from onerec.v1 import recommender_pb2, recommender_pb2_grpc
assert recommender_pb2_grpc.RecommenderStub
request = recommender_pb2.RecommendRequest(user_id="u42", history=["17"], num_items=3, exclude_history=False)
assert recommender_pb2.RecommendRequest.FromString(request.SerializeToString()) == request
assert recommender_pb2.__file__.startswith(sys.argv[1]), recommender_pb2.__file__
assert onerec.__file__.startswith(sys.argv[2]), onerec.__file__          # the model package is still ours
assert importlib.util.find_spec("onerec.generate").origin.startswith(sys.argv[2])
from onerec_proto import pb2                                            # and the project's stubs coexist
assert pb2.RecommendRequest.FromString(request.SerializeToString()).exclude_history is False
print("client-ok")
"""
    # The project importable as a regular package (as a pip install leaves it), the stubs' folder too.
    paths = [str(gen), str(ROOT)] if stubs_first else [str(ROOT), str(gen)]
    run = subprocess.run(
        [sys.executable, "-c", client, str(gen), str(ROOT / "onerec")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
    )  # fmt: skip
    assert run.returncode == 0 and "client-ok" in run.stdout, run.stdout + run.stderr
