"""Ensembles (`platform: "ensemble"`), scheduled as Triton schedules them.

An ensemble's config lists steps; each step names a model, maps ensemble tensors to that
model's inputs (`input_map`, model input -> ensemble tensor) and its outputs back to
ensemble tensors (`output_map`). A step runs once every tensor it reads exists, as a
request to its model: the step model's own dynamic batching (or none) applies, so
requests of different ensemble calls merge per step, as in Triton. Step models are looked
up at each call, so a step reloaded under model control is used from then on.

The scheduler stands where a model's batcher stands in its handle: `submit`, `close`,
`queued_rows`, `stats` and `config` mean what they mean for a batcher.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2

from mlet.runtime import Arrays
from mlet.spec import DATATYPES
from serve.batcher import BatcherClosedError, BatchingConfig, BatchStats, Timing
from serve.model_config import ConfigSpec
from serve.protocol import InferenceError, InferRequest, RequestTensor
from serve.validation import validate_inputs

ENSEMBLE_PLATFORM = "ensemble"
DATATYPE_OF_DTYPE = {np.dtype(dtype): name for name, dtype in DATATYPES.items()}


@dataclass(frozen=True)
class Step:
    model: str
    inputs: dict[str, str]  # step model input -> ensemble tensor
    outputs: dict[str, str]  # step model output -> ensemble tensor


def ensemble_steps(config: model_config_pb2.ModelConfig, spec: ConfigSpec) -> list[Step]:
    """The steps in an order that runs each after the steps that make its inputs; a
    ValueError names a tensor no step makes, or a cycle."""
    where = f"ensemble '{config.name}'"
    pending = [
        Step(s.model_name, dict(s.input_map), dict(s.output_map))
        for s in config.ensemble_scheduling.step
    ]
    if not pending:
        raise ValueError(f"{where} has no steps")
    known, ordered = set(spec.input_names), []
    while pending:
        ready = [s for s in pending if set(s.inputs.values()) <= known]
        if not ready:
            missing = sorted(set().union(*(s.inputs.values() for s in pending)) - known)
            raise ValueError(f"{where}: no step makes tensor(s) {missing}")
        for step in ready:
            ordered.append(step)
            known |= set(step.outputs.values())
            pending.remove(step)
    unmade = sorted(set(spec.output_names) - known)
    if unmade:
        raise ValueError(f"{where}: no step makes output(s) {unmade}")
    return ordered


def datatype_of(array: np.ndarray) -> str:
    return DATATYPE_OF_DTYPE.get(array.dtype.newbyteorder("="), str(array.dtype))


def check_step_inputs(model: str, spec, arrays: Arrays) -> None:
    """The tensors handed to a step pass the step model's validation like any request."""
    tensors = [RequestTensor(n, datatype_of(a), a.shape, a) for n, a in arrays.items()]
    try:
        validate_inputs(spec, InferRequest(id=None, parameters={}, inputs=tensors))
    except InferenceError as e:
        raise InferenceError(f"ensemble step '{model}': {e.message}") from e


class EnsembleScheduler:
    def __init__(
        self,
        name: str,
        steps: list[Step],
        spec: ConfigSpec,
        step_handle: Callable[[str], object],
        timeout_s: float | None,
    ) -> None:
        """`step_handle(model)` gives the loaded handle of a step model."""
        self.name = name
        self.steps = steps
        # step model -> (its spec, validated_already): a step model's spec changes only when
        # it is loaded again, and the check costs as much as a transform row otherwise
        self._validated: dict[str, tuple[object, bool]] = {}
        self.spec = spec
        self.step_handle = step_handle
        self.config = BatchingConfig(
            max_batch_rows=spec.max_batch_size, timeout_s=timeout_s, enabled=False
        )
        self.stats = BatchStats()
        self.queued_rows = 0  # requests wait in their steps' queues, not here
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    async def submit(
        self, inputs: Arrays, rows: int, timeout_s: float | None = None
    ) -> tuple[Arrays, Timing]:
        if self._closed:
            raise BatcherClosedError("the model is no longer served")
        self.stats.requests += 1
        self._running += 1
        self._idle.clear()
        try:
            outputs, timing = await self._run_steps(inputs, rows, timeout_s)
        except BaseException:
            self.stats.failed_requests += 1
            raise
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()
        self.stats.record_execution(1, rows)
        return outputs, timing

    async def _run_steps(self, inputs: Arrays, rows: int, timeout_s: float | None):
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        tensors, queue_s, compute_s, batch_rows = dict(inputs), 0.0, 0.0, rows
        for step in self.steps:
            handle = self.step_handle(step.model)
            arrays = {name: tensors[source] for name, source in step.inputs.items()}
            if not self.validated_already(step, handle.spec):
                check_step_inputs(step.model, handle.spec, arrays)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            started = time.perf_counter()
            results, timing = await handle.batcher.submit(arrays, rows, left)
            handle.record_answer(rows, time.perf_counter() - started)
            tensors.update({target: results[out] for out, target in step.outputs.items()})
            queue_s, compute_s = queue_s + timing.queue_s, compute_s + timing.compute_s
            batch_rows = timing.batch_rows
        outputs = {name: tensors[name] for name in self.spec.output_names}
        return outputs, Timing(queue_s, compute_s, batch_rows)

    def validated_already(self, step: Step, spec) -> bool:
        """A step that reads the ensemble's own inputs, under their own names, as the same
        tensors: the request was validated against exactly these (the raw-row transform)."""
        cached = self._validated.get(step.model)
        if cached is not None and cached[0] is spec:
            return cached[1]
        own = {t.name: t for t in self.spec.inputs}
        same = (
            all(name == source for name, source in step.inputs.items())
            and len(spec.inputs) == len(step.inputs)
            and all(own.get(t.name) == t for t in spec.inputs)
        )
        self._validated[step.model] = (spec, same)
        return same

    async def close(self) -> None:
        """Take no more requests; finish those already in their steps."""
        self._closed = True
        await self._idle.wait()
