"""The floor of a Python gRPC server here: grpc.aio answering ModelInfer with nothing to do.

`python -m bench.load.grpc_floor PORT` serves Triton's GRPCInferenceService on grpc.aio
and uvloop, as `mlet serve --grpc-port` does, but its ModelInfer returns one fixed answer
without reading the request. `mlet bench engines --protocol grpc` drives it with the same
h2load load as the engines: its requests/s and CPU per call are what grpc.aio itself
costs, beneath anything our data plane or ONNX Runtime adds.
"""

from __future__ import annotations

import sys

import grpc
import numpy as np
import uvloop
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc.service_pb2_grpc import (
    GRPCInferenceServiceServicer,
    add_GRPCInferenceServiceServicer_to_server,
)

from serve.process import HOST


def fixed_answer() -> pb.ModelInferResponse:
    answer = pb.ModelInferResponse(model_name="floor", model_version="1")
    answer.outputs.add(name="probability", datatype="FP32", shape=[1, 1])
    answer.raw_output_contents.append(np.zeros(1, "<f4").tobytes())
    return answer


class FixedAnswer(GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.answer = fixed_answer()

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelInfer(self, request, context):
        return self.answer


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    add_GRPCInferenceServiceServicer_to_server(FixedAnswer(), server)
    server.add_insecure_port(f"{HOST}:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
