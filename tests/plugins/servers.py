"""Fixtures that run real processes: `redis-server` on a free port, and `onerec serve` subprocesses.

Never skipped: a missing redis-server binary fails the tests with a message saying how to install it
(`make test` installs Debian's redis-server through .ci/system-deps), because the Redis behaviour is part of
what is tested.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from loadtest.launcher import ServiceHandle, free_port, start_service


@dataclass
class RedisServer:
    """A private redis-server (no persistence) that a test can kill and restart on the same port."""

    binary: str
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) on the same port and wait until it answers PING."""
        import redis

        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - owned by the child from here on
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited with {self.proc.returncode}; see {self.workdir / 'redis.log'}")
            try:
                if client.ping():
                    client.close()
                    return
            except redis.RedisError:
                time.sleep(0.05)
        pytest.fail(f"redis-server not answering on port {self.port} after {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the abrupt outage the fault tests simulate."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server binary not found on PATH: the service tests need a real Redis. "
            "Install it (Debian/Ubuntu: apt-get install -y redis-server; `make test` does this as root).",
            pytrace=False,
        )
    return binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session (tests must use their own key names)."""
    server = RedisServer(redis_binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], RedisServer]]:
    """Dedicated redis-servers for tests that kill them; all stopped at the end of the test."""
    started: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(redis_binary(), tmp_path_factory.mktemp("redis-own"))
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


class ServiceLauncher:
    """Starts `onerec serve` subprocesses; whatever is still running at session end is stopped."""

    def __init__(self, logs_dir: Path) -> None:
        self.logs_dir = logs_dir
        self.running: list[ServiceHandle] = []
        self._count = 0

    def start(
        self,
        store: Path,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        ready_timeout: float = 120.0,
    ) -> ServiceHandle:
        """Start a service on free ports with `store` and ONEREC_* `env`; returns when /readyz is 200."""
        self._count += 1
        log_path = self.logs_dir / f"service-{self._count}.log"
        # A short poll interval keeps the hot-reload tests fast; a default deadline no loaded machine
        # misses keeps requests that give none from ending in 429/504 on a busy CI host. Tests may
        # override both.
        merged = {
            "ONEREC_LOG_LEVEL": "INFO",
            "ONEREC_POLL_INTERVAL_S": "0.25",
            "ONEREC_REQUEST_TIMEOUT_MS": "60000",
            **(env or {}),
        }
        handle = start_service(store, log_path, env=merged, args=args, ready_timeout=ready_timeout)
        self.running.append(handle)
        return handle

    def stop(self, handle: ServiceHandle, timeout: float = 30.0) -> int:
        code = handle.stop(timeout)
        if handle in self.running:
            self.running.remove(handle)
        return code

    def stop_all(self) -> None:
        for handle in list(self.running):
            self.stop(handle)


@pytest.fixture(scope="session")
def service_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceLauncher]:
    launcher = ServiceLauncher(tmp_path_factory.mktemp("service-logs"))
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def http(server: ServiceHandle) -> Iterator[httpx.Client]:
    """An HTTP client of the module's ``server`` fixture (each service test module starts its own)."""
    with httpx.Client(base_url=server.http_url, timeout=60.0) as client:
        yield client


def copy_store(src: Path, dst: Path) -> Path:
    """A private copy of a model store (tests that publish or corrupt versions must not touch the shared one)."""
    shutil.copytree(src, dst)
    return dst


# ---- helpers for tests that talk to a running service ------------------------------------------------


def scrape(http_url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET /metrics parsed by prometheus-client's parser: {sample name: {sorted labels: value}}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{http_url}/metrics", timeout=10).text
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def metric(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], sample_name: str, /, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
    want = set(labels.items())
    return sum(v for key, v in samples.get(sample_name, {}).items() if want <= set(key))


def grpc_stub(target: str):  # type: ignore[no-untyped-def]
    """(channel, RecommenderStub) for a service's gRPC port."""
    import grpc

    from onerec_proto import pb2_grpc

    channel = grpc.insecure_channel(target)
    return channel, pb2_grpc.RecommenderStub(channel)
