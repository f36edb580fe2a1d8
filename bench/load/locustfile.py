"""Locust load over HTTP: each user posts inference requests drawn like the data (or raw
logged columns) to one model. Configured by the variables bench/load/locust_support.py reads
(set by `mlet bench load`); the gRPC user is in locustfile_grpc.py.
"""

from __future__ import annotations

import itertools

import orjson
from locust import FastHttpUser, events, task

from bench.load.locust_support import LocustSettings, refresh_event_loop_clock
from mlet.infer_request import http_body

SETTINGS = LocustSettings.from_env()
BODIES = [
    http_body(tensors, SETTINGS.binary, binary_output=SETTINGS.binary)
    for tensors in SETTINGS.pool()
]
events.init.add_listener(refresh_event_loop_clock)


class InferenceUser(FastHttpUser):
    def on_start(self) -> None:
        self.bodies = itertools.cycle(BODIES)

    @task
    def infer(self) -> None:
        body, headers = next(self.bodies)
        with self.client.post(
            f"/v2/models/{SETTINGS.model}/infer",
            data=body,
            headers=headers,
            name=f"infer {SETTINGS.model}",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                message = response.text[:200] if response.text else ""
                response.failure(f"HTTP {response.status_code}: {message}")
            elif not SETTINGS.binary and "outputs" not in orjson.loads(response.content):
                response.failure("response has no outputs")
