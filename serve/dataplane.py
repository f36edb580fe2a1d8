"""What the server does, whatever the transport: loads models, batches and runs requests,
counts.

Each served model is a handle: its spec (the shape contract), a backend (the runtime), a
dynamic batcher and the threads the batcher runs batches on. Loading builds a complete
new handle before it replaces the old one, and the old one finishes its queued and
running requests before it is dropped, so a reload never fails a request in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from mlet.files import clean_leftovers
from mlet.repository import (
    CONFIG_FILE,
    MANIFEST_FILE,
    TRANSFORM_FILE,
    model_folders,
    open_model,
)
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
from serve.ensemble import ENSEMBLE_PLATFORM, EnsembleScheduler, ensemble_steps
from serve.model_config import (
    PYTHON_BACKEND,
    ConfigSpec,
    ServingDefaults,
    config_spec,
    read_model_config,
    serving_defaults,
)
from serve.protocol import InferenceError, InferRequest, decode_request, encode_response
from serve.server_metrics import ServerMetrics
from serve.validation import requested_outputs, validate_inputs

log = logging.getLogger("mlet.serve")
SERVER_NAME = "mlet"  # what server metadata says, over HTTP and gRPC alike
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics"]
RETRY_AFTER = {"Retry-After": "1"}
MODEL_CONTROL_MODES = ("none", "explicit")  # as Triton's --model-control-mode
# A JSON request spends at most this many bytes per value it carries (a float64's longest
# text, a separator and indentation): a body longer than the model's largest batch needs
# is refused before it is read.
JSON_BYTES_PER_VALUE = 48
HEADER_SLACK_BYTES = 64 << 10  # names, datatypes, shapes and parameters
DECODE_INLINE_BYTES = 64 << 10  # larger bodies are decoded off the event loop
DECODE_THREADS = 2
# A decoded request: the request, its validated input arrays and the outputs it asks for.
Decoded = tuple[InferRequest, dict[str, np.ndarray], list[str]]
Answer = TypeVar("Answer")  # what a transport's encoder makes of the outputs


@dataclass(frozen=True)
class BatchingOverrides:
    """Command-line settings; None keeps what the model's config.pbtxt says."""

    enabled: bool | None = None
    max_queue_delay_us: int | None = None
    preferred_batch_sizes: tuple[int, ...] | None = None
    instances: int | None = None
    max_queue_rows: int = 65536
    timeout_s: float | None = 10.0
    inline_rows: int = 64  # batches this small run on the event loop (see BatchingConfig)
    # A raw-row transform step's batches on the event loop too. Off while gRPC is served:
    # a transform takes about a millisecond a batch, and gRPC calls arrive only while the
    # loop is free, so its batches held 1.7 requests on the loop and 13 on their own
    # thread (raw rows over gRPC 1.7x faster); HTTP requests are read between batches,
    # and there the loop is faster (1.25x, no thread hand-off).
    transform_inline: bool = True


@dataclass(frozen=True)
class PlaneConfig:
    session: SessionOptions = field(default_factory=SessionOptions)
    batching: BatchingOverrides = field(default_factory=BatchingOverrides)
    torch_runs: tuple[tuple[str, Path], ...] = ()  # (name, run folder) served by PyTorch
    # "none": the models loaded at start are served as they are, and the repository API
    # answers its index only; "explicit": clients may load, reload and unload models.
    model_control: str = "none"

    def __post_init__(self) -> None:
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ValueError(
                f"model control mode must be one of {MODEL_CONTROL_MODES}, "
                f"got {self.model_control!r}"
            )


@dataclass
class ModelHandle:
    name: str
    version: str
    platform: str
    spec: ExportSpec | ConfigSpec
    backend: Backend | None  # None for an ensemble, whose steps are models of their own
    batcher: DynamicBatcher | EnsembleScheduler
    executor: ThreadPoolExecutor | None
    source: Path
    record_answer: Callable[[int, float], None]  # rows and seconds of an answered request
    config_folder: Path | None = None  # a model served from its config.pbtxt alone

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
        if self.executor is not None:
            self.executor.shutdown(wait=False)


def config_defaults(folder: Path) -> ServingDefaults | None:
    """What the model's config.pbtxt says about serving it; None without a config.pbtxt."""
    if not (folder / CONFIG_FILE).is_file():
        return None
    return serving_defaults(read_model_config(folder), str(folder / CONFIG_FILE))


def served_folders(repo: Path) -> dict[str, Path]:
    """The repository's exported models, and its folders with a config.pbtxt but no
    manifest (ensembles, raw-row transform steps), which `build_handle` serves or refuses."""
    folders = model_folders(repo)
    for path in sorted(repo.iterdir()):
        hidden = path.name.startswith(".")  # an export in progress
        if path.name not in folders and not hidden and (path / CONFIG_FILE).is_file():
            folders[path.name] = path
    return dict(sorted(folders.items()))


def latest_version(folder: Path) -> Path:
    """The highest numbered version folder, the one Triton's default policy serves."""
    versions = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise FileNotFoundError(f"{folder} has no version folder")
    return max(versions, key=lambda p: int(p.name))


def step_models(folder: Path) -> list[str]:
    """The models an ensemble's steps call; none for any other model."""
    if (folder / MANIFEST_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        return []
    try:
        config = read_model_config(folder)
    except ValueError:
        return []  # build_handle reports it
    if config.platform != ENSEMBLE_PLATFORM:
        return []
    return [step.model_name for step in config.ensemble_scheduling.step]


def served_spec(spec: ExportSpec, defaults: ServingDefaults | None, platform: str) -> ExportSpec:
    """The spec with config.pbtxt's max_batch_size, which Triton enforces, in place of the
    export's; a TensorRT engine cannot take batches beyond the profile it was built for."""
    if defaults is None or defaults.max_batch_size == spec.max_batch_size:
        return spec
    if platform == TENSORRT_PLATFORM and defaults.max_batch_size > spec.max_batch_size:
        raise ValueError(
            f"{CONFIG_FILE}: max_batch_size {defaults.max_batch_size} exceeds the "
            f"{spec.max_batch_size} rows the engine's profile was built for"
        )
    return dataclasses.replace(spec, max_batch_size=defaults.max_batch_size)


def batching_config(
    spec: ExportSpec, defaults: ServingDefaults | None, overrides: BatchingOverrides
) -> BatchingConfig:
    """The model's config.pbtxt settings with the command line's overrides on top."""
    if defaults is not None:
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
        inline_rows=overrides.inline_rows,
    )


class DataPlane:
    def __init__(self, repo: Path | None, config: PlaneConfig | None = None) -> None:
        self.repo = repo
        self.config = config or PlaneConfig()
        self.metrics = ServerMetrics()
        self.models: dict[str, ModelHandle] = {}
        # model -> why its last load failed; only names the repository holds, so that
        # clients asking for made-up names leave nothing behind
        self.failures: dict[str, str] = {}
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self._control = asyncio.Lock()  # one load or unload at a time, whatever the name
        # Large bodies are parsed here, so that the event loop keeps answering other
        # models meanwhile; two at a time bounds the memory their parsed values take.
        self._decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")
        self._retiring: set[asyncio.Task] = set()

    # -- loading ----------------------------------------------------------------------

    def known_models(self) -> dict[str, Path]:
        """Models this server can load: the repository's folders and the PyTorch runs."""
        folders = served_folders(self.repo) if self.repo is not None else {}
        return {**folders, **dict(self.config.torch_runs)}

    def build_handle(self, name: str) -> ModelHandle:
        """Load one model from disk (blocking: a runtime session is built)."""
        runs = dict(self.config.torch_runs)
        if name in runs:
            return self._torch_handle(name, Path(runs[name]))
        folder = self.known_models().get(name)
        if folder is None:
            raise FileNotFoundError(f"no model '{name}' in repository {self.repo}")
        if not (folder / MANIFEST_FILE).is_file():
            return self._config_handle(name, folder)
        opened = open_model(folder, verify=True)  # refuses files that differ from the manifest
        platform = opened.manifest.platform
        defaults = config_defaults(folder)
        spec = served_spec(opened.manifest.spec, defaults, platform)
        batching = batching_config(spec, defaults, self.config.batching)
        if platform == ONNX_PLATFORM:
            backend = OnnxRuntimeBackend(opened.model_path, self.config.session, batching.instances)
        elif platform == TENSORRT_PLATFORM:
            backend = TensorRTBackend(opened.model_path)
        else:
            raise ValueError(f"model '{name}': platform {platform!r} is not served here")
        version, model_file = opened.version, opened.model_path
        return self._handle(name, version, platform, spec, backend, batching, model_file)

    def _config_handle(self, name: str, folder: Path) -> ModelHandle:
        """An ensemble, or a raw-row transform step: models that only a config describes."""
        config = read_model_config(folder)
        where = str(folder / CONFIG_FILE)
        spec = config_spec(config, where)
        defaults = serving_defaults(config, where)
        if config.platform == ENSEMBLE_PLATFORM:
            steps = ensemble_steps(config, spec)
            unloaded = sorted({s.model for s in steps} - set(self.models))
            if unloaded:
                raise ValueError(f"ensemble '{name}': step model(s) {unloaded} are not loaded")
            timeout = self.config.batching.timeout_s
            scheduler = EnsembleScheduler(name, steps, spec, self._step_handle, timeout)
            record = self.metrics.answer_recorder(name)
            return ModelHandle(
                name, "1", ENSEMBLE_PLATFORM, spec, None, scheduler, None, folder, record, folder
            )
        version = latest_version(folder)
        if config.backend == PYTHON_BACKEND and (version / TRANSFORM_FILE).is_file():
            from serve.transform_step import TransformBackend  # pyarrow: for raw rows only

            # As Triton's Python backend answers each request of a batch on its own, a
            # merged batch that the transform refuses is rerun request by request
            batching = batching_config(spec, defaults, self.config.batching)
            if not self.config.batching.transform_inline:
                batching = dataclasses.replace(batching, inline_rows=0)
            backend = TransformBackend(version, spec, self.metrics.oov_counter(name))
            handle = self._handle(
                name, version.name, PYTHON_BACKEND, spec, backend, batching, version
            )
            handle.config_folder = folder
            return handle
        kind = config.platform or config.backend or "no platform or backend"
        raise ValueError(
            f"model '{name}' ({kind}) is not served here: this server runs exported models, "
            "ensembles and the raw-row transform steps export writes"
        )

    def _step_handle(self, name: str) -> ModelHandle:
        handle = self.models.get(name)
        if handle is None:
            raise InferenceError(f"ensemble step model '{name}' is not loaded", status=503)
        return handle

    def with_steps(self, names: list[str]) -> list[str]:
        """`names` with each ensemble's step models before it, as Triton loads them."""
        known, ordered = self.known_models(), []

        def add(name: str, calling: tuple[str, ...]) -> None:
            if name in calling:
                raise ValueError(f"ensembles call each other in a cycle: {[*calling, name]}")
            if name in ordered:
                return
            folder = known.get(name)
            for step in step_models(folder) if folder is not None else []:
                add(step, (*calling, name))
            ordered.append(name)

        for name in names:
            add(name, ())
        return ordered

    def _torch_handle(self, name: str, run: Path) -> ModelHandle:
        backend = TorchBackend(run, self.config.session.intra_op_threads)
        spec = backend.spec
        batching = batching_config(spec, None, self.config.batching)  # no config.pbtxt
        return self._handle(name, "1", "pytorch", spec, backend, batching, run)

    def _handle(self, name, version, platform, spec, backend, batching, source) -> ModelHandle:
        executor = ThreadPoolExecutor(batching.instances, thread_name_prefix=f"infer-{name}")
        batcher = DynamicBatcher(
            backend.infer, batching, executor, observe=self.metrics.batch_observer(name)
        )
        record = self.metrics.answer_recorder(name)
        return ModelHandle(
            name, version, platform, spec, backend, batcher, executor, source, record
        )

    def load_all(self, only: list[str] | None = None) -> None:
        """Load models before serving.

        Models asked for by name (`only`, PyTorch runs) must load. Without `only`, a model
        that cannot load here (a TensorRT engine on a machine without a GPU, say) is
        skipped with its reason in the repository index, as long as one model loads.
        """
        if self.repo is not None and self.repo.is_dir():
            # A writer killed mid-replace leaves staging or retired folders; put the
            # repository back in order before reading it.
            for folder in clean_leftovers(self.repo):
                log.warning("removed %s, left by an interrupted export", folder)
        known = self.known_models()
        runs = [name for name, _ in self.config.torch_runs]
        required = self.with_steps([*(only or []), *(r for r in runs if r not in (only or []))])
        missing = sorted(set(required) - set(known))
        if missing:
            raise FileNotFoundError(f"model(s) {missing} not found in repository {self.repo}")
        names = required if only is not None else self.with_steps(list(known))
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

    def _check_control(self, action: str) -> None:
        if self.config.model_control != "explicit":
            raise InferenceError(
                f"cannot {action} models: the server runs with model control mode "
                f"'{self.config.model_control}' (start it with --model-control-mode explicit)"
            )

    async def load(self, name: str) -> None:
        """(Re)load a model; requests keep flowing to the old version until the swap."""
        self._check_control("load")
        async with self._control:
            if name not in self.known_models():
                raise InferenceError(f"no model '{name}' in repository {self.repo}", status=404)
            try:
                steps = self.with_steps([name])[:-1]
            except ValueError as e:
                raise InferenceError(f"failed to load model '{name}': {e}") from e
            for step in steps:  # an ensemble's steps load with it, as in Triton
                if step not in self.models:
                    await self._load_one(step)
            await self._load_one(name)

    async def _load_one(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            handle = await loop.run_in_executor(self._loader, self.build_handle, name)
        except Exception as e:
            if name in self.known_models():  # it may have gone meanwhile
                self.failures[name] = str(e)
            raise InferenceError(f"failed to load model '{name}': {e}") from e
        old = self._install(handle)
        if old is not None:
            task = loop.create_task(old.close())  # drains the old version's requests
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def unload(self, name: str) -> None:
        self._check_control("unload")
        async with self._control:
            handle = self.models.pop(name, None)
            if handle is None:
                raise InferenceError(f"model '{name}' is not loaded", status=404)
            self.metrics.queued_rows.remove(name)
            await handle.close()

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

    def body_limit(self, name: str, server_limit: int) -> tuple[int, str]:
        """The largest body model `name` can need (and what the bound is, for the message)."""
        handle = self.models.get(name)
        if handle is None:
            return server_limit, "the limit"
        spec = handle.spec
        if any(t.datatype == "BYTES" for t in spec.inputs):
            return server_limit, "the limit"  # a string's length has no bound of its own
        values = spec.max_batch_size * sum(math.prod(t.shape) for t in spec.inputs)
        limit = JSON_BYTES_PER_VALUE * values + HEADER_SLACK_BYTES
        if limit >= server_limit:
            return server_limit, "the limit"
        return limit, f"the bound for model '{name}' (max batch {spec.max_batch_size})"

    async def _decode(self, handle: ModelHandle, body: bytes, header_length: int | None):
        """Parse and validate an HTTP body; one with a large JSON part on a decode thread.

        Binary tensors are read in place (np.frombuffer), so only the JSON part counts: a
        thread hand-off would cost more than reading a binary request of any size."""
        json_bytes = len(body) if header_length is None else min(header_length, len(body))
        return await self.decode_off_loop(
            json_bytes, decode_and_validate, handle.spec, body, header_length
        )

    async def decode_off_loop(self, parsed_bytes: int, decode: Callable[..., Decoded], *args):
        """`decode(*args)` here when it parses little, else on a decode thread, so that the
        event loop keeps answering other requests while a large one is parsed."""
        if parsed_bytes <= DECODE_INLINE_BYTES:
            return decode(*args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decoder, decode, *args)

    async def infer(
        self, name: str, version: str | None, body: bytes, header_length: int | None
    ) -> tuple[bytes, dict[str, str]]:
        """An HTTP body (JSON or the binary extension) in; the response body and headers out."""
        return await self.infer_with(
            name,
            version,
            lambda handle: self._decode(handle, body, header_length),
            encode_response,
        )

    async def infer_with(
        self,
        name: str,
        version: str | None,
        decode: Callable[[ModelHandle], Awaitable[Decoded]],
        encode: Callable[..., Answer],
        deadline_s: float | None = None,
    ) -> Answer:
        """One inference request of any transport, counted, batched and refused alike.

        `decode(handle)` gives the validated request (see `validated`); `encode(model,
        version, request, outputs, parameters)` writes the transport's answer, outputs as
        {name: (datatype, array)}. `deadline_s` is the transport's own time limit (a gRPC
        deadline): the request waits in the queue no longer than it. Every refusal is an
        InferenceError whose `__cause__` says why, where the batcher refused it.
        """
        started = time.perf_counter()
        handle = self.model(name, version)
        try:
            request, inputs, outputs = await decode(handle)
            rows = len(next(iter(inputs.values())))
            timeout = queue_timeout(
                request_timeout(request), handle.batcher.config.timeout_s, deadline_s
            )
            results, timing = await handle.batcher.submit(inputs, rows, timeout)
            check_finite_outputs(name, results, outputs)
        except InferenceError:
            self.metrics.requests.labels(name, "client_error").inc()
            raise
        except (QueueFullError, RequestTimeoutError, BatcherClosedError) as e:
            self.metrics.requests.labels(name, "overloaded").inc()
            raise InferenceError(str(e), status=503, headers=RETRY_AFTER) from e
        except NonFiniteOutputError as e:
            self.metrics.requests.labels(name, "server_error").inc()
            log.error("model %s: %s", name, e)
            raise InferenceError(f"model '{name}' failed: {e}", 500) from e
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
        response = encode(handle.name, handle.version, request, chosen, parameters)
        handle.record_answer(rows, time.perf_counter() - started)
        return response

    async def close(self) -> None:
        """Finish every queued request of every model, then release the runtimes.

        Ensembles drain first: their requests still need their step models."""
        ensembles = [h for h in self.models.values() if h.platform == ENSEMBLE_PLATFORM]
        await asyncio.gather(*(h.close() for h in ensembles))
        others = [h for h in self.models.values() if h.platform != ENSEMBLE_PLATFORM]
        await asyncio.gather(*(h.close() for h in others), *self._retiring)
        self._loader.shutdown(wait=False)
        self._decoder.shutdown(wait=False)


def validated(spec: ExportSpec, request: InferRequest) -> Decoded:
    """The request, its validated input arrays and the outputs it asks for: every
    transport's requests pass here, so HTTP and gRPC refuse the same inputs alike."""
    return request, validate_inputs(spec, request), requested_outputs(spec, request)


def decode_and_validate(spec: ExportSpec, body: bytes, header_length: int | None) -> Decoded:
    """An HTTP body, decoded and validated."""
    return validated(spec, decode_request(body, header_length))


class NonFiniteOutputError(Exception):
    """The model computed NaN or infinity: a fault of the model, never of the request."""


def check_finite_outputs(name: str, results: dict, outputs: list[str]) -> None:
    """Refuse to answer NaN (JSON would carry it as null) or infinity as a probability."""
    for output in outputs:
        values = results[output]
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            row = int(np.argwhere(~np.isfinite(values))[0][0])
            raise NonFiniteOutputError(
                f"output '{output}' of row {row} is not finite (are its weights?)"
            )


def queue_timeout(own: float | None, server: float | None, deadline: float | None) -> float | None:
    """How long a request may wait for its batch: its own timeout, else the server's, and
    never past the caller's deadline. None leaves the batcher's default in place."""
    if deadline is None:
        return own
    limit = server if own is None else own
    return deadline if limit is None else min(limit, deadline)


def request_timeout(request) -> float | None:
    """The request's own timeout ('timeout' parameter, microseconds, as Triton reads it)."""
    value = request.parameters.get("timeout")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InferenceError("parameter 'timeout' must be a positive integer of microseconds")
    return value / 1e6
