"""The batcher driven with plain calls: no server, no runtime, no timing assertions."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve.batcher import (
    BatchingConfig,
    DynamicBatcher,
    QueueFullError,
    RequestTimeoutError,
)


class Recorder:
    """A runtime that doubles its input, records batch sizes and can be held or made to fail."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, inputs):
        self.release.wait(10)
        x = inputs["x"]
        self.batches.append(len(x))
        if (x < 0).any():
            raise RuntimeError("negative input")
        return {"y": x * 2}


def rows(start: int, count: int) -> dict:
    return {"x": np.arange(start, start + count, dtype=np.float32).reshape(count, 1)}


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def make(config: BatchingConfig, recorder: Recorder) -> DynamicBatcher:
    return DynamicBatcher(recorder, config, ThreadPoolExecutor(config.instances))


def test_concurrent_requests_merge_and_results_split_back_in_order():
    recorder = Recorder()

    async def scenario():
        batcher = make(BatchingConfig(max_batch_rows=8, max_queue_delay_s=0.05), recorder)
        results = await asyncio.gather(*(batcher.submit(rows(10 * i, 2), 2) for i in range(4)))
        return batcher, results

    batcher, results = run(scenario())
    assert recorder.batches == [8]
    for i, (outputs, timing) in enumerate(results):
        assert outputs["y"].ravel().tolist() == [20 * i, 20 * i + 2]
        assert timing.batch_rows == 8
    assert (batcher.stats.requests, batcher.stats.rows, batcher.stats.executions) == (4, 8, 1)
    assert batcher.stats.batch_rows == {8: 1}


def test_rows_not_requests_count_against_the_maximum():
    recorder = Recorder()

    async def scenario():
        batcher = make(BatchingConfig(max_batch_rows=4, max_queue_delay_s=0.05), recorder)
        await asyncio.gather(*(batcher.submit(rows(0, 3), 3) for _ in range(3)))

    run(scenario())
    assert recorder.batches == [3, 3, 3]


def test_preferred_size_is_sent_without_waiting_for_the_delay():
    recorder = Recorder()

    async def scenario():
        config = BatchingConfig(max_batch_rows=64, preferred_batch_sizes=(4,), max_queue_delay_s=60)
        batcher = make(config, recorder)
        await asyncio.gather(batcher.submit(rows(0, 2), 2), batcher.submit(rows(2, 2), 2))

    run(scenario())  # would time out if the 60 s delay were awaited
    assert recorder.batches == [4]


def test_a_lone_request_is_sent_when_the_delay_bound_passes():
    recorder = Recorder()

    async def scenario():
        batcher = make(BatchingConfig(max_batch_rows=64, max_queue_delay_s=0.02), recorder)
        outputs, timing = await batcher.submit(rows(5, 1), 1)
        return outputs, timing

    outputs, timing = run(scenario())
    assert outputs["y"].tolist() == [[10.0]]
    assert recorder.batches == [1]
    assert timing.queue_s >= 0.02


def test_a_failing_batch_fails_only_its_own_requests():
    recorder = Recorder()

    async def scenario():
        batcher = make(BatchingConfig(max_batch_rows=2, max_queue_delay_s=0.05), recorder)
        bad = {"x": np.array([[-1.0]], np.float32)}
        return await asyncio.gather(
            batcher.submit(bad, 1),
            batcher.submit(rows(1, 1), 1),
            batcher.submit(rows(2, 1), 1),
            batcher.submit(rows(3, 1), 1),
            return_exceptions=True,
        ), batcher

    results, batcher = run(scenario())
    assert isinstance(results[0], RuntimeError) and isinstance(results[1], RuntimeError)
    assert results[2][0]["y"].tolist() == [[4.0]] and results[3][0]["y"].tolist() == [[6.0]]
    assert batcher.stats.failed_requests == 2


def test_batching_off_runs_each_request_alone():
    recorder = Recorder()

    async def scenario():
        config = BatchingConfig(max_batch_rows=64, max_queue_delay_s=1.0, enabled=False)
        batcher = make(config, recorder)
        await asyncio.gather(*(batcher.submit(rows(i, 1), 1) for i in range(5)))

    run(scenario())
    assert recorder.batches == [1] * 5


def test_full_queue_refuses_new_requests():
    recorder = Recorder()
    recorder.release.clear()

    async def scenario():
        config = BatchingConfig(max_batch_rows=2, max_queue_rows=3, max_queue_delay_s=0)
        batcher = make(config, recorder)
        running = asyncio.ensure_future(batcher.submit(rows(0, 2), 2))
        await asyncio.sleep(0.05)  # let the first batch start and hold the only instance
        queued = asyncio.ensure_future(batcher.submit(rows(2, 2), 2))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="bound of 3"):
            await batcher.submit(rows(4, 2), 2)
        recorder.release.set()
        await asyncio.gather(running, queued)
        return batcher

    batcher = run(scenario())
    assert batcher.stats.refused_full == 1


def test_requests_waiting_past_their_timeout_are_refused():
    recorder = Recorder()
    recorder.release.clear()

    async def scenario():
        config = BatchingConfig(max_batch_rows=1, max_queue_delay_s=0, timeout_s=5)
        batcher = make(config, recorder)
        first = asyncio.ensure_future(batcher.submit(rows(0, 1), 1))
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(batcher.submit(rows(1, 1), 1, timeout_s=0.01))
        await asyncio.sleep(0.1)
        recorder.release.set()
        await first
        with pytest.raises(RequestTimeoutError, match="waited"):
            await late
        return batcher

    batcher = run(scenario())
    assert batcher.stats.refused_timeout == 1 and recorder.batches == [1]


def test_close_finishes_queued_requests():
    recorder = Recorder()

    async def scenario():
        batcher = make(BatchingConfig(max_batch_rows=64, max_queue_delay_s=30), recorder)
        pending = [asyncio.ensure_future(batcher.submit(rows(i, 1), 1)) for i in range(3)]
        await asyncio.sleep(0)
        await batcher.close()
        return [p.result()[0]["y"].item() for p in pending]

    assert run(scenario()) == [0.0, 2.0, 4.0]
    assert recorder.batches == [3]


def test_a_timeout_fires_before_the_queue_delay_would_send_the_batch():
    """A 50 ms timeout under a 60 s queue delay is refused long before the batch forms: the
    test's own 10 s guard would fail if the batcher waited for the delay."""
    recorder = Recorder()

    async def scenario():
        config = BatchingConfig(max_batch_rows=8, max_queue_delay_s=60.0)
        batcher = make(config, recorder)
        with pytest.raises(RequestTimeoutError):
            await batcher.submit(rows(0, 1), 1, timeout_s=0.05)
        return batcher

    batcher = run(scenario())
    assert batcher.stats.refused_timeout == 1
    assert recorder.batches == []


def test_a_timeout_fires_while_every_instance_is_busy():
    recorder = Recorder()
    recorder.release.clear()

    async def scenario():
        batcher = make(BatchingConfig(max_batch_rows=1, max_queue_delay_s=0), recorder)
        running = asyncio.ensure_future(batcher.submit(rows(0, 1), 1))
        await asyncio.sleep(0.05)  # the first request now holds the only instance
        with pytest.raises(RequestTimeoutError):
            await batcher.submit(rows(1, 1), 1, timeout_s=0.05)
        recorder.release.set()
        await running
        return batcher

    batcher = run(scenario())
    assert batcher.stats.refused_timeout == 1
    assert recorder.batches == [1]


def test_small_batches_run_on_the_event_loop_and_large_ones_on_an_instance_thread():
    threads = []

    def runtime(inputs):
        threads.append((len(inputs["x"]), threading.current_thread().name))
        return {"y": inputs["x"] * 2}

    async def scenario():
        config = BatchingConfig(max_batch_rows=64, max_queue_delay_s=0, inline_rows=4)
        executor = ThreadPoolExecutor(1, thread_name_prefix="instance")
        batcher = DynamicBatcher(runtime, config, executor)
        small, _ = await batcher.submit(rows(0, 4), 4)
        large, _ = await batcher.submit(rows(0, 5), 5)
        return small, large, threading.current_thread().name

    small, large, loop_thread = run(scenario())
    assert small["y"].ravel().tolist() == [0, 2, 4, 6] and len(large["y"]) == 5
    assert threads[0] == (4, loop_thread)
    assert threads[1][0] == 5 and threads[1][1].startswith("instance")


def test_inline_rows_must_not_be_negative():
    with pytest.raises(ValueError, match="inline_rows must not be negative"):
        BatchingConfig(max_batch_rows=8, inline_rows=-1)


def test_the_next_batch_starts_before_the_finished_batch_is_answered():
    """An instance that finishes a batch gets the next ready one at once, not after the
    event loop has answered the finished batch's requests."""
    answered: list[int] = []
    answered_at_submit: list[int] = []

    class RecordingExecutor(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            answered_at_submit.append(len(answered))
            return super().submit(fn, *args, **kwargs)

    recorder = Recorder()
    recorder.release.clear()

    async def scenario():
        config = BatchingConfig(max_batch_rows=2, max_queue_delay_s=0)
        batcher = DynamicBatcher(recorder, config, RecordingExecutor(1))

        async def call(start: int) -> None:
            await batcher.submit(rows(start, 2), 2)
            answered.append(start)

        first = asyncio.ensure_future(call(0))
        await asyncio.sleep(0.05)  # the first batch holds the only instance
        second = asyncio.ensure_future(call(2))
        await asyncio.sleep(0.05)  # the second waits, a full batch
        recorder.release.set()
        await asyncio.gather(first, second)

    run(scenario())
    assert recorder.batches == [2, 2] and answered == [0, 2]
    assert answered_at_submit == [0, 0]


def test_a_cancelled_request_leaves_the_queue_and_never_runs():
    recorder = Recorder()

    async def scenario():
        config = BatchingConfig(max_batch_rows=8, max_queue_delay_s=0.0, enabled=False)
        batcher = make(config, recorder)
        recorder.release.clear()  # the first batch holds the only instance
        first = asyncio.ensure_future(batcher.submit(rows(0, 1), 1))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(batcher.submit(rows(100, 3), 3))
        await asyncio.sleep(0.05)
        queued = batcher.queued_rows
        waiting.cancel()
        await asyncio.sleep(0)
        after_cancel = batcher.queued_rows
        recorder.release.set()
        outputs, _ = await first
        await batcher.close()
        return batcher, queued, after_cancel, outputs

    batcher, queued, after_cancel, outputs = run(scenario())
    assert (queued, after_cancel) == (3, 0)
    assert recorder.batches == [1]  # the cancelled request's rows never ran
    assert batcher.stats.cancelled == 1 and outputs["y"].ravel().tolist() == [0]


def test_a_refused_request_in_a_merged_batch_fails_alone():
    from serve.protocol import InferenceError

    calls = []

    def refuse_negative(inputs):
        calls.append(len(inputs["x"]))
        if (inputs["x"] < 0).any():
            raise InferenceError("negative row")
        return {"y": inputs["x"] * 2}

    async def scenario():
        config = BatchingConfig(max_batch_rows=8, max_queue_delay_s=0.05)
        batcher = DynamicBatcher(refuse_negative, config, ThreadPoolExecutor(1))
        good = [rows(1, 2), rows(10, 1)]
        bad = {"x": np.array([[-1.0]], np.float32)}
        answers = await asyncio.gather(
            batcher.submit(good[0], 2), batcher.submit(bad, 1), batcher.submit(good[1], 1),
            return_exceptions=True,
        )  # fmt: skip
        return batcher, answers

    batcher, answers = run(scenario())
    assert calls == [4, 2, 1, 1]  # the merged batch, then each request alone
    assert answers[0][0]["y"].ravel().tolist() == [2, 4]
    assert isinstance(answers[1], InferenceError)
    assert answers[2][0]["y"].ravel().tolist() == [20]
    assert batcher.stats.failed_requests == 1 and batcher.stats.answered == 2
