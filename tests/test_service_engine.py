"""The engine processes seen from outside: a killed engine, and live catalogue edits, on a real service.

* ``kill -9`` of the engine: what it held is answered at once with 503 / UNAVAILABLE, readiness goes
  false, the engine is started again with the serving model, and the service answers again, all
  without restarting the front end.
* Admin catalogue edits over HTTP and gRPC: a withdrawn item is never answered after the call returns,
  a restored one can come back, an added item becomes a known id, and the edits are kept in the
  model's overlay file, so a new service on the same store starts with them.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from loadtest.launcher import ServiceHandle
from onerec_proto import pb2
from tests.plugins.servers import ServiceLauncher, copy_store, grpc_stub, metric, scrape

TOKEN = "engine-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
LONG = 120000  # ms: a deadline no loaded machine misses


def engine_pids(server: ServiceHandle) -> list[int]:
    """The front end's child processes (the engines), from /proc."""
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def store(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_store(demo_store, tmp_path_factory.mktemp("engine") / "store")


@pytest.fixture(scope="module")
def server(service_launcher: ServiceLauncher, store: Path) -> Any:
    handle = service_launcher.start(store, env={"ONEREC_ADMIN_TOKEN": TOKEN, "ONEREC_POLL_INTERVAL_S": "0"})
    yield handle
    service_launcher.stop(handle)


def recommend(http: httpx.Client, **body: Any) -> list[str]:
    response = http.post("/v1/recommend", json={"user_id": "u", "timeout_ms": LONG, **body})
    assert response.status_code == 200, response.text
    return [it["item_id"] for it in response.json()["items"]]


def test_killed_engine_fails_in_flight_with_503_then_serves_again(http: httpx.Client, server: ServiceHandle) -> None:
    before = metric(scrape(server.http_url), "onerec_engine_restarts_total")
    (engine,) = engine_pids(server)
    statuses: list[int] = []
    heavy = {"user_id": "h", "history": ["1", "2"], "mode": "session", "beam_width": 256, "num_items": 100,
             "timeout_ms": LONG}  # fmt: skip

    def call() -> None:
        with httpx.Client(timeout=60.0) as client:
            statuses.append(client.post(f"{server.http_url}/v1/recommend", json=heavy).status_code)

    callers = [threading.Thread(target=call) for _ in range(6)]
    for caller in callers:
        caller.start()
    wait_until(lambda: metric(scrape(server.http_url), "onerec_inflight_requests", api="http") >= 6, 30, "in-flight")
    killed_at = time.monotonic()
    os.kill(engine, signal.SIGKILL)
    for caller in callers:
        caller.join(60)
    assert set(statuses) <= {200, 503} and 503 in statuses and len(statuses) == 6, statuses
    assert time.monotonic() - killed_at < 20, "in-flight requests were not failed at once"
    wait_until(lambda: http.get("/readyz").status_code == 200, 120, "readiness after the restart")
    assert recommend(http, history=["1", "2"], mode="items", num_items=5)
    (replacement,) = engine_pids(server)
    assert replacement != engine and server.alive()
    assert metric(scrape(server.http_url), "onerec_engine_restarts_total") - before == 1


def test_readiness_is_false_while_the_engine_restarts(http: httpx.Client, server: ServiceHandle) -> None:
    (engine,) = engine_pids(server)
    os.kill(engine, signal.SIGKILL)
    wait_until(lambda: http.get("/readyz").status_code == 503, 10, "readiness to drop")
    response = http.post("/v1/recommend", json={"user_id": "u", "history": ["1"], "timeout_ms": LONG})
    assert response.status_code in (200, 503)  # 200 only if the replacement was already up
    wait_until(lambda: http.get("/readyz").status_code == 200, 120, "readiness after the restart")


def edit(http: httpx.Client, op: str, body: dict[str, Any], auth: bool = True) -> httpx.Response:
    return http.post(f"/v1/catalog/{op}", json=body, headers=AUTH if auth else {})


def test_withdrawn_items_are_never_answered_until_restored(http: httpx.Client, store: Path) -> None:
    history = ["3", "4", "5"]
    top = recommend(http, history=history, mode="items", num_items=10, beam_width=16)
    gone = top[:3]
    assert edit(http, "withdraw", {"items": gone}, auth=False).status_code == 401
    response = edit(http, "withdraw", {"items": gone})
    assert response.status_code == 200, response.text
    assert response.json()["live_items"] == http.get("/v1/models").json()["catalog_size"] - 3
    for mode in ("items", "session"):
        answer = recommend(http, history=history, mode=mode, num_items=10, beam_width=16)
        assert len(answer) == 10 and not set(answer) & set(gone), (mode, answer)
    overlay = json.loads((store / "demo" / "catalog-overlay.json").read_text())
    assert set(gone) <= set(overlay["withdrawn"])
    unknown = edit(http, "withdraw", {"items": ["no-such-item"]})
    assert unknown.status_code == 422 and "no-such-item" in unknown.json()["error"]["message"]
    assert edit(http, "restore", {"items": gone}).status_code == 200
    assert recommend(http, history=history, mode="items", num_items=10, beam_width=16) == top


def taken_path(store: Path) -> list[int]:
    return list(json.loads((store / "demo" / "1" / "catalog.json").read_text())["codes"][0])


def free_path(store: Path, shape: list[int]) -> list[int]:
    """A code path no item of the published catalogue has."""
    used = {tuple(p) for p in json.loads((store / "demo" / "1" / "catalog.json").read_text())["codes"]}
    path = [0] * len(shape)
    while tuple(path) in used:
        for level in reversed(range(len(shape))):  # count up, like an odometer
            path[level] = (path[level] + 1) % shape[level]
            if path[level]:
                break
    return path


def test_catalogue_edits_over_grpc_and_an_added_item(http: httpx.Client, server: ServiceHandle, store: Path) -> None:
    channel, stub = grpc_stub(server.grpc_target)
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.WithdrawItems(pb2.CatalogItemsRequest(items=["7"]), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.WithdrawItems(pb2.CatalogItemsRequest(items=["7"]), metadata=metadata, timeout=30)
        assert reply.live_items == reply.catalog_size - 1
        stub.RestoreItems(pb2.CatalogItemsRequest(items=["7"]), metadata=metadata, timeout=30)
        model = http.get("/v1/models").json()
        path = free_path(store, model["semantic_id_shape"])
        clash = edit(http, "add", {"item_id": "brand-new", "semantic_id": taken_path(store)})
        assert clash.status_code == 422 and "already names" in clash.json()["error"]["message"]
        taken = edit(http, "add", {"item_id": "brand-new", "semantic_id": path})
        assert taken.status_code == 200, taken.text
        assert taken.json()["catalog_size"] == model["catalog_size"] + 1
        before = metric(scrape(server.http_url), "onerec_unknown_history_items_total")
        recommend(http, history=["brand-new"], mode="items", num_items=5)
        assert metric(scrape(server.http_url), "onerec_unknown_history_items_total") == before
        bad = stub.AddItem
        with pytest.raises(grpc.RpcError) as info:
            bad(pb2.AddItemRequest(item_id="x", semantic_id=[1]), metadata=metadata, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
    assert metric(scrape(server.http_url), "onerec_catalog_changes_total", op="add") >= 1


def test_edits_survive_a_restart_on_the_same_store(
    http: httpx.Client, service_launcher: ServiceLauncher, store: Path
) -> None:
    assert edit(http, "withdraw", {"items": ["9"]}).status_code == 200
    again = service_launcher.start(store, env={"ONEREC_POLL_INTERVAL_S": "0"})
    try:
        with httpx.Client(base_url=again.http_url, timeout=60.0) as client:
            model = client.get("/v1/models").json()
            assert model["live_items"] == model["catalog_size"] - 1
            answer = client.post(
                "/v1/recommend", json={"user_id": "u", "history": ["8", "10"], "num_items": 30, "timeout_ms": LONG}
            )
            assert answer.status_code == 200 and "9" not in [it["item_id"] for it in answer.json()["items"]]
    finally:
        service_launcher.stop(again)
        assert edit(http, "restore", {"items": ["9"]}).status_code == 200
