"""Model hot reload and rollback, corrupt versions, overload shedding, and SIGTERM draining.

Each scenario runs against a real `onerec serve` subprocess. The reload server gets a private copy of
the demo store, because the test publishes (and corrupts) versions in it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from loadtest.launcher import ServiceHandle
from model_store import list_versions, publish_version
from onerec_proto import pb2
from tests.plugins.servers import ServiceLauncher, copy_store, grpc_stub, metric, scrape

TOKEN = "test-admin-token"
RESERVED = {"schema_version", "name", "version", "created", "files", "tensors"}


def republish(store: Path, name: str = "demo", source_version: int = 1) -> int:
    """Publish the files of an existing version again as a new version (a 'retrained' model)."""
    import json

    src = store / name / str(source_version)
    manifest = json.loads((src / "manifest.json").read_text())
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file() and p.name != "manifest.json"}
    metadata = {k: v for k, v in manifest.items() if k not in RESERVED}
    return publish_version(store, name, files, metadata).version


def publish_corrupt(store: Path, scratch: Path, name: str = "demo", source_version: int = 1) -> int:
    """Put a version whose weights fail their checksum into the store, atomically (as a publisher would).

    The copy is corrupted outside the store and renamed in, so a poller never sees a half-made or a
    still-valid version under the new number. Bytes are flipped without changing the size: only the
    sha256 can tell.
    """
    import json
    import os
    import shutil

    version = max(list_versions(store, name)) + 1
    staged = scratch / f"v{version}"
    shutil.copytree(store / name / str(source_version), staged)
    manifest = json.loads((staged / "manifest.json").read_text())
    manifest["version"] = version
    (staged / "manifest.json").write_text(json.dumps(manifest))
    weights = staged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for offset in range(len(data) - 64, len(data) - 32):
        data[offset] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.rename(staged, store / name / str(version))
    return version


# ---- hot reload ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reload_store(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_store(demo_store, tmp_path_factory.mktemp("reload") / "store")


@pytest.fixture(scope="module")
def reload_server(service_launcher: ServiceLauncher, reload_store: Path) -> Any:
    handle = service_launcher.start(
        reload_store,
        env={"ONEREC_ADMIN_TOKEN": TOKEN, "ONEREC_POLL_INTERVAL_S": "0.2", "ONEREC_DEFAULT_BEAM_WIDTH": "8"},
    )
    yield handle
    service_launcher.stop(handle)


class TrafficLoop:
    """Background client alternating HTTP and gRPC requests; records every outcome and version."""

    def __init__(self, server: ServiceHandle) -> None:
        self.server = server
        self.outcomes: Counter[str] = Counter()
        self.versions: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> TrafficLoop:
        self._thread.start()
        return self

    def wait_until(self, condition: Any, what: str, timeout: float = 120.0) -> None:
        """Wait for a condition on what the loop has seen (never a fixed sleep: machines are loaded)."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"traffic loop: timed out waiting for {what}: {self.outcomes}"
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        channel, stub = grpc_stub(self.server.grpc_target)
        with httpx.Client(base_url=self.server.http_url, timeout=30.0) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                body = {"user_id": f"loop-{i % 7}", "history": [str(i % 50), "3"], "num_items": 5}
                if i % 2:
                    response = client.post("/v1/recommend", json=body)
                    self.outcomes[f"http:{response.status_code}"] += 1
                    if response.status_code == 200:
                        self.versions.append(response.json()["model"]["version"])
                else:
                    try:
                        reply = stub.Recommend(pb2.RecommendRequest(**body), timeout=30)
                        self.outcomes["grpc:OK"] += 1
                        self.versions.append(reply.model.version)
                    except grpc.RpcError as exc:
                        self.outcomes[f"grpc:{exc.code().name}"] += 1
        channel.close()


def served_version(http: httpx.Client) -> str:
    return str(http.get("/v1/models").json()["version"])


def wait_for_version(http: httpx.Client, version: str, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served_version(http) == version:
            return True
        time.sleep(0.05)
    return False


def test_new_version_is_picked_up_under_load_without_failures(reload_server: ServiceHandle, reload_store: Path) -> None:
    with httpx.Client(base_url=reload_server.http_url, timeout=30.0) as http:
        assert served_version(http) == "1"
        with TrafficLoop(reload_server) as loop:
            loop.wait_until(lambda: len(loop.versions) >= 5, "answers before the reload")
            new = republish(reload_store)
            assert new == 2
            assert wait_for_version(http, "2"), "poller did not pick up version 2"
            loop.wait_until(lambda: loop.versions[-5:].count("2") == 5, "answers after the reload")
        assert set(loop.outcomes) <= {"http:200", "grpc:OK"}, loop.outcomes
        assert sum(loop.outcomes.values()) >= 10
        assert "1" in loop.versions and "2" in loop.versions
        assert loop.versions[-1] == "2"
        # versions never go back: in-flight requests finish on the old model, new ones use the new one
        first_new = loop.versions.index("2")
        assert set(loop.versions[first_new:]) == {"2"}
        samples = scrape(reload_server.http_url)
        assert metric(samples, "onerec_model_info", version="2") == 1
        assert metric(samples, "onerec_model_info", version="1") == 0
        assert metric(samples, "onerec_model_reloads_total", result="loaded") >= 2


def test_corrupt_version_is_refused_and_old_one_keeps_serving(
    reload_server: ServiceHandle, reload_store: Path, tmp_path: Path
) -> None:
    with httpx.Client(base_url=reload_server.http_url, timeout=30.0) as http:
        start_version = served_version(http)
        before = metric(scrape(reload_server.http_url), "onerec_model_versions_rejected_total")
        with TrafficLoop(reload_server) as loop:
            bad = publish_corrupt(reload_store, tmp_path)
            time.sleep(1.0)  # several poll intervals: the poller must refuse it too
            refused = http.post("/v1/models/reload", headers={"Authorization": f"Bearer {TOKEN}"})
            assert refused.status_code == 409, refused.text
            assert refused.json()["error"]["code"] == "reload_refused"
            assert str(bad) in refused.json()["error"]["message"]
        assert served_version(http) == start_version
        assert set(loop.outcomes) <= {"http:200", "grpc:OK"}, loop.outcomes
        assert set(loop.versions) == {start_version}
        assert metric(scrape(reload_server.http_url), "onerec_model_versions_rejected_total") - before == 1
        assert bad in list_versions(reload_store, "demo")


def test_admin_reload_needs_the_token_and_can_roll_back(reload_server: ServiceHandle) -> None:
    with httpx.Client(base_url=reload_server.http_url, timeout=30.0) as http:
        assert http.post("/v1/models/reload").status_code == 401
        assert http.post("/v1/models/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        newest_valid = served_version(http)
        rollback = http.post("/v1/models/reload", json={"version": 1}, headers=auth)
        assert rollback.status_code == 200, rollback.text
        assert rollback.json()["result"] == "loaded" and served_version(http) == "1"
        time.sleep(0.6)  # pinned: the poller must not move it forward again
        assert served_version(http) == "1"
        answer = http.post("/v1/recommend", json={"user_id": "rb", "history": ["1"]})
        assert answer.json()["model"]["version"] == "1"
        forward = http.post("/v1/models/reload", json={}, headers=auth)
        assert forward.status_code == 409  # the newest (corrupt) is refused; the newest valid one is served
        assert served_version(http) == newest_valid
        assert http.post("/v1/models/reload", json={"version": 99}, headers=auth).status_code == 409


# ---- overload and shutdown ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tight_server(service_launcher: ServiceLauncher, demo_store: Path) -> Any:
    handle = service_launcher.start(
        demo_store,
        env={"ONEREC_MAX_QUEUE": "2", "ONEREC_MAX_BATCH_SIZE": "1", "ONEREC_DRAIN_TIMEOUT_S": "30"},
    )  # fmt: skip
    yield handle
    service_launcher.stop(handle)


# A deadline no loaded machine misses: the only refusals left are the queue's, never a 504.
SLOW_BODY = {"user_id": "heavy", "history": ["1", "2", "3"], "num_items": 50, "mode": "session", "beam_width": 128,
             "timeout_ms": 120000}  # fmt: skip


async def _burst(url: str, n: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=httpx.Limits(max_connections=n)) as client:
        responses = await asyncio.gather(*(client.post("/v1/recommend", json=SLOW_BODY) for _ in range(n)))
    return [r.status_code for r in responses]


def test_overload_sheds_with_429_not_timeouts(tight_server: ServiceHandle) -> None:
    before = metric(scrape(tight_server.http_url), "onerec_rejections_total", reason="queue_full")
    started = time.monotonic()
    statuses = Counter(asyncio.run(_burst(tight_server.http_url, 24)))
    elapsed = time.monotonic() - started
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] >= 1 and statuses[200] >= 1, statuses
    assert elapsed < 60
    after = metric(scrape(tight_server.http_url), "onerec_rejections_total", reason="queue_full")
    assert after - before == statuses[429]

    channel, stub = grpc_stub(tight_server.grpc_target)
    futures = [stub.Recommend.future(pb2.RecommendRequest(**SLOW_BODY), timeout=60) for _ in range(16)]
    codes: Counter[str] = Counter()
    for future in futures:
        try:
            future.result()
            codes["OK"] += 1
        except grpc.RpcError as exc:
            codes[exc.code().name] += 1
    channel.close()
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["RESOURCE_EXHAUSTED"] >= 1 and codes["OK"] >= 1, codes


def test_sigterm_drains_in_flight_requests_then_exits(tight_server: ServiceHandle) -> None:
    results: list[int | str] = []

    def call() -> None:
        try:
            with httpx.Client(timeout=60.0) as client:
                results.append(client.post(f"{tight_server.http_url}/v1/recommend", json=SLOW_BODY).status_code)
        except httpx.TransportError:
            results.append("refused")  # connected after the listener closed: never in flight

    # Three callers behind a one-request engine (queue of 2): however fast a request is, some wait while one runs.
    # A host loaded enough can still start them one after another; then three more go, until two overlap.
    callers: list[threading.Thread] = []
    deadline = time.monotonic() + 60
    while (in_flight := metric(scrape(tight_server.http_url), "onerec_inflight_requests", api="http")) < 2:
        assert time.monotonic() < deadline, "requests never became in-flight"
        if not any(caller.is_alive() for caller in callers):
            fresh = [threading.Thread(target=call) for _ in range(3)]
            for caller in fresh:
                caller.start()
            callers += fresh
        time.sleep(0.005)
    tight_server.terminate()  # SIGTERM while at least two are being served / queued
    for caller in callers:
        caller.join(60)
    # Every request in flight at SIGTERM is answered in full; one that arrives later (a loaded machine can
    # start a caller late) is refused cleanly, with 503 or a closed socket, never lost.
    assert len(results) == len(callers), results
    assert results.count(200) >= in_flight, (results, in_flight)
    assert all(r in (200, 503, "refused") for r in results), results
    assert tight_server.proc.wait(30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{tight_server.http_url}/healthz", timeout=2)
    assert '"event":"stopped"' in tight_server.log_text()
