"""Locust load: each user posts inference requests drawn like the data to one model.

Configured by environment variables (set by `mlet bench load`):
MLET_MODEL (name), MLET_MODEL_FOLDER (its folder in the repository), MLET_ROWS (rows per request,
default 1), MLET_BINARY (1 for the binary tensor extension), MLET_ZIPF (id skew).
"""

from __future__ import annotations

import itertools
import os

import gevent
import orjson
from locust import FastHttpUser, events, task

from bench.load.request_bodies import RequestFactory
from mlet.repository import open_model

MODEL = os.environ.get("MLET_MODEL", "")
ROWS = int(os.environ.get("MLET_ROWS", "1"))
BINARY = os.environ.get("MLET_BINARY", "0") == "1"
POOL_SIZE = 256  # distinct bodies, drawn once so that the client spends its CPU on sending


def _bodies() -> list[tuple[bytes, dict[str, str]]]:
    folder = os.environ.get("MLET_MODEL_FOLDER")
    if not MODEL or not folder:
        raise RuntimeError("set MLET_MODEL and MLET_MODEL_FOLDER (mlet bench load does this)")
    spec = open_model(folder).manifest.spec
    factory = RequestFactory(spec, float(os.environ.get("MLET_ZIPF", "1.05")))
    return [factory.body(ROWS, BINARY) for _ in range(POOL_SIZE)]


BODIES = _bodies()


@events.init.add_listener
def _refresh_event_loop_clock(**_) -> None:
    """Make `--run-time` count from now, not from when gevent's loop was created.

    Locust arms its run-time timer with gevent.spawn_later, which counts from the loop's
    cached clock; that clock was last read when the loop was created, before this file
    was imported. On a busy machine the imports take seconds, and a short run ended
    before its first request.
    """
    gevent.get_hub().loop.update_now()


class InferenceUser(FastHttpUser):
    def on_start(self) -> None:
        self.bodies = itertools.cycle(BODIES)

    @task
    def infer(self) -> None:
        body, headers = next(self.bodies)
        with self.client.post(
            f"/v2/models/{MODEL}/infer",
            data=body,
            headers=headers,
            name=f"infer {MODEL}",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                message = response.text[:200] if response.text else ""
                response.failure(f"HTTP {response.status_code}: {message}")
            elif not BINARY and "outputs" not in orjson.loads(response.content):
                response.failure("response has no outputs")
