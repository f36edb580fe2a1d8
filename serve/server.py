"""Run the inference server: load a model repository and serve it over HTTP (serve.http) and,
when asked, gRPC (serve.grpc_server)."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from serve.app import create_app
from serve.dataplane import DataPlane, PlaneConfig
from serve.grpc_server import GrpcServer
from serve.http import HttpLimits, HttpServer

log = logging.getLogger("mlet.serve")


@dataclass
class ServerConfig:
    repo: Path | None = Path("models")
    host: str = "127.0.0.1"  # loopback unless the operator says otherwise
    port: int = 8000
    grpc_port: int | None = None  # None: no gRPC; it binds the same host as HTTP
    models: list[str] | None = None  # None: every model of the repository
    plane: PlaneConfig = field(default_factory=PlaneConfig)
    limits: HttpLimits = field(default_factory=HttpLimits)
    shutdown_grace_s: float = 30.0


def run_server(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM.

    On either signal the server stops accepting connections (HTTP) and RPCs (gRPC) and
    answers the requests in flight (for up to shutdown_grace_s), then every model's queue
    is drained.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    plane = DataPlane(config.repo, config.plane)
    plane.load_all(config.models)
    # The loaded models and imports live as long as the server: keep them out of the
    # collector's generations so that collections triggered by requests stay short.
    gc.freeze()
    uvloop.run(serve(plane, config))


async def serve(plane: DataPlane, config: ServerConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # gRPC first: once HTTP answers ready (what clients and tests poll), both listen
    grpc_server = await start_grpc(plane, config)
    server = HttpServer(create_app(plane), config.limits, body_limit(plane, config.limits))
    await server.listen(config.host, config.port)
    log.info("serving %s on http://%s:%d", ", ".join(plane.models), config.host, config.port)
    await stop.wait()
    log.info("stopping: answering the requests in flight")
    drains = [server.drain(config.shutdown_grace_s)]
    if grpc_server is not None:
        drains.append(grpc_server.drain(config.shutdown_grace_s))
    await asyncio.gather(*drains)
    await plane.close()


async def start_grpc(plane: DataPlane, config: ServerConfig) -> GrpcServer | None:
    """The gRPC front end on config.grpc_port, limited as HTTP is; None when not asked for."""
    if config.grpc_port is None:
        return None
    grpc_server = GrpcServer(plane, config.limits.max_body_bytes)
    port = await grpc_server.listen(config.host, config.grpc_port)
    log.info("serving gRPC on %s:%d", config.host, port)
    return grpc_server


INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$")


def body_limit(plane: DataPlane, limits: HttpLimits):
    """An infer request's bound: what its model's largest batch can need, at most the limit."""

    def limit(path: str) -> tuple[int, str]:
        match = INFER_PATH.match(path)
        if match is None:
            return limits.max_body_bytes, "the limit"
        return plane.body_limit(match.group(1), limits.max_body_bytes)

    return limit
