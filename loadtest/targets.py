"""Where a replay sends its requests: a loopback guard, a lean HTTP/1.1 client and a gRPC client.

The HTTP client is written on raw asyncio streams rather than httpx on purpose: a load generator
shares the machine with the service it measures, and every microsecond of client CPU per request
is taken from the server and makes the client fall behind sooner. It keeps a pool of keep-alive
connections (one per request in flight: HTTP/1.1 has no usable pipelining) and reads only the
status line, the headers and the body length.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from loadtest.trace import TraceRecord


class RemoteTargetError(ValueError):
    """The target resolves to an address that is not loopback and --allow-remote was not given."""


class ProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.1 this client can read."""


@dataclass(frozen=True)
class TargetAddress:
    scheme: str  # "http" | "grpc"
    host: str
    port: int
    path: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self._host_for_url()}:{self.port}"

    def _host_for_url(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


def parse_target(url: str) -> TargetAddress:
    """``http://HOST:PORT[/path]`` or ``grpc://HOST:PORT``; the HTTP path defaults to /v1/recommend."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "grpc"):
        raise ValueError(f"target must start with http:// or grpc://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"target has no host: {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in target {url!r}: {exc}") from None
    if port is None:
        port = 80 if parts.scheme == "http" else 50051
    path = parts.path if parts.path not in ("", "/") else "/v1/recommend"
    return TargetAddress(parts.scheme, parts.hostname, port, path)


def is_loopback_host(host: str) -> bool:
    """True when every address the host resolves to is loopback (127.0.0.0/8 or ::1).

    All addresses must be loopback, not just one: a name that resolves to a loopback *and* a remote
    address could send traffic off the machine.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    addresses = {str(info[4][0]) for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_target_allowed(address: TargetAddress, allow_remote: bool) -> None:
    """Refuse a non-loopback target unless the operator said --allow-remote."""
    if allow_remote or is_loopback_host(address.host):
        return
    raise RemoteTargetError(
        f"refusing to send load to {address.host!r}: it is not a loopback address (127.0.0.0/8, ::1, "
        "localhost); pass --allow-remote if you really mean to load a remote service"
    )


class Target(Protocol):
    """Sends one request and returns (status, ok). Raises on transport failure or timeout."""

    async def send(self, record: TraceRecord) -> tuple[str, bool]: ...

    async def close(self) -> None: ...


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class HttpTarget:
    """POSTs each record's body as JSON over a pool of keep-alive HTTP/1.1 connections."""

    def __init__(self, address: TargetAddress) -> None:
        self.address = address
        self._idle: list[Connection] = []
        self._open: set[asyncio.StreamWriter] = set()
        host_header = address._host_for_url()
        self._head = (
            f"POST {address.path} HTTP/1.1\r\nHost: {host_header}:{address.port}\r\n"
            "Content-Type: application/json\r\nAccept: application/json\r\nContent-Length: "
        ).encode("ascii")

    async def send(self, record: TraceRecord) -> tuple[str, bool]:
        body = json.dumps(record.request_body(), separators=(",", ":")).encode("utf-8")
        payload = self._head + str(len(body)).encode("ascii") + b"\r\n\r\n" + body
        reused = bool(self._idle)
        conn = self._idle.pop() if reused else await self._connect()
        try:
            status, keep_alive = await self._exchange(conn, payload)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self._discard(conn)
            if not reused or isinstance(exc, ProtocolError):
                raise
            # A pooled connection the server closed while idle: retry once on a fresh one.
            conn = await self._connect()
            try:
                status, keep_alive = await self._exchange(conn, payload)
            except BaseException:
                self._discard(conn)
                raise
        except BaseException:
            self._discard(conn)  # timeout or cancellation mid-exchange: the stream state is unknown
            raise
        if keep_alive:
            self._idle.append(conn)
        else:
            self._discard(conn)
        return str(status), 200 <= status < 300

    async def _connect(self) -> Connection:
        reader, writer = await asyncio.open_connection(self.address.host, self.address.port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._open.add(writer)
        return reader, writer

    def _discard(self, conn: Connection) -> None:
        writer = conn[1]
        self._open.discard(writer)
        writer.close()

    @staticmethod
    async def _exchange(conn: Connection, payload: bytes) -> tuple[int, bool]:
        reader, writer = conn
        writer.write(payload)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("server closed the connection before answering")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {status_line[:80]!r}")
        status = int(parts[1])
        length: int | None = None
        chunked = False
        keep_alive = parts[0] == b"HTTP/1.1"
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ConnectionResetError("connection closed inside the response headers")
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-length":
                length = int(value.strip())
            elif key == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif key == b"connection":
                keep_alive = value.strip().lower() != b"close"
        if chunked:
            await HttpTarget._read_chunked(reader)
        elif length is not None:
            await reader.readexactly(length)
        else:
            await reader.read()  # body runs to the end of the connection
            keep_alive = False
        return status, keep_alive

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> None:
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            await reader.readexactly(size + 2)

    async def close(self) -> None:
        for writer in list(self._open):
            writer.close()
        self._open.clear()
        self._idle.clear()


class GrpcTarget:
    """Calls ``onerec.v1.Recommender/Recommend`` on one ``grpc.aio`` channel (HTTP/2 streams)."""

    def __init__(self, address: TargetAddress, timeout_s: float) -> None:
        import grpc  # here, not at the top: an HTTP-only replay never loads grpc or the stubs

        from onerec_proto import pb2, pb2_grpc

        self._grpc = grpc
        self._messages = pb2
        self._channel = grpc.aio.insecure_channel(f"{address._host_for_url()}:{address.port}")
        self._stub = pb2_grpc.RecommenderStub(self._channel)
        self._timeout_s = timeout_s

    def _request(self, record: TraceRecord) -> Any:
        return self._messages.RecommendRequest(**record.request_body())

    async def send(self, record: TraceRecord) -> tuple[str, bool]:
        try:
            await self._stub.Recommend(self._request(record), timeout=self._timeout_s)
        except self._grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == self._grpc.StatusCode.DEADLINE_EXCEEDED:
                return "DEADLINE_EXCEEDED", False
            return code.name, False
        return "OK", True

    async def close(self) -> None:
        await self._channel.close()


def make_target(address: TargetAddress, timeout_s: float) -> Target:
    if address.scheme == "grpc":
        return GrpcTarget(address, timeout_s)
    return HttpTarget(address)
