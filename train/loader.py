"""Batches streamed from a dataset's memory-mapped arrays, prefetched on a background thread.

Nothing reads a whole split: training walks the split in chunks of contiguous rows, in an
order shuffled per epoch (chunks shuffled, rows shuffled within a chunk), and evaluation
walks it in order. A chunk is copied out of the map and its pages are given back to the
kernel, so the process's resident memory does not grow with the dataset. The order of an
epoch depends on (seed, epoch) alone, so a resumed run regenerates it and skips ahead.

With several processes, every global batch is cut into equal consecutive slices, one per
rank, and each process trains on its own slice. In training every process copies the
whole chunk out of the map (its rows are scattered over the chunk by the shuffle); in
evaluation each reads only its own rows.
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mlet.dataset import Dataset

CHUNK_ROWS = 1 << 16
PREFETCH_BATCHES = 4


@dataclass(frozen=True)
class Batch:
    dense: torch.Tensor  # [b, F] float32
    sparse: torch.Tensor  # [b, T] or [b, T, H] int64
    labels: torch.Tensor  # [b] float32

    def __len__(self) -> int:
        return len(self.labels)


def release_pages(array: np.ndarray, start: int, stop: int) -> None:
    """Tell the kernel the mapped pages of rows [start, stop) are no longer needed.

    Pages of a file map count towards resident memory once read; dropping them keeps an
    epoch over a large dataset from growing the process by the dataset's size.
    """
    mapped = getattr(array, "_mmap", None)
    if mapped is None or not hasattr(mapped, "madvise") or not array.flags.c_contiguous:
        return
    if array.size == 0:  # e.g. the [rows, 0] dense array of data without numeric columns
        return
    # where the array starts inside the map, from the addresses (a slice keeps the map)
    mapped_at = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
    row_bytes = array.strides[0]
    begin = array.ctypes.data - mapped_at + start * row_bytes
    end = array.ctypes.data - mapped_at + stop * row_bytes
    page = mmap.PAGESIZE
    begin = -(-begin // page) * page  # only whole pages inside the range
    end = min(end, len(mapped))
    if end - begin >= page:
        mapped.madvise(mmap.MADV_DONTNEED, begin, (end - begin) // page * page)


def read_rows(dataset: Dataset, start: int, stop: int) -> tuple[np.ndarray, ...]:
    """Rows [start, stop) copied out of the map, their pages released."""
    arrays = (dataset.dense, dataset.sparse, dataset.labels)
    copies = tuple(np.array(a[start:stop]) for a in arrays)
    for a in arrays:
        release_pages(a, start, stop)
    return copies


def to_batch(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray, device) -> Batch:
    return Batch(
        torch.from_numpy(np.asarray(dense, dtype=np.float32)).to(device),
        torch.from_numpy(np.asarray(sparse, dtype=np.int64)).to(device),
        torch.from_numpy(np.asarray(labels, dtype=np.float32)).to(device),
    )


def prefetched(batches: Iterator, depth: int = PREFETCH_BATCHES) -> Iterator:
    """The same items, produced on a background thread up to `depth` ahead."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(done)
        except BaseException as error:  # handed to the consumer, raised there
            items.put(error)

    thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def rank_slice(rows: int, rank: int, world: int) -> slice:
    """Rank `rank`'s consecutive share of a global batch of `rows` (divisible by world)."""
    share = rows // world
    return slice(rank * share, (rank + 1) * share)


class TrainBatches:
    """The shuffled training batches of one split, epoch by epoch, for one rank."""

    def __init__(
        self,
        dataset: Dataset,
        rows: range,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} must divide evenly among {world} processes")
        self.dataset, self.rows, self.batch_size = dataset, rows, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.chunk_rows = chunk_rows

    @property
    def last_batch_rows(self) -> int:
        """Rows of the final, partial batch of an epoch, cut to a multiple of the ranks."""
        tail = len(self.rows) % self.batch_size
        return tail - tail % self.world

    @property
    def steps_per_epoch(self) -> int:
        return len(self.rows) // self.batch_size + (1 if self.last_batch_rows else 0)

    def _chunks(self, epoch: int) -> list[tuple[int, int, np.ndarray]]:
        """(start, stop, row order within the chunk) in this epoch's chunk order."""
        bounds = range(self.rows.start, self.rows.stop, self.chunk_rows)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(bounds))
        chunks = []
        for index in order:
            start = bounds[index]
            stop = min(start + self.chunk_rows, self.rows.stop)
            chunks.append((start, stop, rng.permutation(stop - start)))
        return chunks

    def epoch(self, epoch: int, device, skip_steps: int = 0) -> Iterator[Batch]:
        """This rank's batches of `epoch`, from batch `skip_steps` on, prefetched."""
        return prefetched(self._epoch(epoch, device, skip_steps))

    def _epoch(self, epoch: int, device, skip_steps: int) -> Iterator[Batch]:
        skip = skip_steps * self.batch_size  # positions of the epoch's sequence to pass over
        carried: tuple[np.ndarray, ...] | None = None  # rows short of a batch, in order
        emitted = skip_steps
        for start, stop, order in self._chunks(epoch):
            if skip >= stop - start:
                skip -= stop - start
                continue
            chunk = read_rows(self.dataset, start, stop)
            # each batch gathers its own shuffled rows from the chunk: a shuffled copy of
            # the whole chunk would hold the interpreter for tens of milliseconds at once,
            # and the training step waits for it
            order, skip, cursor = order[skip:], 0, 0
            if carried is not None:
                cursor = min(self.batch_size - len(carried[0]), len(order))
                carried = _joined(carried, _gathered(chunk, order[:cursor]))
                if len(carried[0]) < self.batch_size:
                    continue
                yield self._local(carried, device)
                carried, emitted = None, emitted + 1
            while len(order) - cursor >= self.batch_size:
                yield self._local(
                    _gathered(chunk, order[cursor : cursor + self.batch_size]), device
                )
                cursor += self.batch_size
                emitted += 1
            if cursor < len(order):
                carried = _gathered(chunk, order[cursor:])
        if carried is not None and emitted < self.steps_per_epoch:
            yield self._local(_rows(carried, 0, self.last_batch_rows), device)

    def _local(self, rows: tuple[np.ndarray, ...], device) -> Batch:
        mine = rank_slice(len(rows[0]), self.rank, self.world)
        return to_batch(*(a[mine] for a in rows), device)


def _gathered(arrays: tuple[np.ndarray, ...], rows: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(a[rows] for a in arrays)


def _rows(arrays: tuple[np.ndarray, ...], start: int, count: int) -> tuple[np.ndarray, ...]:
    return tuple(a[start : start + count] for a in arrays)


def _joined(first: tuple[np.ndarray, ...], second: tuple[np.ndarray, ...]):
    return tuple(np.concatenate([a, b]) for a, b in zip(first, second, strict=True))


def ordered_batches(
    dataset: Dataset, rows: range, batch_size: int, device, rank: int = 0, world: int = 1
) -> Iterator[tuple[Batch, int]]:
    """The rows of a split in order, as (this rank's batch, rows of it that are real).

    Every rank gets a batch of the same size at every step, as sharded lookups need:
    where a global batch does not divide evenly, the slices are padded by repeating
    their first row, and the count says how many rows to keep.
    """

    def produce():
        for start in range(rows.start, rows.stop, batch_size):
            count = min(batch_size, rows.stop - start)
            share = -(-count // world)
            begin = min(rank * share, count)
            real = min(begin + share, count) - begin
            # a rank with no real rows left still runs the step, on the batch's first row
            mine = read_rows(dataset, start + begin, start + begin + real) if real else (
                read_rows(dataset, start, start + 1))  # fmt: skip
            if real < share:
                mine = tuple(np.concatenate([a, np.repeat(a[:1], share - len(a), 0)])
                             for a in mine)  # fmt: skip
            yield to_batch(*mine, device), real

    return prefetched(produce())
