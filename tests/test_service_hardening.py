"""Issue 12's front-door defects, each against a real `onerec serve` (items 5, 6, 9, 11-15).

Slow or abandoned clients cost nothing (header and body deadlines, a half-sent body is never acted
on), deadlines are the caller's up to a documented maximum, secrets stay out of logs, cancellations
and parse failures are counted as what they are, the admin token is checked before the body, and the
capture file is private.
"""

from __future__ import annotations

import json
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from loadtest.launcher import ServiceHandle
from onerec_proto import pb2
from service.recommend import RecommendService
from service.settings import Settings
from tests.plugins.servers import ServiceLauncher, grpc_stub, metric, scrape

TOKEN = "hardening-token"
SECRET = "s3cret-pass"


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("capture") / "trace.jsonl"


@pytest.fixture(scope="module")
def server(service_launcher: ServiceLauncher, demo_store: Path, capture: Path) -> Any:
    handle = service_launcher.start(
        demo_store,
        env={
            "ONEREC_ADMIN_TOKEN": TOKEN,
            "ONEREC_HTTP_HEADER_TIMEOUT_S": "1",
            "ONEREC_HTTP_BODY_TIMEOUT_S": "1",
            "ONEREC_CAPTURE_PATH": str(capture),
            "ONEREC_CAPTURE_RATE": "1.0",
        },
    )
    yield handle
    service_launcher.stop(handle)


def raw_connection(server: ServiceHandle) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
    sock.settimeout(30)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Read until the server closes the connection; (closed in time, what it sent)."""
    started, received = time.monotonic(), b""
    while time.monotonic() - started < seconds:
        chunk = sock.recv(4096)
        if not chunk:
            return True, received
        received += chunk
    return False, received


def test_silent_and_dripping_connections_are_closed(server: ServiceHandle) -> None:
    silent = raw_connection(server)
    dripping = raw_connection(server)
    dripping.sendall(b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\n")  # headers never finish
    assert closed_within(silent, 20)[0], "a connection that sends nothing is held"
    assert closed_within(dripping, 20)[0], "a connection with unfinished headers is held"
    with httpx.Client(base_url=server.http_url, timeout=30) as client:  # keep-alive clients are unaffected
        assert client.get("/healthz").status_code == 200
        time.sleep(0.2)
        assert client.get("/healthz").status_code == 200


def test_grpc_connections_that_never_speak_are_closed(server: ServiceHandle) -> None:
    silent = socket.create_connection(("127.0.0.1", server.grpc_port), timeout=30)
    assert closed_within(silent, 20)[0], "a gRPC connection that never sends its preface is held"


def test_models_answer_does_not_show_the_store_path(server: ServiceHandle, demo_store: Path) -> None:
    answer = httpx.get(f"{server.http_url}/v1/models", timeout=30).text
    assert str(demo_store) not in answer and '"path"' not in answer


def test_stalled_body_gets_408_and_a_half_sent_body_is_never_acted_on(server: ServiceHandle) -> None:
    body = json.dumps({"user_id": "half", "items": ["1", "2", "3"]}).encode()
    stalled = raw_connection(server)
    stalled.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 500\r\n\r\n" + body)  # fmt: skip
    closed, answer = closed_within(stalled, 20)
    assert closed and answer.startswith(b"HTTP/1.1 408"), answer[:200]
    hung_up = raw_connection(server)
    hung_up.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 500\r\n\r\n" + body)  # fmt: skip
    hung_up.close()
    time.sleep(0.5)  # nothing to wait for: the point is that nothing happens
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        reply = client.post("/v1/recommend", json={"user_id": "half", "num_items": 3, "mode": "items"})
        assert reply.status_code == 200
        stored = client.post("/v1/events", json={"user_id": "half", "items": ["4"]}).json()
    assert stored["history"] == ["4"], "a half-sent events body was stored"
    assert '"user_id":"half","items"' not in server.log_text()


def test_caller_deadlines_are_honoured_up_to_the_maximum() -> None:
    service = RecommendService(
        Settings(request_timeout_ms=2000, max_request_timeout_ms=30000),
        None,
        None,
        None,
        None,  # type: ignore[arg-type]
    )
    now = time.monotonic()
    assert service.deadline_for(None, 20.0) - now == pytest.approx(20.0, abs=0.5)  # gRPC deadline, no timeout_ms
    assert service.deadline_for(None, None) - now == pytest.approx(2.0, abs=0.5)  # neither: the default
    assert service.deadline_for(5000, 20.0) - now == pytest.approx(5.0, abs=0.5)  # the earlier of the two
    assert service.deadline_for(None, 500.0) - now == pytest.approx(30.0, abs=0.5)  # cut to the maximum


def test_redis_password_never_reaches_the_log(service_launcher: ServiceLauncher, demo_store: Path) -> None:
    # a Redis nobody listens on, with a password: answers degrade, the password never shows
    handle = service_launcher.start(demo_store, env={"ONEREC_REDIS_URL": f"redis://:{SECRET}@127.0.0.1:9/0"})
    try:
        with httpx.Client(base_url=handle.http_url, timeout=30) as client:
            assert client.post("/v1/recommend", json={"user_id": "r", "num_items": 3}).json()["degraded"] is True
    finally:
        service_launcher.stop(handle)
    log = handle.log_text()
    assert '"event":"starting"' in log and "127.0.0.1:9" in log
    assert SECRET not in log


def test_cancelled_grpc_call_is_counted_as_cancelled(server: ServiceHandle) -> None:
    before = scrape(server.http_url)
    channel, stub = grpc_stub(server.grpc_target)
    heavy = pb2.RecommendRequest(user_id="c", history=["1", "2"], mode="session", beam_width=256, num_items=100)
    calls = [stub.Recommend.future(heavy, timeout=60) for _ in range(4)]
    deadline = time.monotonic() + 30
    while metric(scrape(server.http_url), "onerec_inflight_requests", api="grpc") < 1:
        assert time.monotonic() < deadline, "the calls never became in-flight"
        time.sleep(0.01)
    for call in calls:
        call.cancel()
    channel.close()
    wait = time.monotonic() + 30
    while metric(scrape(server.http_url), "onerec_inflight_requests", api="grpc") > 0:
        assert time.monotonic() < wait
        time.sleep(0.05)
    after = scrape(server.http_url)
    ok = metric(after, "onerec_requests_total", api="grpc", endpoint="Recommend", outcome="ok") - metric(
        before, "onerec_requests_total", api="grpc", endpoint="Recommend", outcome="ok"
    )
    cancelled = metric(after, "onerec_requests_total", api="grpc", outcome="cancelled") - metric(
        before, "onerec_requests_total", api="grpc", outcome="cancelled"
    )
    assert cancelled >= 1 and ok + cancelled == 4, (ok, cancelled)


def test_parse_failures_are_invalid_and_counted_on_both_front_ends(server: ServiceHandle) -> None:
    before = metric(scrape(server.http_url), "onerec_rejections_total", reason="invalid")
    reply = httpx.post(
        f"{server.http_url}/v1/recommend", content=b"\xff\xfe{", headers={"content-type": "application/json"}
    )
    assert reply.status_code == 422 and reply.json()["error"]["field"] == "body"
    channel = grpc.insecure_channel(server.grpc_target)
    raw = channel.unary_unary("/onerec.v1.Recommender/Recommend", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\xff\xff\xff\xff", timeout=30)
    channel.close()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert metric(scrape(server.http_url), "onerec_rejections_total", reason="invalid") - before >= 2
    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    assert not [line for line in lines if line.get("level") == "error" and "Traceback" in str(line.get("exc", ""))]


def test_callers_504s_are_warnings_not_errors(server: ServiceHandle) -> None:
    reply = httpx.post(
        f"{server.http_url}/v1/recommend",
        json={"user_id": "late", "history": ["1"], "beam_width": 64, "num_items": 50, "timeout_ms": 1},
        headers={"x-request-id": "late-504"},
        timeout=30,
    )
    assert reply.status_code in (429, 504)

    def late_lines() -> list[dict]:
        return [json.loads(line) for line in server.log_text().splitlines() if "late-504" in line]

    deadline = time.monotonic() + 30  # the access line is written once the response has gone out
    while not any(line.get("event") == "request" for line in late_lines()):
        assert time.monotonic() < deadline, f"no access line for late-504: {late_lines()}"
        time.sleep(0.05)
    lines = late_lines()
    assert all(line["level"] in ("info", "warning") for line in lines), lines


def test_admin_token_is_checked_before_the_body(server: ServiceHandle) -> None:
    for path, body in (("/v1/models/reload", {"version": "not-a-number"}), ("/v1/catalog/withdraw", {"items": 5})):
        assert httpx.post(f"{server.http_url}{path}", json=body, timeout=30).status_code == 401
        authorised = httpx.post(f"{server.http_url}{path}", json=body, headers={"authorization": f"Bearer {TOKEN}"})
        assert authorised.status_code == 422


def test_capture_file_is_private(server: ServiceHandle, capture: Path) -> None:
    httpx.post(f"{server.http_url}/v1/recommend", json={"user_id": "cap", "num_items": 2}, timeout=30)
    deadline = time.monotonic() + 30
    while not capture.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stat.S_IMODE(capture.stat().st_mode) == 0o600


def test_a_slow_client_does_not_hold_up_shutdown(service_launcher: ServiceLauncher, demo_store: Path) -> None:
    handle = service_launcher.start(demo_store, env={"ONEREC_HTTP_BODY_TIMEOUT_S": "2"})
    stalled = raw_connection(handle)
    stalled.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    idle = raw_connection(handle)
    threading.Event().wait(0.3)
    started = time.monotonic()
    assert service_launcher.stop(handle, timeout=60) == 0
    assert time.monotonic() - started < 15, "a stalled client held shutdown up"
    stalled.close()
    idle.close()


# ---- items 7 and 8: events acknowledged honestly, user state bounded --------------------------------


def test_events_write_outcome_is_stated_honestly() -> None:
    from service.errors import events_write_failed

    unknown, refused = events_write_failed("timeout"), events_write_failed("connection")
    assert (unknown.http_status, unknown.code) == (
        504,
        "events_outcome_unknown",
    )  # may have landed: retry may duplicate
    assert (refused.http_status, refused.code) == (503, "feature_store_unavailable")  # nothing stored: safe to retry
    assert unknown.grpc_code != refused.grpc_code


def test_embedded_store_is_an_lru_with_counted_evictions() -> None:
    import asyncio

    from service.features import EmbeddedFeatureStore
    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics(process_collectors=False)
    store = EmbeddedFeatureStore(metrics, max_users=2)

    async def run() -> list[list[str] | None]:
        await store.append_events("a", ["1"], 10)
        await store.append_events("b", ["2"], 10)
        await store.get_history("a", 10)  # a is now the most recently used
        await store.append_events("c", ["3"], 10)
        return [await store.get_history(u, 10) for u in ("a", "b", "c")]

    assert asyncio.run(run()) == [["1"], None, ["3"]]
    assert metrics.fs_evictions.labels("embedded")._value.get() == 1


def test_redis_history_keys_get_a_ttl(redis_server: Any) -> None:
    import asyncio

    import redis

    from service.features import RedisFeatureStore, history_key

    async def run() -> None:  # one event loop for the client's whole life
        store = RedisFeatureStore(redis_server.url, timeout_s=2.0, ttl_s=3600)
        await store.append_events("ttl-user", ["1", "2"], 10)
        await store.close()

    asyncio.run(run())
    ttl = redis.Redis.from_url(redis_server.url).ttl(history_key("ttl-user"))
    assert 3500 < ttl <= 3600


def test_event_ids_outside_the_catalogue_are_dropped_and_counted(server: ServiceHandle) -> None:
    before = metric(scrape(server.http_url), "onerec_unknown_event_items_total")
    reply = httpx.post(
        f"{server.http_url}/v1/events", json={"user_id": "evt", "items": ["1", "no-such-item", "2"]}, timeout=30
    )
    assert reply.status_code == 200 and reply.json()["history"] == ["1", "2"]
    assert metric(scrape(server.http_url), "onerec_unknown_event_items_total") - before == 1
