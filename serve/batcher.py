"""Dynamic batching: merge concurrent requests into one runtime call, split the results back.

Rows, not requests, count against the maximum batch: a ranking request can carry hundreds
of candidates, and a TensorRT profile has a hard row limit. A batch is sent as soon as
its rows reach a preferred size (or the largest preferred size, or the maximum), or when
the oldest waiting request has waited the maximum queue delay, measured on a monotonic
clock from that request's arrival. Requests that waited past their timeout are refused,
a full queue refuses new requests, and a failing batch fails only its own requests.

The batcher knows nothing about HTTP or about the runtime: it gets a function that runs a
batch of named arrays and an executor to run it on, and tests drive it with plain calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from serve.protocol import InferenceError

Arrays = dict[str, np.ndarray]


class QueueFullError(Exception):
    """The queue holds its maximum; the caller should retry later."""


class RequestTimeoutError(Exception):
    """The request waited in the queue past its timeout."""


class BatcherClosedError(Exception):
    """The batcher was closed (its model unloaded or the server stopping)."""


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_rows: int
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_s: float = 0.0005
    max_queue_rows: int = 65536
    timeout_s: float | None = 10.0
    instances: int = 1  # batches that may run at once
    enabled: bool = True
    # Batches of at most this many rows run on the event loop's own thread. Handing a batch
    # to an instance thread and back costs two thread wake-ups, which on a small machine
    # take longer than running a small batch (2 cores here: 0.2 to 0.8 ms per hand-off
    # against 0.12 ms for a 1-row batch); larger batches go to the instance threads, so
    # the loop keeps parsing while they run.
    inline_rows: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_rows < 1 or self.instances < 1 or self.max_queue_rows < 1:
            raise ValueError("max_batch_rows, instances and max_queue_rows must be positive")
        if self.inline_rows < 0:
            raise ValueError("inline_rows must not be negative")
        if self.max_queue_delay_s < 0:
            raise ValueError("max_queue_delay_s must not be negative")

    @property
    def send_at_rows(self) -> int:
        """Rows that make a batch worth sending without waiting longer."""
        sizes = [s for s in self.preferred_batch_sizes if s <= self.max_batch_rows]
        return max(sizes) if sizes else self.max_batch_rows


@dataclass
class BatchStats:
    """Counters that tests and /metrics read instead of timing anything."""

    requests: int = 0
    answered: int = 0  # requests whose batch ran; the rest failed, were refused or still wait
    rows: int = 0
    executions: int = 0
    failed_requests: int = 0
    refused_full: int = 0
    refused_timeout: int = 0
    cancelled: int = 0  # left the queue because their caller gave up
    batch_rows: Counter = field(default_factory=Counter)  # rows per execution -> count

    def record_execution(self, requests: int, rows: int) -> None:
        """One execution that answered `requests` requests of `rows` rows in all."""
        self.executions += 1
        self.answered += requests
        self.rows += rows
        self.batch_rows[rows] += 1


@dataclass
class Timing:
    """Where one request's time went, in seconds."""

    queue_s: float
    compute_s: float
    batch_rows: int


@dataclass
class _Pending:
    inputs: Arrays
    rows: int
    arrival: float
    deadline: float | None
    future: asyncio.Future


BatchObserver = Callable[[int, float, list[float]], None]


class DynamicBatcher:
    def __init__(
        self,
        run_batch: Callable[[Arrays], Arrays],
        config: BatchingConfig,
        executor: Executor,
        observe: BatchObserver | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.config = config
        self.executor = executor
        self.observe = observe  # called with (rows, compute seconds, queue seconds per request)
        self.stats = BatchStats()
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._running = 0
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._scheduler: asyncio.Task | None = None
        self._closed = False

    # -- the caller's side ------------------------------------------------------------

    async def submit(
        self, inputs: Arrays, rows: int, timeout_s: float | None = None
    ) -> tuple[Arrays, Timing]:
        """Run `inputs` (rows along axis 0) in some batch; return its outputs and timing."""
        if self._closed:
            raise BatcherClosedError("the model is no longer served")
        if self._queued_rows + rows > self.config.max_queue_rows:
            self.stats.refused_full += 1
            raise QueueFullError(
                f"queue holds {self._queued_rows} rows; {rows} more would pass its bound of "
                f"{self.config.max_queue_rows}"
            )
        now = time.monotonic()
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        pending = _Pending(
            inputs=inputs,
            rows=rows,
            arrival=now,
            deadline=None if timeout is None else now + timeout,
            future=asyncio.get_running_loop().create_future(),
        )
        self.stats.requests += 1
        self._queue.append(pending)
        self._queued_rows += rows
        self._idle.clear()
        self._ensure_scheduler()
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._withdraw(pending)
            raise

    def _withdraw(self, pending: _Pending) -> None:
        """The caller gave up (a cancelled gRPC call, a passed deadline): a request still
        queued leaves the queue, so that it takes no batch slot and no runtime time."""
        for i, queued in enumerate(self._queue):
            if queued is pending:  # identity: a request's arrays have no equality
                del self._queue[i]
                self._queued_rows -= pending.rows
                self.stats.cancelled += 1
                self._mark_idle_if_done()
                return

    async def close(self) -> None:
        """Stop taking requests, finish every queued and running one, then stop."""
        self._closed = True
        self._wakeup.set()
        await self._idle.wait()
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    # -- the scheduler ----------------------------------------------------------------

    def _ensure_scheduler(self) -> None:
        if self._scheduler is None or self._scheduler.done():
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule())

    async def _schedule(self) -> None:
        while True:
            if self._start_ready_batch():
                continue
            self._mark_idle_if_done()
            await self._sleep(self._wait_s())

    def _start_ready_batch(self) -> bool:
        """Refuse what waited past its timeout, then start a batch if one is ready."""
        self._refuse_expired()
        batch = self._ready_batch()
        if batch is not None:
            self._start(batch)
        return batch is not None

    def _ready_batch(self) -> list[_Pending] | None:
        """The oldest requests that make a batch worth sending now, taken off the queue;
        None while every instance is busy or the batch may still grow."""
        if not self._queue or self._running >= self.config.instances:
            return None
        rows, count = self._rows_that_fit()
        full = count < len(self._queue) or rows >= self.config.send_at_rows
        preferred = rows in self.config.preferred_batch_sizes
        expired = time.monotonic() - self._queue[0].arrival >= self.config.max_queue_delay_s
        if not (full or preferred or expired or self._closed or not self.config.enabled):
            return None
        self._queued_rows -= rows
        return [self._queue.popleft() for _ in range(count)]

    def _wait_s(self) -> float | None:
        """How long the scheduler may sleep (None: until woken up)."""
        deadline_left = self._until_first_deadline()
        if not self._queue or self._running >= self.config.instances:
            return deadline_left
        waited = time.monotonic() - self._queue[0].arrival
        delay_left = self.config.max_queue_delay_s - waited
        return delay_left if deadline_left is None else min(delay_left, deadline_left)

    def _start(self, batch: list[_Pending]) -> None:
        """Hand a batch to an instance now: a large one is submitted to the executor before
        this returns, so a batch started as the previous one finishes loses no time."""
        self._running += 1
        rows = sum(p.rows for p in batch)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        job = None
        if rows > self.config.inline_rows:
            job = loop.run_in_executor(self.executor, self._merge_and_run, batch)
        loop.create_task(self._execute(batch, rows, started, job))

    def _until_first_deadline(self) -> float | None:
        """Seconds until the first queued request's timeout; None when none has one.

        The scheduler wakes up then, so a request is refused when its timeout passes rather
        than when its batch would have formed.
        """
        deadlines = [p.deadline for p in self._queue if p.deadline is not None]
        return None if not deadlines else max(0.0, min(deadlines) - time.monotonic())

    async def _sleep(self, seconds: float | None) -> None:
        """Wait for a wake-up (a new request, a finished batch) or `seconds`, if given."""
        self._wakeup.clear()
        if seconds is None:
            await self._wakeup.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), seconds)

    def _rows_that_fit(self) -> tuple[int, int]:
        """Rows and requests, from the oldest, that fit in one batch (one without batching)."""
        if not self.config.enabled:
            return self._queue[0].rows, 1
        rows = count = 0
        for pending in self._queue:
            if rows + pending.rows > self.config.max_batch_rows:
                break
            rows += pending.rows
            count += 1
        return rows, count

    def _refuse_expired(self) -> None:
        now = time.monotonic()
        kept: deque[_Pending] = deque()
        for pending in self._queue:
            if pending.deadline is not None and now >= pending.deadline:
                self._queued_rows -= pending.rows
                self.stats.refused_timeout += 1
                if not pending.future.done():
                    waited = now - pending.arrival
                    pending.future.set_exception(
                        RequestTimeoutError(f"request waited {waited * 1000:.0f} ms in the queue")
                    )
            else:
                kept.append(pending)
        self._queue = kept

    def _mark_idle_if_done(self) -> None:
        if not self._queue and self._running == 0:
            self._idle.set()

    async def _execute(
        self, batch: list[_Pending], rows: int, started: float, job: asyncio.Future | None
    ) -> None:
        """Wait for a batch (or run a small one here), start the next, answer its requests."""
        try:
            outputs = self._merge_and_run(batch) if job is None else await job
        except Exception as error:  # the runtime's failure belongs to this batch only
            self._instance_free()
            self.stats.failed_requests += len(batch)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        except BaseException:  # cancelled (the loop is stopping): free the instance
            self._instance_free()
            for pending in batch:
                pending.future.cancel()
            raise
        compute = time.monotonic() - started
        self._instance_free()
        if isinstance(outputs, list):  # each request ran alone: see _merge_and_run
            self._answer_each(batch, outputs, started, compute)
            return
        self._record(batch, rows, started, compute)
        offset = 0
        for pending in batch:
            part = {k: v[offset : offset + pending.rows] for k, v in outputs.items()}
            offset += pending.rows
            timing = Timing(started - pending.arrival, compute, rows)
            if not pending.future.done():  # a caller may have gone away
                pending.future.set_result((part, timing))

    def _instance_free(self) -> None:
        """A batch finished: start the next ready one before answering this one's requests,
        so the instance does not wait for the event loop to send the responses."""
        self._running -= 1
        self._start_ready_batch()
        self._mark_idle_if_done()
        self._wakeup.set()

    def _merge_and_run(self, batch: list[_Pending]) -> Arrays:
        """Concatenate the requests' arrays and run them, on the executor's thread.

        The copy runs there rather than on the event loop, which parses the next requests.
        """
        requests = [p.inputs for p in batch]
        if len(requests) == 1:
            return self.run_batch(requests[0])
        try:
            return self.run_batch(
                {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}
            )
        except InferenceError:
            # A request the runtime refuses (a raw row its transform rejects) must not fail
            # the requests merged with it: each runs alone, and only it is refused.
            return [self._run_alone(inputs) for inputs in requests]

    def _run_alone(self, inputs: Arrays) -> Arrays | InferenceError:
        try:
            return self.run_batch(inputs)
        except InferenceError as refused:
            return refused

    def _answer_each(self, batch: list[_Pending], answers: list, started: float, compute: float):
        """Answer the requests of a batch that ran one by one, each its outputs or refusal."""
        answered = [p for p, a in zip(batch, answers, strict=True) if not isinstance(a, Exception)]
        self.stats.failed_requests += len(batch) - len(answered)
        if answered:
            self._record(answered, sum(p.rows for p in answered), started, compute)
        for pending, answer in zip(batch, answers, strict=True):
            if pending.future.done():
                continue
            if isinstance(answer, Exception):
                pending.future.set_exception(answer)
            else:
                timing = Timing(started - pending.arrival, compute, pending.rows)
                pending.future.set_result((answer, timing))

    def _record(self, batch: list[_Pending], rows: int, started: float, compute: float) -> None:
        self.stats.record_execution(len(batch), rows)
        if self.observe is not None:
            self.observe(rows, compute, [started - p.arrival for p in batch])
