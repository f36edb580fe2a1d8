"""The HTTP layer alone: an HttpServer with a stand-in handler, spoken to over raw sockets."""

import asyncio

import pytest

from serve.http import HttpLimits, HttpServer, Request, Response


async def echo(request: Request) -> Response:
    if request.path == "/slow":
        await asyncio.sleep(0.2)
    body = f"{request.method} {request.path} {len(request.body)}".encode()
    return Response(200, body, "text/plain")


def run(scenario, limits: HttpLimits | None = None):
    async def main():
        server = HttpServer(echo, limits)
        await server.listen("127.0.0.1", 0)
        port = server._server.sockets[0].getsockname()[1]
        try:
            return await asyncio.wait_for(scenario(server, port), 20)
        finally:
            await server.drain(1.0)

    return asyncio.run(main())


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed without an answer")
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return int(status_line.split()[1]), headers, body


def post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def test_pipelined_requests_are_answered_in_order_on_one_connection():
    async def scenario(server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/slow", b"ab") + post("/fast", b"abcd") + post("/x", b""))
        answers = [await read_response(reader) for _ in range(3)]
        writer.close()
        return answers

    answers = run(scenario)
    assert [body for _, _, body in answers] == [b"POST /slow 2", b"POST /fast 4", b"POST /x 0"]
    assert all(status == 200 for status, _, _ in answers)


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read():
    async def scenario(server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n" + b"a" * 100)
        status, headers, body = await read_response(reader)
        writer.write(b"a" * 4900)  # the client may finish sending; the answer stands
        closed = await reader.read() == b""
        return status, headers, body, closed

    status, headers, body, closed = run(scenario, HttpLimits(max_body_bytes=1000))
    assert status == 413 and b"5000 bytes exceeds the limit of 1000" in body
    assert headers["connection"] == "close" and closed


def test_a_chunked_body_over_the_limit_is_refused():
    async def scenario(server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        chunk = b"a" * 800
        writer.write(
            b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"320\r\n" + chunk + b"\r\n" + b"320\r\n" + chunk + b"\r\n0\r\n\r\n"
        )  # fmt: skip
        return await read_response(reader)

    status, _, body = run(scenario, HttpLimits(max_body_bytes=1000))
    assert status == 413 and b"exceeds the limit of 1000 bytes" in body


def test_expect_continue_gets_a_go_ahead_then_the_answer():
    async def scenario(server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n"
        )
        interim = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"abc")
        return interim, await read_response(reader)

    interim, (status, _, body) = run(scenario)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    assert status == 200 and body == b"POST /x 3"


@pytest.mark.parametrize(
    "sent, phase",
    [
        (b"", "idle"),  # connects and says nothing
        (b"POST /x HTTP/1.1\r\nhost: x\r\ncont", "headers"),  # stops inside the headers
        (b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc", "body"),  # stalls
    ],
)
def test_a_stalled_client_is_disconnected_after_its_timeout(sent, phase):
    limits = HttpLimits(header_timeout_s=0.2, body_timeout_s=0.2, keep_alive_s=0.2)

    async def scenario(server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(sent)
        rest = await reader.read()  # returns once the server closes the connection
        return rest, dict(server.timeouts), len(server.connections)

    rest, timeouts, open_connections = run(scenario, limits)
    assert timeouts[phase] == 1 and open_connections == 0
    if phase != "idle":
        assert rest.startswith(b"HTTP/1.1 408") and phase.encode() in rest


def test_connections_past_the_cap_are_refused_and_the_others_served():
    async def scenario(server, port):
        kept = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        refused = await read_response(reader)
        first_reader, first_writer = kept[0]
        first_writer.write(post("/ok", b""))
        served = await read_response(first_reader)
        return refused, served, server.refused_connections

    (status, _, body), (ok, _, _), refused = run(scenario, HttpLimits(max_connections=2))
    assert status == 503 and b"too many open connections" in body
    assert ok == 200 and refused == 1


def test_malformed_requests_get_400_and_the_connection_closes():
    async def scenario(server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        answer = await read_response(reader)
        return answer, await reader.read()

    (status, _, body), rest = run(scenario)
    assert status == 400 and b"malformed HTTP request" in body and rest == b""


def test_drain_answers_the_request_in_flight_then_closes():
    async def scenario(server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/slow", b"x"))
        await asyncio.sleep(0.05)  # the request is being answered
        draining = asyncio.ensure_future(server.drain(5.0))
        answer = await read_response(reader)
        await draining
        return answer

    status, headers, body = run(scenario)
    assert status == 200 and body == b"POST /slow 1" and headers["connection"] == "close"


def test_limits_are_checked():
    with pytest.raises(ValueError, match="header_timeout_s must be positive"):
        HttpLimits(header_timeout_s=0)
    with pytest.raises(ValueError, match="max_connections must be at least 1"):
        HttpLimits(max_connections=0)
