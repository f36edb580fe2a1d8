"""The routes: a request's method and path to a data-plane call, errors to statuses.

Routes follow the Open Inference Protocol (KServe v2) and Triton's model repository
extension; errors are `{"error": "..."}` with a status that says whose fault it was, and
never carry a traceback.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

import orjson
from prometheus_client import CONTENT_TYPE_LATEST

from serve.dataplane import EXTENSIONS, SERVER_NAME, SERVER_VERSION, DataPlane
from serve.http import Request, Response
from serve.protocol import HEADER_LENGTH, InferenceError
from serve.triton_json import served_model_config

log = logging.getLogger("mlet.serve")

Route = Callable[..., Awaitable[Response]]


def json_response(data, status: int = 200, headers: dict | None = None) -> Response:
    return Response(status, orjson.dumps(data), headers=headers or {})


def header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH.lower())
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
                "cancelled": stats.cancelled,
                "batch_stats": [
                    {"batch_size": rows, "count": count}
                    for rows, count in sorted(stats.batch_rows.items())
                ],
            }
        ]
    }


class Router:
    """(method, path) -> route coroutine; the path's {names} become keyword arguments."""

    def __init__(self) -> None:
        self.routes: list[tuple[re.Pattern, frozenset[str], Route]] = []

    def add(self, template: str, route: Route, methods: tuple[str, ...] = ("GET",)) -> None:
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
        self.routes.append((re.compile(f"^{pattern}$"), frozenset(methods), route))

    async def __call__(self, request: Request) -> Response:
        try:
            return await self.dispatch(request)
        except InferenceError as e:
            return json_response({"error": e.message}, e.status, e.headers)
        except Exception as e:
            log.exception("request to %s failed", request.path)
            return json_response({"error": f"internal error: {type(e).__name__}"}, 500)

    async def dispatch(self, request: Request) -> Response:
        allowed = False
        for pattern, methods, route in self.routes:
            match = pattern.match(request.path)
            if match is None:
                continue
            if request.method in methods:
                return await route(request, **match.groupdict())
            allowed = True
        if allowed:
            raise InferenceError("Method Not Allowed", 405)
        raise InferenceError("Not Found", 404)


def create_app(plane: DataPlane) -> Router:
    """The KServe v2 routes over the data plane."""

    async def live(request: Request) -> Response:
        return json_response({"live": True})

    async def ready(request: Request) -> Response:
        is_ready = bool(plane.models)
        return json_response({"ready": is_ready}, 200 if is_ready else 503)

    async def server_metadata(request: Request) -> Response:
        return json_response(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}
        )

    async def model_metadata(request: Request, model: str, version: str | None = None):
        return json_response(plane.model(model, version).metadata())

    async def model_ready(request: Request, model: str, version: str | None = None):
        return json_response({"name": plane.model(model, version).name, "ready": True})

    async def model_config(request: Request, model: str, version: str | None = None):
        return json_response(served_model_config(plane.model(model, version)))

    async def infer(request: Request, model: str, version: str | None = None) -> Response:
        content, headers = await plane.infer(model, version, request.body, header_length(request))
        content_type = headers.pop("content-type", "application/json")
        return Response(200, content, content_type, headers)

    async def repository_index(request: Request) -> Response:
        return json_response(plane.index())

    async def repository_load(request: Request, model: str) -> Response:
        await plane.load(model)
        return json_response({})

    async def repository_unload(request: Request, model: str) -> Response:
        await plane.unload(model)
        return json_response({})

    async def statistics(request: Request, model: str) -> Response:
        return json_response(model_statistics(plane, model))

    async def metrics(request: Request) -> Response:
        return Response(200, plane.metrics.render(), CONTENT_TYPE_LATEST)

    router = Router()  # infer first: routes are tried in order
    router.add("/v2/models/{model}/infer", infer, ("POST",))
    router.add("/v2/models/{model}/versions/{version}/infer", infer, ("POST",))
    router.add("/v2", server_metadata)
    router.add("/v2/health/live", live)
    router.add("/v2/health/ready", ready)
    router.add("/v2/models/{model}", model_metadata)
    router.add("/v2/models/{model}/versions/{version}", model_metadata)
    router.add("/v2/models/{model}/ready", model_ready)
    router.add("/v2/models/{model}/versions/{version}/ready", model_ready)
    router.add("/v2/models/{model}/stats", statistics)
    router.add("/v2/models/{model}/config", model_config)
    router.add("/v2/models/{model}/versions/{version}/config", model_config)
    router.add("/v2/repository/index", repository_index, ("GET", "POST"))
    router.add("/v2/repository/models/{model}/load", repository_load, ("POST",))
    router.add("/v2/repository/models/{model}/unload", repository_unload, ("POST",))
    router.add("/metrics", metrics)
    return router
