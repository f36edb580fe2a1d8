"""What the server does, apart from HTTP: loads models, batches and runs requests, counts.

Each served model is a handle: its spec (the shape contract), a backend (the runtime), a
dynamic batcher and the threads the batcher runs batches on. Loading builds a complete
new handle before it replaces the old one, and the old one finishes its queued and
running requests before it is dropped, so a reload never fails a request in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mlet.repository import CONFIG_FILE, model_folders, open_model
from mlet.runtime import SessionOptions
from mlet.spec import ExportSpec
from mlet.variants import ONNX_PLATFORM, TENSORRT_PLATFORM
from serve.backends import Backend, OnnxRuntimeBackend, TensorRTBackend, TorchBackend
from serve.batcher import (
    BatcherClosedError,
    BatchingConfig,
    DynamicBatcher,
    QueueFullError,
    RequestTimeoutError,
)
from serve.model_config import read_model_config, serving_defaults
from serve.protocol import InferenceError, decode_request, encode_response
from serve.server_metrics import ServerMetrics
from serve.validation import requested_outputs, validate_inputs

log = logging.getLogger("mlet.serve")
RETRY_AFTER = {"Retry-After": "1"}


@dataclass(frozen=True)
class BatchingOverrides:
    """Command-line settings; None keeps what the model's config.pbtxt says."""

    enabled: bool | None = None
    max_queue_delay_us: int | None = None
    preferred_batch_sizes: tuple[int, ...] | None = None
    instances: int | None = None
    max_queue_rows: int = 65536
    timeout_s: float | None = 10.0


@dataclass(frozen=True)
class PlaneConfig:
    session: SessionOptions = field(default_factory=SessionOptions)
    batching: BatchingOverrides = field(default_factory=BatchingOverrides)
    torch_runs: tuple[tuple[str, Path], ...] = ()  # (name, run folder) served by PyTorch


@dataclass
class ModelHandle:
    name: str
    version: str
    platform: str
    spec: ExportSpec
    backend: Backend
    batcher: DynamicBatcher
    executor: ThreadPoolExecutor
    source: Path

    def metadata(self) -> dict:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [t.metadata() for t in self.spec.inputs],
            "outputs": [t.metadata() for t in self.spec.outputs],
        }

    async def close(self) -> None:
        await self.batcher.close()
        self.executor.shutdown(wait=False)


def batching_config(spec: ExportSpec, folder: Path | None, overrides: BatchingOverrides):
    """The model's config.pbtxt settings with the command line's overrides on top."""
    if folder is not None and (folder / CONFIG_FILE).is_file():
        defaults = serving_defaults(read_model_config(folder))
        enabled, delay_us = defaults.dynamic_batching, defaults.max_queue_delay_us
        preferred, instances = defaults.preferred_batch_sizes, defaults.instances
    else:
        enabled, delay_us = True, spec.max_queue_delay_us
        preferred, instances = spec.preferred_batch_sizes, 1

    def pick(override, default):
        return default if override is None else override

    return BatchingConfig(
        max_batch_rows=spec.max_batch_size,
        preferred_batch_sizes=tuple(pick(overrides.preferred_batch_sizes, preferred)),
        max_queue_delay_s=pick(overrides.max_queue_delay_us, delay_us) / 1e6,
        max_queue_rows=overrides.max_queue_rows,
        timeout_s=overrides.timeout_s,
        instances=pick(overrides.instances, instances),
        enabled=pick(overrides.enabled, enabled),
    )


class DataPlane:
    def __init__(self, repo: Path | None, config: PlaneConfig | None = None) -> None:
        self.repo = repo
        self.config = config or PlaneConfig()
        self.metrics = ServerMetrics()
        self.models: dict[str, ModelHandle] = {}
        self.failures: dict[str, str] = {}  # model -> why its last load failed
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task] = set()

    # -- loading ----------------------------------------------------------------------

    def known_models(self) -> dict[str, Path]:
        """Models this server can load: the repository's folders and the PyTorch runs."""
        folders = model_folders(self.repo) if self.repo is not None else {}
        return {**folders, **dict(self.config.torch_runs)}

    def build_handle(self, name: str) -> ModelHandle:
        """Load one model from disk (blocking: a runtime session is built)."""
        runs = dict(self.config.torch_runs)
        if name in runs:
            return self._torch_handle(name, Path(runs[name]))
        folder = self.known_models().get(name)
        if folder is None:
            raise FileNotFoundError(f"no model '{name}' in repository {self.repo}")
        opened = open_model(folder)
        spec, platform = opened.manifest.spec, opened.manifest.platform
        batching = batching_config(spec, folder, self.config.batching)
        if platform == ONNX_PLATFORM:
            backend = OnnxRuntimeBackend(opened.model_path, self.config.session, batching.instances)
        elif platform == TENSORRT_PLATFORM:
            backend = TensorRTBackend(opened.model_path)
        else:
            raise ValueError(f"model '{name}': platform {platform!r} is not served here")
        version, model_file = opened.version, opened.model_path
        return self._handle(name, version, platform, spec, backend, batching, model_file)

    def _torch_handle(self, name: str, run: Path) -> ModelHandle:
        backend = TorchBackend(run, self.config.session.intra_op_threads)
        spec = backend.spec
        batching = batching_config(spec, None, self.config.batching)
        return self._handle(name, "1", "pytorch", spec, backend, batching, run)

    def _handle(self, name, version, platform, spec, backend, batching, source) -> ModelHandle:
        executor = ThreadPoolExecutor(batching.instances, thread_name_prefix=f"infer-{name}")
        batcher = DynamicBatcher(
            backend.infer, batching, executor, observe=self.metrics.batch_observer(name)
        )
        return ModelHandle(name, version, platform, spec, backend, batcher, executor, source)

    def load_all(self, only: list[str] | None = None) -> None:
        """Load models before serving.

        Models asked for by name (`only`, PyTorch runs) must load. Without `only`, a model
        that cannot load here (a TensorRT engine on a machine without a GPU, say) is
        skipped with its reason in the repository index, as long as one model loads.
        """
        known = self.known_models()
        runs = [name for name, _ in self.config.torch_runs]
        required = [*(only or []), *(r for r in runs if r not in (only or []))]
        missing = sorted(set(required) - set(known))
        if missing:
            raise FileNotFoundError(f"model(s) {missing} not found in repository {self.repo}")
        names = required if only is not None else list(known)
        for name in names:
            try:
                self._install(self.build_handle(name))
            except Exception as e:
                if name in required:
                    raise
                self.failures[name] = str(e)
                log.warning("skipped model %s: %s", name, e)
                continue
            log.info("loaded %s (%s)", name, self.models[name].source)
        if not self.models:
            reasons = "; ".join(f"{n}: {r}" for n, r in self.failures.items())
            raise FileNotFoundError(
                f"model repository {self.repo} holds no model that loads here"
                + (f" ({reasons})" if reasons else "")
            )

    def _install(self, handle: ModelHandle) -> ModelHandle | None:
        old = self.models.get(handle.name)
        self.models[handle.name] = handle
        self.failures.pop(handle.name, None)
        gauge = self.metrics.queued_rows.labels(handle.name)
        gauge.set_function(lambda: handle.batcher.queued_rows)
        return old

    async def load(self, name: str) -> None:
        """(Re)load a model; requests keep flowing to the old version until the swap."""
        async with self._lock(name):
            loop = asyncio.get_running_loop()
            try:
                handle = await loop.run_in_executor(self._loader, self.build_handle, name)
            except Exception as e:
                self.failures[name] = str(e)
                raise InferenceError(f"failed to load model '{name}': {e}") from e
            old = self._install(handle)
            if old is not None:
                task = loop.create_task(old.close())  # drains the old version's requests
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    async def unload(self, name: str) -> None:
        async with self._lock(name):
            handle = self.models.pop(name, None)
            if handle is None:
                raise InferenceError(f"model '{name}' is not loaded", status=404)
            self.metrics.queued_rows.remove(name)
            await handle.close()

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def index(self) -> list[dict]:
        entries = []
        for name in sorted(set(self.known_models()) | set(self.models)):
            handle = self.models.get(name)
            if handle is not None:
                entries.append({"name": name, "version": handle.version, "state": "READY"})
            else:
                reason = self.failures.get(name, "not loaded")
                entries.append({"name": name, "state": "UNAVAILABLE", "reason": reason})
        return entries

    # -- serving ----------------------------------------------------------------------

    def model(self, name: str, version: str | None = None) -> ModelHandle:
        handle = self.models.get(name)
        if handle is None:
            raise InferenceError(f"unknown model '{name}'", status=404)
        if version is not None and version != handle.version:
            raise InferenceError(f"model '{name}' has no version '{version}' loaded", status=404)
        return handle

    async def infer(
        self, name: str, version: str | None, body: bytes, header_length: int | None
    ) -> tuple[bytes, dict[str, str]]:
        started = time.perf_counter()
        handle = self.model(name, version)
        try:
            request = decode_request(body, header_length)
            inputs = validate_inputs(handle.spec, request)
            outputs = requested_outputs(handle.spec, request)
            rows = len(next(iter(inputs.values())))
            results, timing = await handle.batcher.submit(inputs, rows, request_timeout(request))
        except InferenceError:
            self.metrics.requests.labels(name, "client_error").inc()
            raise
        except (QueueFullError, RequestTimeoutError, BatcherClosedError) as e:
            self.metrics.requests.labels(name, "overloaded").inc()
            raise InferenceError(str(e), status=503, headers=RETRY_AFTER) from e
        except Exception as e:
            self.metrics.requests.labels(name, "server_error").inc()
            log.exception("model %s failed a batch", name)
            raise InferenceError(f"model '{name}' failed: {type(e).__name__}: {e}", 500) from e
        datatypes = {t.name: t.datatype for t in handle.spec.outputs}
        chosen = {n: (datatypes[n], results[n]) for n in outputs}
        parameters = None
        if request.parameters.get("timing"):
            parameters = {
                "queue_us": round(timing.queue_s * 1e6),
                "compute_us": round(timing.compute_s * 1e6),
                "batch_rows": timing.batch_rows,
            }
        response = encode_response(handle.name, handle.version, request, chosen, parameters)
        self.metrics.requests.labels(name, "success").inc()
        self.metrics.rows.labels(name).inc(rows)
        self.metrics.latency.labels(name).observe(time.perf_counter() - started)
        return response

    async def close(self) -> None:
        """Finish every queued request of every model, then release the runtimes."""
        await asyncio.gather(*(h.close() for h in self.models.values()), *self._retiring)
        self._loader.shutdown(wait=False)


def request_timeout(request) -> float | None:
    """The request's own timeout ('timeout' parameter, microseconds, as Triton reads it)."""
    value = request.parameters.get("timeout")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InferenceError("parameter 'timeout' must be a positive integer of microseconds")
    return value / 1e6
