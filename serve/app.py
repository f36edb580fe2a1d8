"""The HTTP transport: parses requests, calls the data plane, answers. Nothing else.

Routes follow the Open Inference Protocol (KServe v2) and Triton's model repository
extension; errors are `{"error": "..."}` with a status that says whose fault it was, and
never carry a traceback.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serve.dataplane import DataPlane
from serve.protocol import HEADER_LENGTH, InferenceError
from serve.triton_json import served_model_config

log = logging.getLogger("mlet.serve")
SERVER_NAME = "mlet"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics"]


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 64 << 20


def json_response(data, status: int = 200, headers: dict | None = None) -> Response:
    return Response(
        orjson.dumps(data), status_code=status, media_type="application/json", headers=headers
    )


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


def model_statistics(plane: DataPlane, name: str) -> dict:
    handle = plane.model(name)
    stats = handle.batcher.stats
    return {
        "model_stats": [
            {
                "name": handle.name,
                "version": handle.version,
                "inference_count": stats.rows,
                "execution_count": stats.executions,
                "request_count": stats.requests,
                "failed_request_count": stats.failed_requests,
                "refused_queue_full": stats.refused_full,
                "refused_timeout": stats.refused_timeout,
                "batch_stats": [
                    {"batch_size": rows, "count": count}
                    for rows, count in sorted(stats.batch_rows.items())
                ],
            }
        ]
    }


def create_app(plane: DataPlane, limits: ServerLimits | None = None) -> Starlette:
    limits = limits or ServerLimits()

    async def live(request: Request) -> Response:
        return json_response({"live": True})

    async def ready(request: Request) -> Response:
        is_ready = bool(plane.models)
        return json_response({"ready": is_ready}, 200 if is_ready else 503)

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

    async def model_config(request: Request) -> Response:
        model = plane.model(request.path_params["model"], request.path_params.get("version"))
        return json_response(served_model_config(model))

    async def infer(request: Request) -> Response:
        body = await read_body(request, limits.max_body_bytes)
        content, headers = await plane.infer(
            request.path_params["model"],
            request.path_params.get("version"),
            body,
            header_length(request),
        )
        return Response(content, headers=headers)

    async def repository_index(request: Request) -> Response:
        return json_response(plane.index())

    async def repository_load(request: Request) -> Response:
        await plane.load(request.path_params["model"])
        return json_response({})

    async def repository_unload(request: Request) -> Response:
        await plane.unload(request.path_params["model"])
        return json_response({})

    async def statistics(request: Request) -> Response:
        return json_response(model_statistics(plane, request.path_params["model"]))

    async def metrics(request: Request) -> Response:
        return Response(plane.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def inference_error(request: Request, exc: InferenceError) -> Response:
        return json_response({"error": exc.message}, exc.status, exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return json_response({"error": exc.detail}, exc.status_code)

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.exception("request to %s failed", request.url.path)
        return json_response({"error": f"internal error: {type(exc).__name__}"}, 500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        # uvicorn has stopped accepting and finished the open requests; drain the queues.
        await plane.close()

    routes = [  # infer first: the router tries routes in order
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/models/{model}", model_metadata),
        Route("/v2/models/{model}/versions/{version}", model_metadata),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/models/{model}/stats", statistics),
        Route("/v2/models/{model}/config", model_config),
        Route("/v2/models/{model}/versions/{version}/config", model_config),
        Route("/v2/repository/index", repository_index, methods=["GET", "POST"]),
        Route("/v2/repository/models/{model}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", repository_unload, methods=["POST"]),
        Route("/metrics", metrics),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            InferenceError: inference_error,
            HTTPException: http_error,
            Exception: unexpected_error,
        },
    )
