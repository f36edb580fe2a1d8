"""Connection limits uvicorn lacks: header and body-read timeouts and a cap on connections.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`), but waits forever for
the headers of a request and for the rest of its body, and accepts every connection the
kernel hands it. A client that opens connections and sends nothing, half a header line or
half a body would hold descriptors and buffered bytes as long as it likes. The protocol
class below adds, per connection:

- a header timeout: the request line and headers must arrive within `header_timeout_s`
  of the connection opening (or of the request's first byte, on a kept-alive connection);
- a body timeout: no gap between two pieces of a request body may exceed `body_timeout_s`
  (as nginx's client_body_timeout), unless the server itself paused reading;
- a connection cap: above `max_connections` open connections a new one is answered 503
  and closed at once, so that descriptors stay for the clients already served.
"""

from __future__ import annotations

import argparse
import resource
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MODEL_CONTROL_MODES = ("none", "explicit")  # as Triton's --model-control-mode
DESCRIPTORS_KEPT = 64  # for model files, the listening socket, logs and threads


def default_max_connections() -> int:
    """Connections that fit under the process's descriptor limit, at most 1024."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, soft - DESCRIPTORS_KEPT))


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int | None = None  # None: default_max_connections()

    def __post_init__(self) -> None:
        timeouts = (self.header_timeout_s, self.body_timeout_s, self.keep_alive_s)
        if min(timeouts) <= 0:
            raise ValueError("header, body and keep-alive timeouts must be positive")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be positive")

    @property
    def connection_cap(self) -> int:
        return self.max_connections or default_max_connections()


def _plain_response(status: bytes, message: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain\r\nconnection: close\r\n"
        b"content-length: " + str(len(message)).encode() + b"\r\n\r\n" + message
    )


SERVICE_UNAVAILABLE = _plain_response(b"503 Service Unavailable", b"too many connections")
REQUEST_TIMEOUT = _plain_response(b"408 Request Timeout", b"request headers not received in time")


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with `limits` applied (pass it as uvicorn's `http`)."""
    cap = limits.connection_cap

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = self._body_timer = None
            self._last_body = 0.0
            if len(self.connections) > cap:
                transport.write(SERVICE_UNAVAILABLE)
                transport.close()
                return
            self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_timers()
            super().connection_lost(exc)

        # -- headers ------------------------------------------------------------------

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(
                    limits.header_timeout_s, self._headers_too_slow
                )

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_timer()  # a kept-alive connection's next request

        def on_headers_complete(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            self._last_body = self.loop.time()
            self._body_timer = self.loop.call_later(limits.body_timeout_s, self._body_check)
            super().on_headers_complete()

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                if self.parser is not None and self.headers is not None:
                    self.transport.write(REQUEST_TIMEOUT)  # a request had begun
                self.transport.close()

        # -- body -----------------------------------------------------------------------

        def on_body(self, body: bytes) -> None:
            self._last_body = self.loop.time()
            super().on_body(body)

        def on_message_complete(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            super().on_message_complete()

        def _body_check(self) -> None:
            """Close a connection whose body stalled; the app then sees a disconnect."""
            self._body_timer = None
            if self.transport.is_closing():
                return
            idle = self.loop.time() - self._last_body
            if self.flow.read_paused or idle < limits.body_timeout_s:
                # the server stopped reading (its buffer is full), or bytes came meanwhile
                wait = limits.body_timeout_s - idle if not self.flow.read_paused else 1.0
                self._body_timer = self.loop.call_later(max(wait, 0.01), self._body_check)
                return
            self.transport.close()

        def _cancel_timers(self) -> None:
            for timer in (self._header_timer, self._body_timer):
                if timer is not None:
                    timer.cancel()
            self._header_timer = self._body_timer = None

    return GuardedHttpToolsProtocol


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """`mlet serve` flags for connection limits and model control."""
    defaults = ConnectionLimits()
    group = parser.add_argument_group("connections and model control")
    group.add_argument(
        "--header-timeout", type=float, default=defaults.header_timeout_s,
        help="seconds for a request's headers to arrive (408 and close after)",
    )  # fmt: skip
    group.add_argument(
        "--body-timeout", type=float, default=defaults.body_timeout_s,
        help="longest gap in seconds between two pieces of a request body",
    )  # fmt: skip
    group.add_argument(
        "--keep-alive-timeout", type=float, default=defaults.keep_alive_s,
        help="seconds an idle kept-alive connection stays open",
    )  # fmt: skip
    group.add_argument(
        "--max-connections", type=int,
        help="open connections at most; more are answered 503 and closed "
        "(default: what the descriptor limit allows, at most 1024)",
    )  # fmt: skip
    group.add_argument(
        "--model-control-mode", choices=MODEL_CONTROL_MODES, default="none",
        help="none: the models loaded at start stay; explicit: clients may load and unload",
    )  # fmt: skip


def connection_limits(args: argparse.Namespace) -> ConnectionLimits:
    return ConnectionLimits(
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        keep_alive_s=args.keep_alive_timeout,
        max_connections=args.max_connections,
    )
