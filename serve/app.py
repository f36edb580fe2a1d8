"""The HTTP transport: parses requests, calls the data plane, answers. Nothing else.

Routes follow the Open Inference Protocol (KServe v2); errors are `{"error": "..."}`
with a 4xx status that says whose fault it was, and never carry a traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serve.dataplane import DataPlane
from serve.protocol import HEADER_LENGTH, InferenceError

log = logging.getLogger("mlet.serve")
SERVER_NAME = "mlet"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data"]


@dataclass
class ServerLimits:
    max_body_bytes: int = 64 << 20


def json_response(data: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def error_response(message: str, status: int) -> Response:
    return json_response({"error": message}, status)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InferenceError(f"request body of {declared} bytes exceeds the limit of {limit}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InferenceError(f"request body exceeds the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.isdigit():
        raise InferenceError(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}")
    return int(value)


def create_app(plane: DataPlane, limits: ServerLimits | None = None) -> Starlette:
    limits = limits or ServerLimits()

    async def live(request: Request) -> Response:
        return json_response({"live": True})

    async def ready(request: Request) -> Response:
        return json_response({"ready": bool(plane.models)})

    async def server_metadata(request: Request) -> Response:
        return json_response(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}
        )

    async def model_metadata(request: Request) -> Response:
        model = plane.model(request.path_params["model"], request.path_params.get("version"))
        return json_response(model.metadata())

    async def model_ready(request: Request) -> Response:
        model = plane.model(request.path_params["model"], request.path_params.get("version"))
        return json_response({"name": model.name, "ready": True})

    async def infer(request: Request) -> Response:
        body = await read_body(request, limits.max_body_bytes)
        content, headers = await plane.infer(
            request.path_params["model"],
            request.path_params.get("version"),
            body,
            header_length(request),
        )
        return Response(content, headers=headers)

    async def inference_error(request: Request, exc: InferenceError) -> Response:
        return error_response(exc.message, exc.status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(exc.detail, exc.status_code)

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.exception("request to %s failed", request.url.path)
        return error_response(f"internal error: {type(exc).__name__}", 500)

    routes = [
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/models/{model}", model_metadata),
        Route("/v2/models/{model}/versions/{version}", model_metadata),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={
            InferenceError: inference_error,
            HTTPException: http_error,
            Exception: unexpected_error,
        },
    )
