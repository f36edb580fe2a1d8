"""The streaming loader: every row once an epoch, resumable, sliced per rank, pages released."""

import numpy as np
import pytest

from mlet.dataset import load_dataset
from train.loader import TrainBatches, ordered_batches, prefetched, read_rows, release_pages


@pytest.fixture(scope="module")
def dataset(tiny_data):
    return load_dataset(tiny_data)


def labels_of(batches) -> list[np.ndarray]:
    return [b.labels.numpy() for b in batches]


def row_ids(dataset, batches) -> np.ndarray:
    """Recover which rows a batch holds from its sparse ids and dense values (unique here)."""
    keys = {tuple(np.asarray(dataset.dense[i])): i for i in range(len(dataset))}
    return np.array([keys[tuple(row)] for b in batches for row in b.dense.numpy()])


def test_an_epoch_reads_every_training_row_once_in_a_new_order(dataset):
    batches = TrainBatches(dataset, range(0, 3000), 256, seed=1, chunk_rows=700)
    first = row_ids(dataset, batches.epoch(1, "cpu"))
    second = row_ids(dataset, batches.epoch(2, "cpu"))
    assert sorted(first.tolist()) == list(range(3000)) == sorted(second.tolist())
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(3000))
    assert batches.steps_per_epoch == 12  # 11 full batches and 184 rows


@pytest.mark.parametrize(("chunk", "batch", "skip"), [(700, 256, 0), (100, 256, 3), (256, 256, 1),
                                                   (3000, 128, 7), (333, 100, 0)])  # fmt: skip
def test_an_epoch_is_its_shuffled_chunks_cut_into_batches(dataset, chunk, batch, skip):
    """The rows come in the epoch's chunk order, each chunk in its own row order, cut into
    batches across chunk ends; the last partial batch keeps what the ranks can share."""
    batches = TrainBatches(dataset, range(0, 3000), batch, seed=2, chunk_rows=chunk)
    sequence = np.concatenate([start + order for start, _, order in batches._chunks(5)])
    full = len(sequence) // batch * batch
    expected = sequence[: full + batches.last_batch_rows][skip * batch :]
    got = list(batches.epoch(5, "cpu", skip_steps=skip))
    assert len(got) == batches.steps_per_epoch - skip
    assert all(len(b) == batch for b in got[: full // batch - skip])
    np.testing.assert_array_equal(row_ids(dataset, got), expected)


def test_skipping_steps_continues_the_same_sequence(dataset):
    batches = TrainBatches(dataset, range(0, 3000), 256, seed=1, chunk_rows=700)
    whole = labels_of(batches.epoch(3, "cpu"))
    later = labels_of(batches.epoch(3, "cpu", skip_steps=5))
    assert len(later) == len(whole) - 5
    for a, b in zip(whole[5:], later, strict=True):
        np.testing.assert_array_equal(a, b)


def test_ranks_read_consecutive_slices_of_each_global_batch(dataset):
    whole = TrainBatches(dataset, range(0, 3000), 256, seed=4, chunk_rows=700)
    ranks = [TrainBatches(dataset, range(0, 3000), 256, 4, rank, 2, 700) for rank in (0, 1)]
    per_rank = [labels_of(r.epoch(1, "cpu")) for r in ranks]
    joined = [np.concatenate(pair) for pair in zip(*per_rank, strict=True)]
    expected = labels_of(whole.epoch(1, "cpu"))
    for a, b in zip(expected, joined, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="divide evenly among 3 processes"):
        TrainBatches(dataset, range(0, 3000), 256, 0, 0, 3)


def test_ordered_batches_pad_uneven_ranks_and_say_how_many_rows_are_real(dataset):
    rows = range(100, 1101)  # 1001 rows: batches of 400, 400, 201
    parts = [list(ordered_batches(dataset, rows, 400, "cpu", rank, 2)) for rank in (0, 1)]
    sizes = [[len(b) for b, _ in p] for p in parts]
    assert sizes[0] == sizes[1] == [200, 200, 101]  # equal batches on every rank
    real = [[n for _, n in p] for p in parts]
    assert real == [[200, 200, 101], [200, 200, 100]]
    labels = np.concatenate(
        [np.concatenate([parts[r][j][0].labels.numpy()[: real[r][j]] for r in (0, 1)])
         for j in range(3)]
    )  # fmt: skip
    np.testing.assert_array_equal(labels, np.asarray(dataset.labels[100:1101]))


def test_released_pages_read_back_the_same(dataset):
    before = read_rows(dataset, 0, 4000)
    release_pages(dataset.sparse, 0, 4000)
    release_pages(dataset.sparse[1000:], 0, 3000)  # a slice finds its place in the map
    after = read_rows(dataset, 0, 4000)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    release_pages(np.zeros((10, 3)), 0, 10)  # an array in memory: nothing to release


def test_prefetching_hands_on_errors_and_stops_when_closed():
    def broken():
        yield 1
        raise OSError("disk gone")

    items = prefetched(broken())
    assert next(items) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(items)
    endless = prefetched(iter(range(10**9)), depth=2)
    assert [next(endless) for _ in range(3)] == [0, 1, 2]
    endless.close()  # the producer thread ends instead of filling the queue forever
