"""End-to-end tests of the HTTP and gRPC front ends against ONE real `onerec serve` process.

The server (module scope) serves the demo model with the embedded feature store, capture on at rate
1, and small limits so the property test stays fast. Clients are real httpx and grpc clients.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loadtest.launcher import ServiceHandle
from onerec_proto import pb2
from service.metrics import FAMILIES
from tests.plugins.servers import ServiceLauncher, grpc_stub, metric, scrape

MAX_BEAM = 64
MAX_ITEMS = 50


@pytest.fixture(scope="module")
def capture_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("capture") / "trace.jsonl"


@pytest.fixture(scope="module")
def preload_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("preload") / "sequences.txt"
    path.write_text("pre-user 60 61 62\npre-other 1 2\n")
    return path


@pytest.fixture(scope="module")
def server(service_launcher: ServiceLauncher, demo_store: Path, capture_path: Path, preload_file: Path) -> Any:
    handle = service_launcher.start(
        demo_store,
        env={
            "ONEREC_MAX_BATCH_SIZE": "16",
            "ONEREC_MAX_BEAM_WIDTH": str(MAX_BEAM),
            "ONEREC_MAX_NUM_ITEMS": str(MAX_ITEMS),
            "ONEREC_DEFAULT_BEAM_WIDTH": "16",
            "ONEREC_CAPTURE_PATH": str(capture_path),
            "ONEREC_CAPTURE_RATE": "1.0",
            "ONEREC_FEATURES_PRELOAD": str(preload_file),
        },
    )
    yield handle
    service_launcher.stop(handle)


@pytest.fixture(scope="module")
def stub(server: ServiceHandle) -> Any:
    channel, stub = grpc_stub(server.grpc_target)
    yield stub
    channel.close()


@pytest.fixture(scope="module")
def catalog(demo_store: Path) -> list[str]:
    """External item ids of the demo model (from its catalogue file)."""
    doc = json.loads((demo_store / "demo" / "1" / "catalog.json").read_text())
    return [str(i) for i in doc["item_ids"]]


def recommend(http: httpx.Client, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return http.post("/v1/recommend", json=body, **kwargs)


def item_ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [it["item_id"] for it in response.json()["items"]]


def grpc_request(body: dict[str, Any]) -> Any:
    return pb2.RecommendRequest(**body)


# ---- parity and guarantees ----------------------------------------------------------------------

PARITY_CASES = [
    {"user_id": "p1", "history": ["1", "2", "3"], "num_items": 10, "mode": "session", "beam_width": 16},
    {"user_id": "p2", "history": ["7", "8"], "num_items": 8, "mode": "items", "beam_width": 8},
    {"user_id": "p3", "history": ["11", "12", "13", "14"], "num_items": 12, "mode": "session", "beam_width": 8,
     "exclude": ["5", "6"]},
    {"user_id": "p4", "num_items": 5, "mode": "items", "beam_width": 16},
]  # fmt: skip


@pytest.mark.parametrize("body", PARITY_CASES, ids=lambda b: b["user_id"])
def test_http_and_grpc_give_the_same_items(http: httpx.Client, stub: Any, body: dict[str, Any]) -> None:
    over_http = recommend(http, body).json()
    over_grpc = stub.Recommend(grpc_request(body), timeout=30)
    assert [it["item_id"] for it in over_http["items"]] == [it.item_id for it in over_grpc.items]
    assert [it["score"] for it in over_http["items"]] == pytest.approx([it.score for it in over_grpc.items])
    assert [it["semantic_id"] for it in over_http["items"]] == [list(it.semantic_id) for it in over_grpc.items]
    assert over_http["model"] == {"name": over_grpc.model.name, "version": over_grpc.model.version}
    assert len(over_http["items"]) == body["num_items"]


@pytest.mark.parametrize("mode", ["session", "items"])
def test_answers_keep_the_guarantees(http: httpx.Client, catalog: list[str], mode: str) -> None:
    history = catalog[20:26]
    first = item_ids(recommend(http, {"user_id": "g", "history": history, "num_items": 12, "mode": mode}))
    exclude = first[:4]
    body = {"user_id": "g", "history": history, "num_items": 12, "mode": mode, "exclude": exclude}
    items = item_ids(recommend(http, body))
    assert len(items) == 12
    assert len(set(items)) == len(items)
    assert set(items) <= set(catalog)
    assert not set(items) & set(exclude)
    assert not set(items) & set(history)
    allowed = item_ids(recommend(http, {**body, "exclude_history": False, "exclude": []}))
    assert len(allowed) == 12  # with exclude_history off the history is allowed back; still valid items


def test_unknown_history_items_are_ignored_and_counted(http: httpx.Client, server: ServiceHandle) -> None:
    before = metric(scrape(server.http_url), "onerec_unknown_history_items_total")
    known = item_ids(recommend(http, {"user_id": "unk", "history": ["1", "2"], "num_items": 5}))
    mixed = item_ids(recommend(http, {"user_id": "unk", "history": ["no-such-item", "1", "zzz", "2"], "num_items": 5}))
    assert mixed == known
    assert metric(scrape(server.http_url), "onerec_unknown_history_items_total") - before == 2


# ---- validation --------------------------------------------------------------------------------

INVALID_BODIES = [
    ({"history": ["1"]}, "user_id"),
    ({"user_id": 42}, "user_id"),
    ({"user_id": ""}, "user_id"),
    ({"user_id": "u", "num_items": -1}, "num_items"),
    ({"user_id": "u", "num_items": 0}, "num_items"),
    ({"user_id": "u", "num_items": 10**12}, "num_items"),
    ({"user_id": "u", "num_items": "10"}, "num_items"),
    ({"user_id": "u", "beam_width": -3}, "beam_width"),
    ({"user_id": "u", "beam_width": 10**9}, "beam_width"),
    ({"user_id": "u", "beam_width": 2.5}, "beam_width"),
    ({"user_id": "u", "mode": "carousel"}, "mode"),
    ({"user_id": "u", "history": "1,2,3"}, "history"),
    ({"user_id": "u", "history": [1, 2]}, "history"),
    ({"user_id": "u", "exclude": [None]}, "exclude"),
    ({"user_id": "u", "timeout_ms": 0}, "timeout_ms"),
    ({"user_id": "u", "history": ["1"] * 1025}, "history"),
]


@pytest.mark.parametrize(("body", "field"), INVALID_BODIES, ids=[f for _, f in INVALID_BODIES])
def test_http_validation_names_the_field(http: httpx.Client, body: dict[str, Any], field: str) -> None:
    response = recommend(http, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_argument"
    assert field in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]


def test_http_malformed_json_and_body_limit(http: httpx.Client) -> None:
    bad = http.post("/v1/recommend", content=b'{"user_id": ', headers={"content-type": "application/json"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "body"
    huge = {"user_id": "u", "history": ["x" * 200] * 400}  # about 80 KB > 64 KiB
    too_large = recommend(http, huge)
    assert too_large.status_code == 413
    assert "larger than" in too_large.json()["error"]["message"]
    chunked = http.post(
        "/v1/recommend", content=iter([json.dumps(huge).encode()]), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413  # no content-length: counted while reading


GRPC_INVALID = [
    ({"history": ["1"]}, "user_id"),
    ({"user_id": "u", "num_items": -1}, "num_items"),
    ({"user_id": "u", "num_items": 10**12}, "num_items"),
    ({"user_id": "u", "beam_width": 0}, "beam_width"),
    ({"user_id": "u", "beam_width": 10**9}, "beam_width"),
    ({"user_id": "u", "mode": "carousel"}, "mode"),
    ({"user_id": "u", "timeout_ms": -5}, "timeout_ms"),
]


@pytest.mark.parametrize(("body", "field"), GRPC_INVALID, ids=[f for _, f in GRPC_INVALID])
def test_grpc_validation_is_invalid_argument(stub: Any, body: dict[str, Any], field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(grpc_request(body), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()


def test_grpc_message_over_limit_is_resource_exhausted(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(grpc_request({"user_id": "u", "history": ["x" * 200] * 400}), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20), st.floats(allow_nan=False),
    st.text(max_size=12),
)  # fmt: skip
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
BODIES = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "user_id": st.one_of(st.text(max_size=20), JSON_VALUES),
            "history": st.one_of(st.lists(st.sampled_from(["1", "2", "3", "999999", ""]), max_size=6), JSON_VALUES),
            "num_items": st.one_of(st.integers(min_value=-5, max_value=MAX_ITEMS + 5), JSON_VALUES),
            "mode": st.one_of(st.sampled_from(["session", "items", "SESSION", ""]), JSON_VALUES),
            "beam_width": st.one_of(st.integers(min_value=-2, max_value=20), st.just(MAX_BEAM + 1), JSON_VALUES),
            "exclude": st.one_of(st.lists(st.sampled_from(["1", "4", "x"]), max_size=4), JSON_VALUES),
            "exclude_history": st.one_of(st.booleans(), JSON_VALUES),
            "timeout_ms": st.one_of(st.integers(min_value=-1, max_value=5000), JSON_VALUES),
        },
    ),
    JSON_VALUES,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES)
@example(body={"user_id": "0", "timeout_ms": 1})  # found by CI: 429 from admission, 504 from the worker
@example(body=[1, 2])
def test_property_no_5xx_for_any_json_body(http: httpx.Client, body: Any) -> None:
    """Bad input is a 422, never a 5xx. The one exception is a deadline the caller made too tight.

    A body whose own timeout_ms is shorter than a batch may honestly end in 504 (the deadline passed
    before compute) or 429 (admission saw the batch in progress would outlast it). Any other body
    must be answered 200 or 422.
    """
    response = http.post("/v1/recommend", content=json.dumps(body), headers={"content-type": "application/json"})
    timeout = body.get("timeout_ms") if isinstance(body, dict) else None
    tight = type(timeout) is int and 1 <= timeout < 1000
    expected = {200: None, 422: "invalid_argument"}
    if tight:
        expected.update({429: "overloaded", 504: "deadline_exceeded"})
    assert response.status_code in expected, (body, response.text)
    if response.status_code == 200:
        assert len(response.json()["items"]) >= 1
    else:
        error = response.json()["error"]
        if expected[response.status_code] is not None:
            assert error["code"] == expected[response.status_code], (body, error)


# ---- batching, deadlines, events ---------------------------------------------------------------


def test_concurrent_requests_share_decode_steps_without_changing_answers(
    http: httpx.Client, server: ServiceHandle, catalog: list[str]
) -> None:
    bodies = [
        {"user_id": f"b{i}", "history": catalog[i * 3 : i * 3 + 4], "num_items": 10,
         "mode": "session" if i % 2 else "items", "beam_width": 16, "timeout_ms": 120000}
        for i in range(16)
    ]  # fmt: skip
    alone = [item_ids(recommend(http, b)) for b in bodies]
    before = scrape(server.http_url)
    for _ in range(3):  # a few bursts: at least one must form a batch of 2 or more
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda b: item_ids(httpx.post(f"{server.http_url}/v1/recommend", json=b,
                                                                   timeout=30)), bodies))  # fmt: skip
        assert together == alone
    after = scrape(server.http_url)
    steps = metric(after, "onerec_batch_size_count") - metric(before, "onerec_batch_size_count")
    singles = metric(after, "onerec_batch_size_bucket", le="1.0") - metric(before, "onerec_batch_size_bucket", le="1.0")
    assert steps > 0
    assert steps - singles > 0, "no decode step ran more than one request"


def test_deadlines_give_504_and_deadline_exceeded(http: httpx.Client, stub: Any, server: ServiceHandle) -> None:
    before = metric(scrape(server.http_url), "onerec_rejections_total", reason="deadline")
    late = recommend(http, {"user_id": "late", "history": ["1"], "beam_width": 64, "num_items": 50, "timeout_ms": 1})
    assert late.status_code == 504
    assert late.json()["error"]["code"] == "deadline_exceeded"
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(
            grpc_request({"user_id": "late", "history": ["1"], "beam_width": 64, "timeout_ms": 1}), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert metric(scrape(server.http_url), "onerec_rejections_total", reason="deadline") - before >= 2


def test_events_extend_history_and_are_not_recommended_back(http: httpx.Client, stub: Any) -> None:
    user = "events-user"
    seeded = http.post("/v1/events", json={"user_id": user, "items": ["30", "31", "32"]})
    assert seeded.status_code == 200 and seeded.json()["history"] == ["30", "31", "32"]
    suggested = item_ids(recommend(http, {"user_id": user, "num_items": 10}))
    assert not set(suggested) & {"30", "31", "32"}
    clicked = suggested[:3]
    stored = http.post("/v1/events", json={"user_id": user, "items": clicked[:2]}).json()["history"]
    assert stored == ["30", "31", "32", *clicked[:2]]
    grpc_stored = stub.RecordEvents(pb2.RecordEventsRequest(user_id=user, items=clicked[2:3]), timeout=10)
    assert list(grpc_stored.history) == [*stored, clicked[2]]
    again = item_ids(recommend(http, {"user_id": user, "num_items": 10}))
    assert not set(again) & set(clicked) and not set(again) & {"30", "31", "32"}
    response = recommend(http, {"user_id": user, "num_items": 10})
    assert response.json()["degraded"] is False


def test_events_are_trimmed_to_the_model_history_window(http: httpx.Client) -> None:
    model = http.get("/v1/models").json()
    window = model["history_window"]
    assert model["max_history"] == window  # the field's first name, still answered
    items = [str(i) for i in range(window + 7)]
    stored = http.post("/v1/events", json={"user_id": "trim-user", "items": items}).json()["history"]
    assert stored == items[-window:]


def test_events_validation(http: httpx.Client, stub: Any) -> None:
    assert http.post("/v1/events", json={"user_id": "x", "items": []}).status_code == 422
    assert http.post("/v1/events", json={"user_id": "x", "items": [1]}).status_code == 422
    with pytest.raises(grpc.RpcError) as info:
        stub.RecordEvents(pb2.RecordEventsRequest(user_id="", items=["1"]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- operations --------------------------------------------------------------------------------


def test_metrics_parse_and_carry_every_family(http: httpx.Client, server: ServiceHandle) -> None:
    recommend(http, {"user_id": "m", "history": ["1"]})
    samples = scrape(server.http_url)
    names = set(samples)
    missing = [f for f in FAMILIES if not any(n == f or n.startswith(f + "_") for n in names)]
    assert not missing, missing
    assert metric(samples, "onerec_requests_total", api="http", endpoint="/v1/recommend", outcome="ok") > 0
    assert metric(samples, "onerec_model_info", name="demo", version="1") == 1
    assert metric(samples, "onerec_ready") == 1
    assert metric(samples, "onerec_invalid_beam_paths_total") == 0
    assert metric(samples, "onerec_guarantee_violations_total") == 0


def test_request_id_is_honoured_on_both_front_ends(http: httpx.Client, stub: Any) -> None:
    response = recommend(http, {"user_id": "rid", "history": ["1"]}, headers={"X-Request-ID": "req-abc-123"})
    assert response.headers["x-request-id"] == "req-abc-123"
    assert response.json()["request_id"] == "req-abc-123"
    reply, call = stub.Recommend.with_call(
        grpc_request({"user_id": "rid", "history": ["1"]}), metadata=(("x-request-id", "req-grpc-7"),), timeout=10
    )
    assert reply.request_id == "req-grpc-7"
    assert ("x-request-id", "req-grpc-7") in tuple(call.trailing_metadata())


def test_probes_models_health_and_reflection(http: httpx.Client, server: ServiceHandle) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["feature_store"] == {"backend": "embedded", "users": ready.json()["feature_store"]["users"],
                                             "ok": True}  # fmt: skip
    model = http.get("/v1/models").json()
    assert model["name"] == "demo" and model["version"] == "1"
    assert model["catalog_size"] > 0 and len(model["semantic_id_shape"]) >= 3
    assert http.post("/v1/models/reload").status_code == 404  # no admin token configured: endpoint off
    with grpc.insecure_channel(server.grpc_target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        services = {s.name for s in answers[0].list_services_response.service}
    assert {"onerec.v1.Recommender", "grpc.health.v1.Health"} <= services
    assert http.get("/openapi.json").json()["paths"]["/v1/recommend"]["post"]


def test_models_lists_live_items_most_popular_first(http: httpx.Client, demo_store: Path) -> None:
    """GET /v1/models?popular_items=N: what a load tester that has only the wire draws requests from."""
    model = http.get("/v1/models").json()
    assert "popular_items" not in model  # only when asked
    catalog = json.loads((demo_store / "demo" / model["version"] / "catalog.json").read_text())
    by_popularity = [str(catalog["item_ids"][i]) for i in catalog["popular"]]
    listed = http.get("/v1/models", params={"popular_items": 7}).json()["popular_items"]
    assert listed == by_popularity[:7]
    everything = http.get("/v1/models", params={"popular_items": 10000}).json()["popular_items"]
    assert len(everything) == len(set(everything)) == model["live_items"]
    assert set(everything) == {str(i) for i in catalog["item_ids"]}
    assert http.get("/v1/models", params={"popular_items": 10001}).status_code == 422
    assert http.get("/v1/models", params={"popular_items": -1}).status_code == 422


def test_capture_writes_replayable_trace(http: httpx.Client, stub: Any, capture_path: Path) -> None:
    recommend(http, {"user_id": "cap-http", "history": ["4", "5"], "num_items": 7, "mode": "items", "beam_width": 8})
    stub.Recommend(grpc_request({"user_id": "cap-grpc", "num_items": 3}), timeout=10)
    deadline = time.monotonic() + 5
    records: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and len(records) < 2:
        lines = capture_path.read_text().splitlines() if capture_path.exists() else []
        records = {r["user_id"]: r for r in map(json.loads, lines) if r["user_id"] in ("cap-http", "cap-grpc")}
        time.sleep(0.05)
    assert records["cap-http"]["history"] == ["4", "5"]
    assert {k: records["cap-http"][k] for k in ("num_items", "mode", "beam_width")} == {
        "num_items": 7, "mode": "items", "beam_width": 8}  # fmt: skip
    assert "history" not in records["cap-grpc"]  # stored history was used: replay must do the same
    assert records["cap-grpc"]["num_items"] == 3 and records["cap-grpc"]["beam_width"] == 16
    assert 0 <= records["cap-http"]["t"] <= records["cap-grpc"]["t"]


def test_embedded_store_preload_is_used_as_stored_history(http: httpx.Client) -> None:
    stored = item_ids(recommend(http, {"user_id": "pre-user", "num_items": 10}))
    explicit = item_ids(recommend(http, {"user_id": "pre-user", "history": ["60", "61", "62"], "num_items": 10}))
    assert stored == explicit
    assert not set(stored) & {"60", "61", "62"}
    assert http.get("/readyz").json()["feature_store"]["users"] >= 2
