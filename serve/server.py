"""Run the inference server: load a model repository and serve it over HTTP (serve.http)."""

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
from serve.http import HttpLimits, HttpServer

log = logging.getLogger("mlet.serve")


@dataclass
class ServerConfig:
    repo: Path | None = Path("models")
    host: str = "127.0.0.1"  # loopback unless the operator says otherwise
    port: int = 8000
    models: list[str] | None = None  # None: every model of the repository
    plane: PlaneConfig = field(default_factory=PlaneConfig)
    limits: HttpLimits = field(default_factory=HttpLimits)
    shutdown_grace_s: float = 30.0


def run_server(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM.

    On either signal the server stops accepting connections and answers the requests in
    flight (for up to shutdown_grace_s), then every model's queue is drained.
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
    server = HttpServer(create_app(plane), config.limits, body_limit(plane, config.limits))
    await server.listen(config.host, config.port)
    log.info("serving %s on http://%s:%d", ", ".join(plane.models), config.host, config.port)
    await stop.wait()
    log.info("stopping: answering the requests in flight")
    await server.drain(config.shutdown_grace_s)
    await plane.close()


INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$")


def body_limit(plane: DataPlane, limits: HttpLimits):
    """An infer request's bound: what its model's largest batch can need, at most the limit."""

    def limit(path: str) -> tuple[int, str]:
        match = INFER_PATH.match(path)
        if match is None:
            return limits.max_body_bytes, "the limit"
        return plane.body_limit(match.group(1), limits.max_body_bytes)

    return limit
