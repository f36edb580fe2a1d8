"""Run the inference server: load a model repository and serve it over HTTP with uvicorn."""

from __future__ import annotations

import gc
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from serve.app import ServerLimits, create_app
from serve.connections import ConnectionLimits, guarded_protocol
from serve.dataplane import DataPlane, PlaneConfig

log = logging.getLogger("mlet.serve")


@dataclass
class ServerConfig:
    repo: Path | None = Path("models")
    host: str = "127.0.0.1"  # loopback unless the operator says otherwise
    port: int = 8000
    models: list[str] | None = None  # None: every model of the repository
    plane: PlaneConfig = field(default_factory=PlaneConfig)
    limits: ServerLimits = field(default_factory=ServerLimits)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    shutdown_grace_s: float = 30.0
    log_level: str = "warning"


def run_server(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM.

    On either signal uvicorn stops accepting connections and lets the open requests finish
    (for up to shutdown_grace_s); the app's shutdown then drains every model's queue.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    plane = DataPlane(config.repo, config.plane)
    plane.load_all(config.models)
    log.info("serving %s on http://%s:%d", ", ".join(plane.models), config.host, config.port)
    # uvicorn re-raises the signal it stopped on once it has shut down gracefully; with the
    # default SIGTERM action that kills the process. A finished graceful stop is a success.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    # The loaded models and imports live as long as the server: keep them out of the
    # collector's generations so that collections triggered by requests stay short.
    gc.freeze()
    uvicorn.run(
        create_app(plane, config.limits),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        loop="uvloop",
        http=guarded_protocol(config.connections),  # httptools with header/body timeouts
        timeout_keep_alive=config.connections.keep_alive_s,
        access_log=False,
        proxy_headers=False,  # loopback by default; no proxy's forwarded headers to trust
        timeout_graceful_shutdown=config.shutdown_grace_s,
    )
