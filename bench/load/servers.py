"""Which server a load test runs against, and starting it: ours, real Triton, or a URL."""

from __future__ import annotations

import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import psutil

from serve.process import HOST, free_port, running_server

ENGINES = ("mlet", "triton")


@dataclass(frozen=True)
class Engine:
    """Which server a load test runs against: started here (mlet, triton) or at `url`."""

    name: str = "mlet"
    url: str | None = None
    tritonserver: str | None = None
    grpc_url: str | None = None  # with `url`: its gRPC endpoint, host:port

    def grpc_address(self, port: int | None) -> str:
        """host:port of the engine's gRPC endpoint: `grpc_url`, or `port` on loopback."""
        if self.url is not None:
            if self.grpc_url is None:
                raise ValueError(f"gRPC to the server at {self.url}: give its --grpc-url too")
            return self.grpc_url
        if port is None:
            raise ValueError("a gRPC load needs the engine started with a gRPC port")
        return f"{HOST}:{port}"

    def __post_init__(self) -> None:
        if self.url is None and self.name not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.name!r}")

    def describe(self) -> str:
        if self.url is not None:
            return f"server at {self.url}"
        return {"mlet": "mlet (ours)", "triton": "Triton Inference Server"}[self.name]


def engine_from_args(
    name: str, url: str | None, tritonserver: str | None, grpc_url: str | None = None
) -> Engine:
    return Engine(
        name="url" if url else name, url=url, tritonserver=tritonserver, grpc_url=grpc_url
    )


class ProcessTree:
    """A server process and its children (Triton's Python backend stubs), measured together."""

    def __init__(self, pid: int | None) -> None:
        self.root = psutil.Process(pid) if pid is not None else None

    def processes(self) -> list[psutil.Process]:
        if self.root is None:
            return []
        return [self.root, *self.root.children(recursive=True)]

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) seconds; NaN for a server not started here."""
        if self.root is None:
            return math.nan, math.nan
        times = [p.cpu_times() for p in self.processes()]
        return sum(t.user for t in times), sum(t.system for t in times)

    def memory_info(self) -> SimpleNamespace:
        """Resident bytes of the tree (a page shared by two processes counts twice)."""
        if self.root is None:
            return SimpleNamespace(rss=math.nan)
        return SimpleNamespace(rss=sum(p.memory_info().rss for p in self.processes()))


@contextmanager
def running_engine(
    engine: Engine,
    repo: Path,
    models: list[str],
    *options: str,
    timeout=60.0,
    log=None,
    grpc_port: int | None = None,
):
    """Yields (url, ProcessTree) of a server for `models`; stops what it started.

    `log`: where Triton's output goes (default: a temporary file). `grpc_port`: also serve
    KServe v2 gRPC there (both engines' --grpc-port), on loopback.
    """
    if engine.url is not None:
        yield engine.url.rstrip("/"), ProcessTree(None)
        return
    if engine.name == "mlet":
        grpc = ("--grpc-port", str(grpc_port)) if grpc_port is not None else ()
        with running_server(repo, models, *options, *grpc, timeout=timeout) as (url, server):
            yield url, ProcessTree(server.pid)
        return
    if options:
        raise ValueError(f"server options {list(options)} apply to --engine mlet only")
    from serve.triton_engine import TritonConfig, running_triton

    config = TritonConfig(
        repo=Path(repo),
        port=free_port(),
        grpc_port=grpc_port,
        models=models,
        tritonserver=Path(engine.tritonserver) if engine.tritonserver else None,
        ready_timeout_s=max(timeout, 120.0),
    )
    with (
        tempfile.NamedTemporaryFile(prefix="triton-", suffix=".log") as scratch,
        running_triton(config, Path(log or scratch.name)) as server,
    ):
        yield server.url, ProcessTree(server.process.pid)
