"""Start `onerec serve` as a real subprocess on free loopback ports, wait until ready, stop it.

Used by the test fixtures (tests/plugins/servers.py) and the benchmarks, so both exercise exactly
what an operator runs: a separate process, real sockets, SIGTERM to stop. Output goes to a log file
(a pipe nobody reads would eventually block the server).
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
    """The service exited or never became ready; the message carries the end of its log."""


@dataclass
class ServiceHandle:
    """A running service process and how to reach it."""

    proc: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

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
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [
        python or sys.executable, "-m", "service", "serve",
        "--model-store", str(store),
        "--http-host", "127.0.0.1", "--http-port", str(http_port),
        "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port),
        *args,
    ]  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    handle = ServiceHandle(proc, http_port, grpc_port, log_path, full_env)
    try:
        wait_ready(handle, ready_timeout)
    except BaseException:
        handle.stop(5)
        raise
    return handle


def wait_ready(handle: ServiceHandle, timeout: float) -> None:
    """Poll /readyz until 200; raise ServiceStartError with the log tail if it exits or times out."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not handle.alive():
                raise ServiceStartError(
                    f"service exited with {handle.proc.returncode} before ready:\n{handle.log_tail()}"
                )
            try:
                if client.get(f"{handle.http_url}/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise ServiceStartError(f"service not ready after {timeout:.0f}s:\n{handle.log_tail()}")
