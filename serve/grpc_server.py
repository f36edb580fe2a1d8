"""KServe v2 over gRPC: Triton's published `inference.GRPCInferenceService`, and nothing else.

The service stubs and messages are the ones tritonclient ships, compiled from Triton's
grpc_service.proto, so `tritonclient.grpc` (and any client of that proto) works unchanged.
Each RPC turns its message into the DataPlane call that HTTP makes (serve.app), so
validation (serve.validation), batching, metrics, timeouts and model control exist once.
Inputs arrive typed (`contents`) or as raw little-endian bytes (`raw_input_contents`);
outputs are answered raw (`raw_output_contents`), as Triton answers them. A refusal carries
HTTP's message with the gRPC code Triton gives the same fault (see `status_code`).

Why grpc.aio rather than grpc.server's thread pool: the DataPlane and its batchers are
asyncio objects on the server's event loop (uvloop). grpc.aio runs every RPC as a coroutine
on that same loop, so a request reaches its batcher without a thread hand-off, and gRPC and
HTTP requests merge into the same batches. A thread-pool server would hand each request to
the loop and back (two thread wake-ups, which on a small machine cost more than a 1-row
inference), and its pool size would cap the requests in flight, hence the batch sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceServicer

from mlet.infer_request import little_endian_bytes
from mlet.spec import DATATYPES
from serve.batcher import RequestTimeoutError
from serve.dataplane import (
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    DataPlane,
    Decoded,
    ModelHandle,
    validated,
)
from serve.protocol import (
    InferenceError,
    InferRequest,
    RequestTensor,
    binary_array,
    bytes_array,
)
from serve.triton_json import served_config

log = logging.getLogger("mlet.serve")

# Refusals carry the HTTP status that says whose fault they were; these are the gRPC codes
# Triton's gRPC front end gives the same faults.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
# Where a datatype's values go in InferTensorContents; FP16 has no field there, so it
# travels in raw_input_contents only, as in Triton.
CONTENTS_FIELDS = {
    "FP32": "fp32_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "BYTES": "bytes_contents",
}
# gRPC's option is a C int: a larger --max-body-bytes means "no smaller bound than this".
MAX_MESSAGE_BYTES = 2**31 - 1
# A request leaves the queue this long (at most a tenth of its time) before its client's
# deadline, so that the server's refusal (DEADLINE_EXCEEDED, saying how long it waited)
# ends the call rather than the client giving up at the same instant.
DEADLINE_MARGIN_S = 0.01
SHARED_MEMORY = "shared-memory tensors are not supported; send the tensors in the request"


def status_code(error: InferenceError) -> grpc.StatusCode:
    """The gRPC code of a refusal: a request that outwaited its timeout in the queue is
    DEADLINE_EXCEEDED; the rest follow the HTTP status, any other 4xx being bad input."""
    if isinstance(error.__cause__, RequestTimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if error.status in STATUS_CODES:
        return STATUS_CODES[error.status]
    if 400 <= error.status < 500:
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


# -- messages <-> the protocol's request and outputs ----------------------------------------


def parameter_values(parameters) -> dict:
    """A protobuf parameter map as plain values (bool, int, float, str or bytes)."""
    values = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = None if choice is None else getattr(parameter, choice)
    return values


def typed_array(tensor, shape: tuple[int, ...], where: str) -> np.ndarray:
    """An input's typed `contents` as an array of its datatype."""
    field = CONTENTS_FIELDS.get(tensor.datatype)
    if field is None:
        raise InferenceError(f"{where}: datatype {tensor.datatype} is sent in raw_input_contents")
    others = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if others:
        raise InferenceError(f"{where}: values of datatype {tensor.datatype} go in '{field}', "
                             f"not {others}")  # fmt: skip
    values = getattr(tensor.contents, field)
    if len(values) != math.prod(shape):
        raise InferenceError(
            f"{where}: '{field}' holds {len(values)} values but shape {list(shape)} "
            f"needs {math.prod(shape)}"
        )
    if tensor.datatype == "BYTES":
        return bytes_array(list(values), shape)
    dtype = DATATYPES[tensor.datatype]
    return np.fromiter(values, dtype, count=len(values)).reshape(shape)


def input_tensor(tensor, raw: bytes | None, index: int) -> RequestTensor:
    """One input of a ModelInferRequest, its values from `raw` when given, else `contents`."""
    # each field read of a protobuf message builds a new Python object: read each once
    name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
    if not name:
        raise InferenceError(f"inputs[{index}]: missing 'name'")
    where = f"input '{name}'"
    if datatype not in DATATYPES:
        raise InferenceError(f"{where}: unsupported datatype {datatype!r}")
    if any(d < 0 for d in shape):
        raise InferenceError(f"{where}: 'shape' must be non-negative integers, got {list(shape)}")
    if raw is None:
        data = typed_array(tensor, shape, where)
    elif tensor.HasField("contents"):
        raise InferenceError(f"{where}: values in both 'contents' and raw_input_contents")
    else:
        data = binary_array(memoryview(raw), datatype, shape, where)
    return RequestTensor(name, datatype, shape, data)


def infer_request(message: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as the protocol's InferRequest, the one serve.validation checks.

    As in Triton, raw_input_contents is all or nothing: one entry per input, in order.
    """
    raw = list(message.raw_input_contents) or None
    if raw is not None and len(raw) != len(message.inputs):
        raise InferenceError(
            f"request has {len(raw)} raw_input_contents for {len(message.inputs)} inputs; "
            "give one per input, in the order of the inputs"
        )
    inputs = [
        input_tensor(tensor, None if raw is None else raw[i], i)
        for i, tensor in enumerate(message.inputs)
    ]
    return InferRequest(
        id=message.id or None,
        parameters=parameter_values(message.parameters),
        inputs=inputs,
        outputs=[{"name": output.name} for output in message.outputs] or None,
    )


def decode_message(spec, message: pb.ModelInferRequest) -> Decoded:
    """What serve.dataplane.decode_and_validate is to an HTTP body, for a gRPC message."""
    return validated(spec, infer_request(message))


def queue_deadline(remaining: float | None) -> float | None:
    """How long a call may wait in the queue: its deadline's remainder, less a margin
    (None when the client set no deadline)."""
    if remaining is None:
        return None
    return max(remaining - min(DEADLINE_MARGIN_S, remaining / 10), 0.0)


def typed_bytes(message: pb.ModelInferRequest) -> int:
    """Bytes of the message that are parsed value by value: raw tensors are read in place."""
    return message.ByteSize() - sum(len(raw) for raw in message.raw_input_contents)


def infer_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: dict[str, tuple[str, np.ndarray]],
    parameters: dict | None = None,
) -> pb.ModelInferResponse:
    """The outputs as raw little-endian bytes, as Triton answers (and tritonclient reads)."""
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request.id or ""
    )
    for name, (datatype, array) in outputs.items():
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(little_endian_bytes(array))
    for key, value in (parameters or {}).items():  # timing: integers of microseconds, rows
        response.parameters[key].int64_param = value
    return response


def model_statistics(handle: ModelHandle) -> pb.ModelStatistics:
    """Triton's statistics message from the counters the HTTP stats route reads.

    Durations are not kept per model (the /metrics histograms have them), so every `ns` is
    0; a batch size's execution count is in its compute_infer count, as in Triton.
    """
    stats = handle.batcher.stats
    failed = stats.failed_requests + stats.refused_timeout + stats.refused_full
    return pb.ModelStatistics(
        name=handle.name,
        version=handle.version,
        inference_count=stats.rows,
        execution_count=stats.executions,
        inference_stats=pb.InferStatistics(
            success=pb.StatisticDuration(count=stats.answered),
            fail=pb.StatisticDuration(count=failed),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=rows, compute_infer=pb.StatisticDuration(count=count)
            )
            for rows, count in sorted(stats.batch_rows.items())
        ],
    )


# -- the service -----------------------------------------------------------------------------


def answers_refusals(method):
    """An RPC whose InferenceError ends it with its gRPC code and message; any other
    exception is a bug: logged, and answered INTERNAL without a traceback."""

    @functools.wraps(method)
    async def rpc(self, request, context):
        try:
            if isinstance(request, MalformedMessage):
                raise InferenceError(f"malformed {request.type_name} message: {request.error}")
            return await method(self, request, context)
        except InferenceError as e:
            await context.abort(status_code(e), e.message)
        except Exception as e:
            log.exception("gRPC %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")

    return rpc


def unsupported(name: str, why: str):
    """An RPC of the service this server does not implement: UNIMPLEMENTED, saying why."""

    async def refuse(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name}: {why}")

    refuse.__name__ = name
    return refuse


def check_repository(name: str) -> None:
    """The server has one repository; naming one is refused, as Triton refuses it."""
    if name:
        raise InferenceError("'repository_name' is not supported: the server has one", 501)


class InferenceServicer(GRPCInferenceServiceServicer):
    """Each RPC: its message in, the DataPlane call HTTP makes, its message out."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @answers_refusals
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @answers_refusals
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=bool(self.plane.models))

    @answers_refusals
    async def ModelReady(self, request, context):
        # Triton answers "not ready" for a model it does not serve rather than an error,
        # so that is_model_ready() is a question, never an exception.
        try:
            self.plane.model(request.name, request.version or None)
        except InferenceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @answers_refusals
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS
        )

    @answers_refusals
    async def ModelMetadata(self, request, context):
        metadata = self.plane.model(request.name, request.version or None).metadata()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata["versions"],
            platform=metadata["platform"],
            inputs=[tensor(**t) for t in metadata["inputs"]],
            outputs=[tensor(**t) for t in metadata["outputs"]],
        )

    @answers_refusals
    async def ModelConfig(self, request, context):
        handle = self.plane.model(request.name, request.version or None)
        return pb.ModelConfigResponse(config=served_config(handle))

    @answers_refusals
    async def ModelInfer(self, request, context):
        async def decode(handle: ModelHandle) -> Decoded:
            return await self.plane.decode_off_loop(
                typed_bytes(request), decode_message, handle.spec, request
            )

        return await self.plane.infer_with(
            request.model_name,
            request.model_version or None,
            decode,
            infer_response,
            deadline_s=queue_deadline(context.time_remaining()),
        )

    @answers_refusals
    async def RepositoryIndex(self, request, context):
        check_repository(request.repository_name)
        entries = self.plane.index()
        if request.ready:
            entries = [e for e in entries if e["state"] == "READY"]
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[index(**entry) for entry in entries])

    @answers_refusals
    async def RepositoryModelLoad(self, request, context):
        check_repository(request.repository_name)
        if request.parameters:
            raise InferenceError(
                f"load parameters {sorted(request.parameters)} are not supported: a model "
                "loads from its folder in the repository, as exported",
                501,
            )
        await self.plane.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @answers_refusals
    async def RepositoryModelUnload(self, request, context):
        check_repository(request.repository_name)
        # tritonclient always sends unload_dependents; no model served here depends on
        # another, so it changes nothing
        unknown = sorted(set(request.parameters) - {"unload_dependents"})
        if unknown:
            raise InferenceError(f"unload parameters {unknown} are not supported", 501)
        await self.plane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @answers_refusals
    async def ModelStatistics(self, request, context):
        names = [request.name] if request.name else sorted(self.plane.models)
        handles = [self.plane.model(name, request.version or None) for name in names]
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(h) for h in handles])

    ModelStreamInfer = unsupported(
        "ModelStreamInfer", "streaming inference is not supported; call ModelInfer"
    )
    SystemSharedMemoryStatus = unsupported("SystemSharedMemoryStatus", SHARED_MEMORY)
    SystemSharedMemoryRegister = unsupported("SystemSharedMemoryRegister", SHARED_MEMORY)
    SystemSharedMemoryUnregister = unsupported("SystemSharedMemoryUnregister", SHARED_MEMORY)
    CudaSharedMemoryStatus = unsupported("CudaSharedMemoryStatus", SHARED_MEMORY)
    CudaSharedMemoryRegister = unsupported("CudaSharedMemoryRegister", SHARED_MEMORY)
    CudaSharedMemoryUnregister = unsupported("CudaSharedMemoryUnregister", SHARED_MEMORY)
    TraceSetting = unsupported("TraceSetting", "tracing is not supported; see /metrics")
    LogSettings = unsupported("LogSettings", "log settings cannot be changed at run time")


# -- the listening server ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MalformedMessage:
    """What arrived in place of a request message that does not parse."""

    type_name: str
    error: str


def tolerant_parser(message_type):
    """Parse a request message; one that fails to parse reaches the RPC as a
    MalformedMessage, which it refuses with INVALID_ARGUMENT (grpc's own parse failure
    would answer UNKNOWN, a server error, for the client's fault)."""

    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return MalformedMessage(message_type.DESCRIPTOR.full_name, str(e))

    return parse


def service_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The service's RPCs, registered as the generated add_..._to_server registers them,
    but with tolerant request parsing."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        kind = (method.client_streaming, method.server_streaming)
        register = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
        }[kind]
        handlers[method.name] = register(
            getattr(servicer, method.name),
            request_deserializer=tolerant_parser(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        # a larger message is refused with RESOURCE_EXHAUSTED before a handler sees it,
        # as HTTP refuses a body over --max-body-bytes with 413
        ("grpc.max_receive_message_length", min(max_message_bytes, MAX_MESSAGE_BYTES)),
        # gRPC shares a port with another listener by default; a port in use must fail
        # the start instead, as it does for HTTP
        ("grpc.so_reuseport", 0),
    ]


class GrpcServer:
    """The gRPC front end of a DataPlane: listens beside HTTP and drains like it."""

    def __init__(self, plane: DataPlane, max_message_bytes: int) -> None:
        self.server = grpc.aio.server(options=server_options(max_message_bytes))
        self.server.add_generic_rpc_handlers((service_handler(InferenceServicer(plane)),))

    async def listen(self, host: str, port: int) -> int:
        """Start serving on host:port; the port bound (port 0 picks a free one)."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = self.server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen for gRPC on {address}: {e}") from e
        if bound == 0:  # older grpcio reports a failed bind this way
            raise OSError(f"cannot listen for gRPC on {address}")
        await self.server.start()
        return bound

    async def drain(self, grace_s: float) -> None:
        """Refuse new RPCs (UNAVAILABLE); answer those in flight for up to grace_s."""
        await self.server.stop(grace_s)
