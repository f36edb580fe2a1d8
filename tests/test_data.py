import gzip

import numpy as np
import pytest

from data.criteo import CriteoConfig, CriteoFormatError, convert, parse_line
from data.synthetic import SyntheticConfig, generate
from mlet.dataset import load_dataset, split_rows
from mlet.zipf import ZipfSampler

SIZES = (100,) * 26


def criteo_line(label="1", dense=None, sparse=None) -> str:
    dense = dense if dense is not None else ["1"] * 13
    sparse = sparse if sparse is not None else ["68fd1e64"] * 26
    return "\t".join([label, *dense, *sparse]) + "\n"


def test_parse_line_with_empty_and_negative_fields():
    dense = ["", "-3", "7"] + [""] * 10
    sparse = ["", "0000000a", "FFFFFFFF"] + ["05db9164"] * 23
    label, d, s = parse_line(criteo_line("0", dense, sparse), SIZES)
    assert label == 0
    assert d[:3] == [0.0, -3.0, 7.0] and d[3:] == [0.0] * 10
    assert s[0] == 0  # empty categorical -> id 0
    assert s[1] == 10 % 100
    assert s[2] == 0xFFFFFFFF % 100
    assert s[3] == 0x05DB9164 % 100
    assert all(0 <= v < 100 for v in s)


@pytest.mark.parametrize(
    "line, message",
    [
        ("1\t2\t3\n", "expected 40 tab-separated fields"),
        (criteo_line(label="2"), "label must be 0 or 1"),
        (criteo_line(dense=["x"] + ["1"] * 12), "dense field is not an integer"),
        (criteo_line(sparse=["zz"] + ["1"] * 25), "not hexadecimal"),
    ],
)
def test_parse_line_rejects_malformed_lines(line, message):
    with pytest.raises(CriteoFormatError, match=message):
        parse_line(line, SIZES, where="f:1")


@pytest.mark.parametrize("compressed", [False, True])
def test_convert_writes_the_dataset_format(tmp_path, compressed):
    lines = [criteo_line(str(i % 2), [str(i)] * 13, [f"{i:08x}"] * 26) for i in range(7)]
    source = tmp_path / ("day.tsv.gz" if compressed else "day.tsv")
    with gzip.open(source, "wt") if compressed else open(source, "w") as f:
        f.writelines(lines)
    schema = convert(source, tmp_path / "out", CriteoConfig(table_sizes=(5,) * 26, chunk_rows=3))
    data = load_dataset(tmp_path / "out")
    assert schema.rows == 7 and len(data) == 7
    assert data.dense.dtype == np.float32 and data.sparse.dtype == np.int32
    assert data.labels.tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert data.sparse[:, 0].tolist() == [i % 5 for i in range(7)]
    assert data.dense[6, 12] == 6.0


def test_convert_bad_file_leaves_nothing(tmp_path):
    source = tmp_path / "bad.tsv"
    source.write_text(criteo_line() + "1\tbroken\n")
    with pytest.raises(CriteoFormatError, match="bad.tsv:2"):
        convert(source, tmp_path / "out", CriteoConfig(table_sizes=SIZES))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_synthetic_is_deterministic_from_its_seed(tmp_path):
    config = SyntheticConfig(rows=3000, table_sizes=(40, 9, 300), seed=11, chunk_rows=1000)
    generate(config, tmp_path / "a")
    generate(config, tmp_path / "b")
    generate(SyntheticConfig(rows=3000, table_sizes=(40, 9, 300), seed=12), tmp_path / "c")
    a, b, c = (load_dataset(tmp_path / x) for x in "abc")
    for name in ("dense", "sparse", "labels"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.sparse, c.sparse)


def test_synthetic_rows_are_valid_and_skewed(tmp_path):
    schema = generate(SyntheticConfig(rows=20000, table_sizes=(1000, 5)), tmp_path / "d")
    data = load_dataset(tmp_path / "d")
    assert data.sparse.shape == (20000, 2)
    assert data.sparse[:, 0].max() < 1000 and data.sparse.min() >= 0
    counts = np.bincount(data.sparse[:, 0], minlength=1000)
    assert np.sort(counts)[-10:].sum() > 0.2 * 20000  # ten ids carry a fifth of the traffic
    assert 0.15 < schema.source["positive_rate"] < 0.35
    assert 0.5 < schema.source["oracle_auc"] <= 1.0
    assert (data.dense[:, 1] < 0).any()  # Criteo's I2 quirk


def test_synthetic_multi_hot_shape(tmp_path):
    generate(SyntheticConfig(rows=100, table_sizes=(10, 20), hotness=3), tmp_path / "m")
    assert load_dataset(tmp_path / "m").sparse.shape == (100, 2, 3)


def test_zipf_sampler_range_and_skew():
    rng = np.random.default_rng(0)
    sampler = ZipfSampler(50, 1.2, rng)
    ids = sampler.sample(10000, rng)
    assert ids.min() >= 0 and ids.max() < 50
    most_frequent = np.bincount(ids).argmax()
    assert most_frequent == sampler.ids[0]


def test_split_is_contiguous_with_test_last():
    split = split_rows(100)
    assert (split.train, split.val, split.test) == (range(0, 80), range(80, 90), range(90, 100))
    with pytest.raises(ValueError, match="too few"):
        split_rows(3)


def test_existing_dataset_is_not_overwritten(tmp_path):
    config = SyntheticConfig(rows=100, table_sizes=(5,))
    generate(config, tmp_path / "d")
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate(config, tmp_path / "d")
