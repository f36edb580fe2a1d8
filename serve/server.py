"""Run the inference server: load a model repository and serve it over HTTP with uvicorn."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from serve.app import ServerLimits, create_app
from serve.backends import SessionOptions
from serve.dataplane import DataPlane

log = logging.getLogger("mlet.serve")


@dataclass
class ServerConfig:
    repo: Path = Path("models")
    host: str = "127.0.0.1"  # loopback unless the operator says otherwise
    port: int = 8000
    models: list[str] | None = None  # None: every model of the repository
    workers: int = 2  # threads that run inference; ONNX Runtime releases the GIL
    session: SessionOptions = field(default_factory=SessionOptions)
    limits: ServerLimits = field(default_factory=ServerLimits)
    log_level: str = "warning"


def run_server(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM; uvicorn then stops accepting and finishes in-flight work."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    plane = DataPlane.from_repository(config.repo, config.session, config.workers, config.models)
    app = create_app(plane, config.limits)
    log.info("serving %s on http://%s:%d", ", ".join(plane.models), config.host, config.port)
    try:
        uvicorn.run(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            loop="uvloop",
            http="httptools",
            access_log=False,
        )
    finally:
        plane.close()
