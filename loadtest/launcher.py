"""Start a server as a real subprocess on free loopback ports, wait until it answers, stop it.

``start_service`` runs ``onerec serve``; ``start_server`` runs any HTTP server command (the
benchmarks' Hugging Face baseline). The test fixtures (tests/plugins/servers.py) and the benchmarks
use them, so both exercise exactly what an operator runs: a separate process, real sockets, SIGTERM
to stop. Like the rest of ``loadtest``, this reaches the service only over the wire: a command line
and HTTP, never an import. Output goes to a log file (a pipe nobody reads would eventually block
the server).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceStartError(RuntimeError):
    """The server exited or never became ready; the message carries the end of its log."""


@dataclass
class ServerHandle:
    """A running server process, how to reach it over HTTP, and its log."""

    proc: subprocess.Popen[bytes]
    http_port: int
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def terminate(self) -> None:
        """Send SIGTERM (graceful drain) without waiting."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the exit (SIGKILL after `timeout`); returns the exit code."""
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@dataclass
class ServiceHandle(ServerHandle):
    """A running ``onerec serve``: its HTTP front end and its gRPC port."""

    grpc_port: int

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def _spawn(
    cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None
) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """Start `cmd` in the repository root, its output appended to `log_path`; returns it and its environment."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(list(cmd), cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    return proc, full_env


def _ready_or_stopped(handle: ServerHandle, ready_path: str, timeout: float) -> None:
    """Wait until ready; a server that is not is stopped before the error propagates (no orphan)."""
    try:
        wait_ready(handle, timeout, ready_path)
    except BaseException:
        handle.stop(5)
        raise


def start_server(
    cmd: Sequence[str],
    http_port: int,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    ready_path: str = "/healthz",
    ready_timeout: float = 120.0,
) -> ServerHandle:
    """Run `cmd` (which must listen on 127.0.0.1:`http_port`); return once `ready_path` answers 200."""
    proc, full_env = _spawn(cmd, log_path, env)
    handle = ServerHandle(proc, http_port, log_path, full_env)
    _ready_or_stopped(handle, ready_path, ready_timeout)
    return handle


def start_service(
    store: Path,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    ready_timeout: float = 120.0,
    python: str | None = None,
) -> ServiceHandle:
    """Run `python -m service serve` with the store and settings given; return once /readyz is 200."""
    http_port, grpc_port = free_port(), free_port()
    while grpc_port == http_port:
        grpc_port = free_port()
    cmd = [
        python or sys.executable, "-m", "service", "serve",
        "--model-store", str(store),
        "--http-host", "127.0.0.1", "--http-port", str(http_port),
        "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port),
        *args,
    ]  # fmt: skip
    proc, full_env = _spawn(cmd, log_path, env)
    handle = ServiceHandle(proc, http_port, log_path, full_env, grpc_port=grpc_port)
    _ready_or_stopped(handle, "/readyz", ready_timeout)
    return handle


def wait_ready(handle: ServerHandle, timeout: float, path: str = "/readyz") -> None:
    """Poll `path` until 200; raise ServiceStartError with the log tail if the server exits or times out."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not handle.alive():
                raise ServiceStartError(
                    f"server exited with {handle.proc.returncode} before ready:\n{handle.log_tail()}"
                )
            try:
                if client.get(f"{handle.http_url}{path}").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise ServiceStartError(f"server not ready after {timeout:.0f}s:\n{handle.log_tail()}")
