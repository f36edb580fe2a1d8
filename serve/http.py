"""HTTP/1.1 for the server: an asyncio protocol on httptools, and nothing else.

Each connection parses requests with httptools (llhttp, in C), hands every complete request
to one handler coroutine and writes the responses back in the order the requests came
(HTTP/1.1 pipelining). The connection enforces what a production server must: a cap on
open connections, a body size limit checked before the body is read, and timeouts for
headers, for the body and for idle keep-alive connections, so that a slow or silent
client never holds a descriptor or memory for long. Routing, decoding and inference live
behind the handler (serve.app); nothing here knows about models.

Why not a framework: a 1-row request is a few hundred bytes, and the per-request work of
an ASGI server plus a web framework (scope dicts, middleware layers, request objects)
cost more CPU than the model itself; see the README's serving section for the figures.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools
import orjson

log = logging.getLogger("mlet.serve")


DESCRIPTORS_KEPT = 64  # for model files, the listening socket, logs and threads


def default_max_connections() -> int:
    """1024, or fewer where the descriptor limit is lower: past the limit accept() fails
    and the connections already open would hold every descriptor until they time out."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, soft - DESCRIPTORS_KEPT))


@dataclass(frozen=True)
class HttpLimits:
    """What one client may cost the server; every timeout is in seconds."""

    max_body_bytes: int = 64 << 20
    # further connections get a 503 and are closed
    max_connections: int = field(default_factory=default_max_connections)
    header_timeout_s: float = 10.0  # from the first byte of a request to its last header
    body_timeout_s: float = 60.0  # from the last header to the last body byte
    keep_alive_s: float = 5.0  # an idle connection between requests is closed after this
    max_pipelined: int = 64  # requests queued on one connection before reading pauses

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_connections", "max_pipelined"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]
# path -> (largest body a request to it may have, what that bound is, for the 413 message)
BodyLimit = Callable[[str], tuple[int, str]]


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def encode_response(response: Response, keep_alive: bool) -> bytes:
    """Status line, headers and body in one buffer: one write, one syscall."""
    reason = HTTPStatus(response.status).phrase
    head = [
        f"HTTP/1.1 {response.status} {reason}",
        f"content-type: {response.content_type}",
        f"content-length: {len(response.body)}",
    ]
    head += [f"{name}: {value}" for name, value in response.headers.items()]
    if not keep_alive:
        head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body


class HttpConnection(asyncio.Protocol):
    """One client connection: parse, queue, answer in order, time out."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque[Request] = deque()
        self.worker: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False
        self._reset_message()

    # -- connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        if len(self.server.connections) >= self.limits.max_connections:
            self.server.refused_connections += 1
            self._fail(503, "too many open connections; try again later")
            return
        self.server.connections.add(self)
        self._arm(self.limits.keep_alive_s, "idle")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._disarm()
        self.server.connections.discard(self)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as e:
            self._fail(400, f"malformed HTTP request: {e}")

    # -- parser callbacks --------------------------------------------------------------

    def _reset_message(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.body_limit, self.limit_name = self.limits.max_body_bytes, "the limit"
        self.too_large = False
        self.receiving = False  # between a request's first byte and its last

    def on_message_begin(self) -> None:
        self._reset_message()
        self.receiving = True
        if self.idle:
            self._arm(self.limits.header_timeout_s, "headers")

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self.server.body_limit is not None:  # the route may need far less than the limit
            path = self.url.split(b"?", 1)[0].decode("latin-1")
            self.body_limit, self.limit_name = self.server.body_limit(path)
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.body_limit:
            self._refuse_body(f"request body of {declared} bytes")
            return
        if self.headers.get("expect", "").lower() == "100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.idle:
            self._arm(self.limits.body_timeout_s, "body")

    def on_body(self, chunk: bytes) -> None:
        if self.too_large:
            return
        self.body_bytes += len(chunk)
        if self.body_bytes > self.body_limit:
            self.body = []
            self._refuse_body("request body")
            return
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.receiving = False
        if self.too_large:
            self.transport.close()  # the 413 went out; the client has sent its last byte
            return
        request = Request(
            method=self.parser.get_method().decode("latin-1"),
            path=self.url.split(b"?", 1)[0].decode("latin-1"),
            headers=self.headers,
            body=b"".join(self.body),
        )
        self.pending.append(request)
        if len(self.pending) >= self.limits.max_pipelined:
            self.transport.pause_reading()
        if self.worker is None:
            self._disarm()
            self.worker = self.loop.create_task(self._answer_pending())

    # -- answering ---------------------------------------------------------------------

    async def _answer_pending(self) -> None:
        """Answer queued requests in order; arm the idle timer once the queue is empty."""
        try:
            while self.pending and not self.closing:
                request = self.pending.popleft()
                if len(self.pending) < self.limits.max_pipelined:
                    self.transport.resume_reading()
                try:
                    response = await self.server.handler(request)
                except Exception:  # the handler answers every error itself; this is a bug
                    log.exception("request to %s failed", request.path)
                    response = Response(500, error_body("internal error"))
                keep_alive = self._keeps_alive(request)
                if not self.closing:
                    self.transport.write(encode_response(response, keep_alive))
                if not keep_alive:
                    self.close()
                    return
        finally:
            self.worker = None
        if not self.closing:
            if self.receiving:  # the next request is arriving: time what is left of it
                self._arm(self.limits.header_timeout_s, "headers")
            else:
                self._arm(self.limits.keep_alive_s, "idle")

    def _keeps_alive(self, request: Request) -> bool:
        if self.server.draining:
            return False
        return self.parser.should_keep_alive() and request.headers.get("connection") != "close"

    def close(self) -> None:
        """Close now if nothing is being answered, else after the answer in progress."""
        if self.worker is None or self.closing:
            self.closing = True
            self.transport.close()
        else:
            self.pending.clear()

    @property
    def idle(self) -> bool:
        return self.worker is None and not self.pending

    # -- refusals and timers -----------------------------------------------------------

    def _refuse_body(self, what: str) -> None:
        """413 before the body is stored; the rest of the body is read and dropped, so that
        a client still sending can read the answer, then the connection closes."""
        self.too_large = True
        message = f"{what} exceeds {self.limit_name} of {self.body_limit} bytes"
        response = Response(413, error_body(message))
        self.transport.write(encode_response(response, keep_alive=False))
        if self.headers.get("expect", "").lower() == "100-continue":
            self.closing = True  # the client waits for a go-ahead it will not get
            self.transport.close()
        else:
            self._arm(self.limits.body_timeout_s, "body")

    def _fail(self, status: int, message: str) -> None:
        if self.transport.is_closing():
            return
        self.closing = True
        self.transport.write(encode_response(Response(status, error_body(message)), False))
        self.transport.close()

    def _arm(self, seconds: float, phase: str) -> None:
        self._disarm()
        self.timer = self.loop.call_later(seconds, self._timed_out, phase)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self, phase: str) -> None:
        self.timer = None
        if self.closing or not self.idle:
            return
        self.server.timeouts[phase] += 1
        if phase == "idle" or self.too_large:
            self.closing = True
            self.transport.close()
        else:
            self._fail(408, f"the request's {phase} did not arrive in time")


class HttpServer:
    """Listens, tracks connections, and drains them on shutdown."""

    def __init__(
        self,
        handler: Handler,
        limits: HttpLimits | None = None,
        body_limit: BodyLimit | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits or HttpLimits()
        self.body_limit = body_limit
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self.refused_connections = 0
        self.timeouts = {"headers": 0, "body": 0, "idle": 0}
        self._server: asyncio.Server | None = None

    async def listen(self, host: str, port: int) -> None:
        self._server = await self.loop.create_server(
            lambda: HttpConnection(self), host, port, reuse_address=True, backlog=2048
        )

    async def drain(self, grace_s: float) -> None:
        """Stop accepting; answer what is in flight (for up to grace_s), close the rest."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if connection.idle:
                connection.close()
        deadline = self.loop.time() + grace_s
        while any(not c.idle for c in self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.closing = True
            connection.transport.close()
