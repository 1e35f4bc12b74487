"""The service with the Redis feature store: key layout, bulk load, and a Redis outage under traffic.

Runs a real redis-server (private to this module, so the outage test can kill it) and a real
`onerec serve` process pointed at it.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from loadtest.launcher import REPO_ROOT, ServiceHandle
from service.features import history_key
from tests.plugins.servers import RedisServer, ServiceLauncher, metric, redis_binary, scrape


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = RedisServer(redis_binary(), tmp_path_factory.mktemp("redis-module"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(service_launcher: ServiceLauncher, demo_store: Path, own_redis: RedisServer) -> Any:
    handle = service_launcher.start(
        demo_store,
        env={
            "ONEREC_REDIS_URL": own_redis.url,
            "ONEREC_REDIS_TIMEOUT_MS": "100",
            "ONEREC_REDIS_RETRY_AFTER_MS": "200",
            "ONEREC_DEFAULT_BEAM_WIDTH": "8",
        },
    )
    yield handle
    service_launcher.stop(handle)


def items_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [it["item_id"] for it in response.json()["items"]]


def test_events_land_in_the_documented_redis_key(http: httpx.Client, own_redis: RedisServer) -> None:
    stored = http.post("/v1/events", json={"user_id": "r-user", "items": ["40", "41"]}).json()["history"]
    assert stored == ["40", "41"]
    client = redis.Redis.from_url(own_redis.url, decode_responses=True)
    assert client.lrange(history_key("r-user"), 0, -1) == ["40", "41"]
    assert http.get("/readyz").json()["feature_store"]["backend"] == "redis"
    answer = http.post("/v1/recommend", json={"user_id": "r-user", "num_items": 10})
    assert not set(items_of(answer)) & {"40", "41"}
    assert answer.json()["degraded"] is False


def test_features_load_cli_bulk_loads_redis(
    http: httpx.Client, own_redis: RedisServer, tmp_path: Path, demo_store: Path
) -> None:
    sequences = tmp_path / "sequences.txt"
    sequences.write_text("bulk-1 10 11 12 13\nbulk-2 20 21\n")
    done = subprocess.run(
        [sys.executable, "-m", "service", "features", "load", "--dataset", str(sequences),
         "--redis-url", own_redis.url, "--history-length", "3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"users": 2' in done.stdout
    client = redis.Redis.from_url(own_redis.url, decode_responses=True)
    assert client.lrange(history_key("bulk-1"), 0, -1) == ["11", "12", "13"]
    stored_based = items_of(http.post("/v1/recommend", json={"user_id": "bulk-1", "num_items": 10}))
    explicit = items_of(http.post("/v1/recommend", json={"user_id": "bulk-1", "history": ["11", "12", "13"],
                                                         "num_items": 10}))  # fmt: skip
    assert stored_based == explicit
    assert not set(stored_based) & {"11", "12", "13"}


def test_redis_outage_degrades_without_failures_and_recovers(
    http: httpx.Client, server: ServiceHandle, own_redis: RedisServer
) -> None:
    http.post("/v1/events", json={"user_id": "fault-user", "items": ["50", "51", "52"]})
    statuses: Counter[int] = Counter()
    degraded_seen: list[bool] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=server.http_url, timeout=30.0) as client:
            while not stop.is_set():
                response = client.post("/v1/recommend", json={"user_id": "fault-user", "num_items": 5})
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    degraded_seen.append(response.json()["degraded"])

    before = metric(scrape(server.http_url), "onerec_degraded_responses_total")
    flow = threading.Thread(target=traffic)
    flow.start()
    try:
        time.sleep(0.5)
        own_redis.kill()  # outage while requests flow
        time.sleep(1.0)
        down = http.post("/v1/recommend", json={"user_id": "fault-user", "num_items": 5})
        assert down.status_code == 200 and down.json()["degraded"] is True
        assert len(down.json()["items"]) == 5  # popularity fallback still fills the answer
        with_history = http.post("/v1/recommend", json={"user_id": "fault-user", "history": ["50"], "num_items": 5})
        assert with_history.status_code == 200 and with_history.json()["degraded"] is False
        assert http.post("/v1/events", json={"user_id": "fault-user", "items": ["53"]}).status_code == 503
        assert http.get("/readyz").json()["feature_store"]["ok"] is False
        own_redis.start()  # same port, empty data: the service must reconnect by itself
        recovered = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not recovered:
            response = http.post("/v1/recommend", json={"user_id": "fault-user", "num_items": 5})
            recovered = response.status_code == 200 and response.json()["degraded"] is False
            time.sleep(0.05)
        assert recovered, "answers still degraded 10 s after Redis came back"
        time.sleep(0.3)
    finally:
        stop.set()
        flow.join(30)
    assert set(statuses) == {200}, statuses  # no request failed during the outage
    assert True in degraded_seen and degraded_seen[-1] is False
    assert metric(scrape(server.http_url), "onerec_degraded_responses_total") - before >= 1
    errors = metric(scrape(server.http_url), "onerec_feature_store_errors_total", backend="redis")
    assert errors >= 1
    assert http.post("/v1/events", json={"user_id": "fault-user", "items": ["53"]}).status_code == 200
