"""Locust load over KServe v2 gRPC: each user calls ModelInfer on one model through a grpc
channel of its own, with requests drawn like the data (or raw logged columns).

Locust's documented pattern for gRPC: the User's client wraps the generated stub, and every
call fires `environment.events.request` with request_type "grpc", so that Locust's
statistics, CSVs and failure counts cover it like any HTTP request. grpc is switched to
gevent first, so that one user's blocking call lets the others run. Configured by the
variables bench/load/locust_support.py reads (set by `mlet bench load --protocol grpc`);
--host is the gRPC endpoint, host:port.
"""

from __future__ import annotations

import itertools
import time

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, events, task
from locust.env import Environment
from locust.exception import LocustError
from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub

from bench.load.locust_support import LocustSettings, refresh_event_loop_clock
from mlet.infer_request import GRPC_MESSAGE_BYTES, grpc_address, grpc_request

grpc_gevent.init_gevent()  # before any channel exists

SETTINGS = LocustSettings.from_env()
REQUESTS = [grpc_request(SETTINGS.model, tensors) for tensors in SETTINGS.pool()]
events.init.add_listener(refresh_event_loop_clock)


class GrpcClient:
    """A stub whose calls are timed and reported to Locust as "grpc" requests."""

    def __init__(self, environment: Environment, stub) -> None:
        self.environment, self.stub = environment, stub

    def call(self, method: str, request, name: str, check=None):
        """One unary call; an RpcError, or a message from `check(response)`, counts as the
        request's failure (not the user's)."""
        meta = {"request_type": "grpc", "name": name, "response_length": 0,
                "exception": None, "context": None, "response": None}  # fmt: skip
        started = time.perf_counter()
        try:
            meta["response"] = getattr(self.stub, method)(request)
            meta["response_length"] = meta["response"].ByteSize()
        except grpc.RpcError as e:
            meta["exception"] = e
        else:
            problem = check(meta["response"]) if check is not None else None
            meta["exception"] = LocustError(problem) if problem else None
        meta["response_time"] = (time.perf_counter() - started) * 1000
        self.environment.events.request.fire(**meta)
        return meta["response"]


class GrpcUser(User):
    """A User whose client is a GRPCInferenceService stub on a channel to --host."""

    abstract = True

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if not self.host:
            raise LocustError("give the gRPC endpoint as --host host:port")
        options = [("grpc.max_send_message_length", GRPC_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES)]  # fmt: skip
        self.channel = grpc.insecure_channel(grpc_address(self.host), options=options)
        self.client = GrpcClient(environment, GRPCInferenceServiceStub(self.channel))

    def on_stop(self) -> None:
        self.channel.close()


class InferenceGrpcUser(GrpcUser):
    def on_start(self) -> None:
        self.requests = itertools.cycle(REQUESTS)

    @task
    def infer(self) -> None:
        self.client.call(
            "ModelInfer", next(self.requests), f"infer {SETTINGS.model}", check=missing_outputs
        )


def missing_outputs(response) -> str | None:
    return None if response.outputs else "response has no outputs"
