"""What both locustfiles share: the settings `mlet bench load` passes them, the requests
they draw, and a fix to Locust's run-time clock.

Settings come as environment variables: MLET_MODEL (the name called), MLET_MODEL_FOLDER (the
model's folder in the repository; for MLET_RAW=1 the folder of the model whose NAME-raw is
called), MLET_ROWS (rows per request, default 1), MLET_BINARY (1 for the binary tensor
extension, HTTP only), MLET_RAW (1: logged columns for NAME-raw), MLET_ZIPF (id skew).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gevent

from bench.load.request_bodies import request_factory
from mlet.infer_request import InputTensor

POOL_SIZE = 256  # distinct requests, drawn once so that the client spends its CPU on sending


@dataclass(frozen=True)
class LocustSettings:
    model: str
    folder: Path
    rows: int = 1
    binary: bool = False
    raw: bool = False
    zipf_exponent: float = 1.05

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> LocustSettings:
        model, folder = env.get("MLET_MODEL", ""), env.get("MLET_MODEL_FOLDER", "")
        if not model or not folder:
            raise RuntimeError("set MLET_MODEL and MLET_MODEL_FOLDER (mlet bench load does this)")
        return cls(
            model=model,
            folder=Path(folder),
            rows=int(env.get("MLET_ROWS", "1")),
            binary=env.get("MLET_BINARY", "0") == "1",
            raw=env.get("MLET_RAW", "0") == "1",
            zipf_exponent=float(env.get("MLET_ZIPF", "1.05")),
        )

    def env(self) -> dict[str, str]:
        """The variables that give these settings to a Locust process."""
        return {
            "MLET_MODEL": self.model,
            "MLET_MODEL_FOLDER": str(self.folder),
            "MLET_ROWS": str(self.rows),
            "MLET_BINARY": "1" if self.binary else "0",
            "MLET_RAW": "1" if self.raw else "0",
            "MLET_ZIPF": str(self.zipf_exponent),
        }

    def pool(self, size: int = POOL_SIZE) -> list[list[InputTensor]]:
        """`size` requests' inputs, ids drawn like the data (or raw logged columns)."""
        factory = request_factory(self.folder, self.raw, self.zipf_exponent)
        return [factory.tensors(self.rows) for _ in range(size)]


def refresh_event_loop_clock(**_) -> None:
    """Make `--run-time` count from now, not from when gevent's loop was created.

    Locust arms its run-time timer with gevent.spawn_later, which counts from the loop's
    cached clock; that clock was last read when the loop was created, before the locustfile
    was imported. On a busy machine the imports take seconds, and a short run ended
    before its first request. (A listener of `events.init`.)
    """
    gevent.get_hub().loop.update_now()
