"""Slow and stalled clients against a real server process, over raw sockets.

The server runs with short timeouts; each check waits on a socket with a generous guard
and asserts what happened (closed, 408, 503), never how long it took.
"""

import asyncio
import json
import logging
import socket

import numpy as np
import pytest

from bench.load.request_bodies import encode_inputs
from mlet.repository import open_model
from serve.http import HttpLimits, HttpServer, Response
from serve.process import running_server

GUARD_S = 20.0  # far above the timeouts below: only a server that never closes reaches it
LIMITS = ("--header-timeout", "0.5", "--body-timeout", "0.5", "--keep-alive", "0.5")


@pytest.fixture(scope="module")
def server(tiny_repo):
    with running_server(tiny_repo, ["full"], *LIMITS, "--max-connections", "6") as (url, _):
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


def connect(address) -> socket.socket:
    return socket.create_connection(address, timeout=GUARD_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def infer_request(tiny_repo, body_bytes: bytes | None = None) -> bytes:
    spec = open_model(tiny_repo / "full").manifest.spec
    payload, _ = encode_inputs(spec, spec.random_inputs(2, np.random.default_rng(0)), False)
    body = payload if body_bytes is None else body_bytes
    return (
        b"POST /v2/models/full/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def test_a_silent_connection_is_closed(server):
    with connect(server) as sock:
        assert read_until_closed(sock) == b""


def test_half_sent_headers_get_408_and_close(server):
    with connect(server) as sock:
        sock.sendall(b"POST /v2/models/full/infer HTTP/1.1\r\nhost: x\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408")


def test_a_stalled_body_is_closed(server, tiny_repo):
    with connect(server) as sock:
        request = infer_request(tiny_repo)
        sock.sendall(request[:-10])  # all but the last bytes of the body
        answer = read_until_closed(sock)
        assert b" 200 " not in answer.split(b"\r\n", 1)[0]


def test_an_idle_kept_alive_connection_is_closed(server, tiny_repo):
    with connect(server) as sock:
        sock.sendall(infer_request(tiny_repo))
        answer = read_until_closed(sock)  # the answer, then the close after keep-alive
        assert answer.startswith(b"HTTP/1.1 200")


def test_connections_above_the_cap_are_refused_and_service_recovers(server, tiny_repo):
    idle = [connect(server) for _ in range(6)]  # every slot held by a silent client
    try:
        with connect(server) as extra:
            assert read_until_closed(extra).startswith(b"HTTP/1.1 503")
    finally:
        for sock in idle:
            assert read_until_closed(sock) == b""  # the header timeout frees each slot
            sock.close()
    with connect(server) as sock:
        sock.sendall(infer_request(tiny_repo))
        status_line = sock.recv(65536).split(b"\r\n", 1)[0]
        assert status_line == b"HTTP/1.1 200 OK"


def test_a_body_larger_than_the_model_can_need_is_refused_before_it_is_sent(server):
    """Only the headers go out: the 413 comes back without the 50 MiB body ever being read."""
    with connect(server) as sock:
        sock.sendall(
            b"POST /v2/models/full/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 52428800\r\n\r\n"
        )
        answer = read_until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert "the bound for model 'full' (max batch 512)" in json.loads(body)["error"]


def serve_in_process(scenario, handler, body_limit=None):
    async def main():
        server = HttpServer(handler, HttpLimits(), body_limit)
        await server.listen("127.0.0.1", 0)
        port = server._server.sockets[0].getsockname()[1]
        try:
            return await asyncio.wait_for(scenario(port), GUARD_S)
        finally:
            await server.drain(1.0)

    return asyncio.run(main())


def test_a_client_leaving_mid_upload_costs_no_handler_call_and_no_traceback(caplog):
    """Under the ASGI stack this raised ClientDisconnect into the 500 handler: two tracebacks."""
    calls = []

    async def handler(request):
        calls.append(request)
        return Response(200, b"{}")

    async def scenario(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v2/models/m/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n")
        writer.write(b'{"inputs": [')
        await writer.drain()
        writer.close()
        await asyncio.sleep(0.2)  # let the server see the disconnect

    serve_in_process(scenario, handler)
    assert calls == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_the_body_limit_hook_bounds_each_path():
    async def handler(request):
        return Response(200, b"{}")

    async def scenario(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /small HTTP/1.1\r\nhost: x\r\ncontent-length: 11\r\n\r\n")
        answer = await reader.readuntil(b"}")  # the 413 comes before any body byte is sent
        writer.close()
        return answer

    answer = serve_in_process(scenario, handler, lambda path: (10, f"the bound for {path}"))
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"exceeds the bound for /small of 10 bytes" in answer


def test_the_connection_cap_leaves_descriptors_under_a_low_limit(monkeypatch):
    """With 256 descriptors, 300 stalled clients blocked all service under a cap of 1024."""
    monkeypatch.setattr("resource.getrlimit", lambda kind: (256, 4096))
    assert HttpLimits().max_connections == 256 - 64
    monkeypatch.setattr("resource.getrlimit", lambda kind: (1 << 20, 1 << 20))
    assert HttpLimits().max_connections == 1024
