"""Locust load: each user posts inference requests drawn like the data to one model.

Configured by environment variables (set by `mlet bench load`):
MLET_MODEL (name), MLET_MANIFEST (its manifest.json), MLET_ROWS (rows per request,
default 1), MLET_BINARY (1 for the binary tensor extension), MLET_ZIPF (id skew).
"""

from __future__ import annotations

import itertools
import os

import orjson
from locust import FastHttpUser, task

from bench.requests import RequestFactory
from mlet.files import read_json
from mlet.spec import ExportSpec

MODEL = os.environ.get("MLET_MODEL", "")
ROWS = int(os.environ.get("MLET_ROWS", "1"))
BINARY = os.environ.get("MLET_BINARY", "0") == "1"
POOL_SIZE = 256  # distinct bodies, drawn once so that the client spends its CPU on sending


def _bodies() -> list[tuple[bytes, dict[str, str]]]:
    manifest = os.environ.get("MLET_MANIFEST")
    if not MODEL or not manifest:
        raise RuntimeError("set MLET_MODEL and MLET_MANIFEST (mlet bench load does this)")
    spec = ExportSpec.from_dict(read_json(manifest)["spec"])
    factory = RequestFactory(spec, float(os.environ.get("MLET_ZIPF", "1.05")))
    return [factory.body(ROWS, BINARY) for _ in range(POOL_SIZE)]


BODIES = _bodies()


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
