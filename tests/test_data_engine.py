"""The conversion engine on small files written here: Criteo, Avazu, generic CSV, Parquet."""

import gzip

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.engine import ConvertConfig, convert
from data.formats import avazu_format, criteo_format, csv_format
from data.vocabulary import KeyCounter
from mlet.dataset import load_dataset
from mlet.encoding import (
    FIRST_VOCAB_ID,
    MISSING_ID,
    OOV_ID,
    BadValue,
    fnv1a64,
    hex_column_keys,
    hex_keys,
    value_counts,
)
from mlet.transform import copy_vocabularies, load_transform

QUIET = {"progress": False}


def tsv_line(label, dense, sparse) -> str:
    return "\t".join([str(label), *dense, *sparse]) + "\n"


def criteo_rows(count: int, c1=None) -> list[str]:
    """`count` lines; C1 takes `c1(i)`, other tables repeat a few values."""
    c1 = c1 or (lambda i: f"{i % 3:08x}")
    return [
        tsv_line(i % 2, [str(i)] + [""] * 12, [c1(i)] + [f"{(i * 7) % 4:08x}"] * 25)
        for i in range(count)
    ]


def test_hex_keys_read_criteo_values_exactly():
    values = ["", "0000000a", "FFFFFFFF", "05db9164", "deadBEEF"]
    keys, missing = hex_keys(pa.array([v.encode() for v in values], pa.binary()))
    assert missing.tolist() == [True, False, False, False, False]
    assert keys[1:].tolist() == [int(v, 16) for v in values[1:]]


@pytest.mark.parametrize("odd", [None, "a"])  # all 8 digits or empty (word route), or not
def test_hex_column_keys_give_every_value_its_key_and_empty_values_one_missing_entry(odd):
    values = ["05db9164", "", "deadBEEF", "05db9164", None, "FFFFFFFF", "00000000", odd]
    keys = hex_column_keys(pa.array(values, pa.binary()))
    distinct, missing, positions = keys.distinct, keys.missing, keys.positions[:, 0]
    for value, position in zip(values, positions, strict=True):
        assert missing[position] == (not value)
        if value:
            assert distinct[position] == int(value, 16)
    assert positions[0] == positions[3]  # one entry per distinct value


@pytest.mark.parametrize("bad", ["0000000g", "\0" * 8, "00000-01"])
def test_hex_column_keys_name_the_first_row_that_is_not_hexadecimal(bad):
    values = ["05db9164", "", bad, "05db9164", bad]
    with pytest.raises(BadValue, match="not hexadecimal") as raised:
        hex_column_keys(pa.array(values, pa.binary()))
    assert raised.value.row == 2


def test_fnv1a64_is_the_published_hash():
    # FNV-1a 64 test vectors: "" and "a"
    hashes = fnv1a64(pa.array([b"", b"a"], pa.binary()))
    assert hashes.tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C]


def test_criteo_vocab_uses_training_rows_only(tmp_path):
    # 20 rows: train 0..15, val 16..17, test 18..19. C1 of row i is i, so the held-out
    # values are unseen; the row-0 value is empty (its own missing row).
    lines = criteo_rows(20, c1=lambda i: "" if i == 0 else f"{i:08x}")
    (tmp_path / "day.tsv").write_text("".join(lines))
    schema = convert(tmp_path / "day.tsv", criteo_format(), tmp_path / "d", ConvertConfig(**QUIET))
    data = load_dataset(tmp_path / "d")
    vocabulary = np.load(tmp_path / "d" / "vocab.C1.npy")
    assert vocabulary.tolist() == list(range(1, 16))  # rows 1..15, sorted keys
    c1 = data.sparse[:, 0]
    assert c1[0] == MISSING_ID
    assert c1[1:16].tolist() == [FIRST_VOCAB_ID + i for i in range(15)]
    assert (c1[16:] == OOV_ID).all()  # no leakage: held-out values are out of vocabulary
    assert schema.table_sizes[0] == FIRST_VOCAB_ID + 15
    assert data.dense[:, 0].tolist() == list(range(20)) and (data.dense[:, 1:] == 0).all()
    assert data.labels.tolist() == [i % 2 for i in range(20)]
    summary = schema.source["summary"]
    assert summary["click_rate"] == 0.5
    assert summary["empty_dense"]["I2"] == 20 and summary["empty_dense"]["I1"] == 0
    assert summary["tables"]["C1"]["empty"] == 1
    assert summary["tables"]["C1"]["held_out_oov_share"] == 1.0
    assert summary["tables"]["C2"]["held_out_oov_share"] == 0.0


def test_min_count_sends_rare_values_to_the_oov_row(tmp_path):
    lines = criteo_rows(20, c1=lambda i: f"{7 if i % 2 else 100 + i:08x}")
    (tmp_path / "day.tsv").write_text("".join(lines))
    convert(
        tmp_path / "day.tsv", criteo_format(), tmp_path / "d", ConvertConfig(min_count=2, **QUIET)
    )
    c1 = load_dataset(tmp_path / "d").sparse[:, 0]
    assert np.load(tmp_path / "d" / "vocab.C1.npy").tolist() == [7]
    assert (c1[1::2] == FIRST_VOCAB_ID).all() and (c1[0::2] == OOV_ID).all()


def test_hash_keeps_dlrm_rule_with_a_missing_row(tmp_path):
    lines = criteo_rows(10, c1=lambda i: "" if i == 3 else f"{i * 123457:08x}")
    (tmp_path / "day.tsv").write_text("".join(lines))
    config = ConvertConfig(encoding="hash", hash_size=1000, **QUIET)
    schema = convert(tmp_path / "day.tsv", criteo_format(), tmp_path / "d", config)
    c1 = load_dataset(tmp_path / "d").sparse[:, 0]
    assert schema.table_sizes == (1001,) * 26
    expected = [0 if i == 3 else 1 + (i * 123457) % 1000 for i in range(10)]
    assert c1.tolist() == expected
    assert not list((tmp_path / "d").glob("vocab.*"))


def test_several_files_in_order_and_gzip_equal_one_file(tmp_path):
    lines = criteo_rows(30)
    (tmp_path / "all.tsv").write_text("".join(lines))
    (tmp_path / "day_0.tsv").write_text("".join(lines[:12]))
    with gzip.open(tmp_path / "day_1.tsv.gz", "wt") as f:
        f.writelines(lines[12:])
    config = ConvertConfig(chunk_rows=7, **QUIET)
    convert(tmp_path / "all.tsv", criteo_format(), tmp_path / "a", config)
    files = [tmp_path / "day_0.tsv", tmp_path / "day_1.tsv.gz"]
    convert(files, criteo_format(), tmp_path / "b", config)
    a, b = load_dataset(tmp_path / "a"), load_dataset(tmp_path / "b")
    for name in ("dense", "sparse", "labels"):
        assert np.array_equal(getattr(a, name), getattr(b, name))


AVAZU_HEADER = "id,click,hour,C1,banner_pos,site_id,device_ip\n"


def avazu_rows(count: int) -> list[str]:
    # 14102100 is 2014-10-21 00:00, a Tuesday; hours step through the day
    return [
        f"{10**18 + i},{int(i % 5 == 0)},141021{i % 24:02d},1005,{i % 2},site{i % 3},ip{i}\n"
        for i in range(count)
    ]


def test_avazu_drops_id_and_splits_the_hour(tmp_path):
    (tmp_path / "train.csv").write_text(AVAZU_HEADER + "".join(avazu_rows(30)))
    fmt = avazu_format(AVAZU_HEADER.strip().split(","))
    schema = convert(tmp_path / "train.csv", fmt, tmp_path / "d", ConvertConfig(**QUIET))
    data = load_dataset(tmp_path / "d")
    names = ("C1", "banner_pos", "site_id", "device_ip", "hour_of_day", "day_of_week")
    assert schema.table_names == names and schema.num_dense == 0
    assert data.labels.tolist() == [int(i % 5 == 0) for i in range(30)]
    transform = load_transform(tmp_path / "d")
    hour_vocabulary = transform.tables[4].vocabulary
    assert hour_vocabulary.tolist() == list(range(24))
    assert data.sparse[:24, 4].tolist() == [FIRST_VOCAB_ID + h for h in range(24)]
    assert np.load(tmp_path / "d" / "vocab.day_of_week.npy").tolist() == [1]  # Tuesday
    assert (data.sparse[24:, 3] == OOV_ID).all()  # every device_ip is new
    assert (data.sparse[:, 0] == FIRST_VOCAB_ID).all()


GENERIC = {
    "user": ["u1", "u2", "u1", "u3", "u2", "u1", "u4", "u2", "u1", "u3"],
    "age": [21.0, 35.0, None, 44.0, 35.0, 21.0, 60.0, 35.0, 21.0, 44.0],
    "genres": ["a|b", "c", "", "a|b|c", "b", "a", "c|a", "b", "a|c", "d"],
    "liked": [1, 0, 1, 0, 0, 1, 1, 0, 1, 0],
}


def generic_format(path, **options):
    options = {"multi_hot": {"genres": "|"}} | options
    return csv_format(path, "liked", ["age"], ["user", "genres"], **options)


def test_generic_csv_and_parquet_give_the_same_dataset(tmp_path):
    table = pa.table(GENERIC)
    pq.write_table(table, tmp_path / "log.parquet")
    rows = ["user,age,genres,liked"] + [
        f"{u},{'' if a is None else a},{g},{y}"
        for u, a, g, y in zip(*GENERIC.values(), strict=True)
    ]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    config = ConvertConfig(hotness=2, **QUIET)
    for name in ("log.csv", "log.parquet"):
        convert(tmp_path / name, generic_format(tmp_path / name), tmp_path / name[4:], config)
    a, b = load_dataset(tmp_path / "csv"), load_dataset(tmp_path / "parquet")
    for name in ("dense", "sparse", "labels"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.sparse.shape == (10, 2, 2) and a.dense[:, 0].tolist()[:3] == [21.0, 35.0, 0.0]


def test_multi_hot_keeps_hotness_values_and_pads_with_the_missing_row(tmp_path):
    pq.write_table(pa.table(GENERIC), tmp_path / "log.parquet")
    fmt = generic_format(tmp_path / "log.parquet")
    convert(tmp_path / "log.parquet", fmt, tmp_path / "d", ConvertConfig(hotness=2, **QUIET))
    sparse = load_dataset(tmp_path / "d").sparse
    genres = load_transform(tmp_path / "d").tables[1]
    ids = {g: FIRST_VOCAB_ID + i for i, g in enumerate(vocabulary_order(genres, "abc"))}
    assert sparse[0, 1].tolist() == [ids["a"], ids["b"]]
    assert sparse[1, 1].tolist() == [ids["c"], MISSING_ID]  # one value, padded
    assert sparse[2, 1].tolist() == [MISSING_ID, MISSING_ID]  # empty
    assert sparse[3, 1].tolist() == [ids["a"], ids["b"]]  # a|b|c keeps the first two
    assert sparse[9, 1].tolist() == [OOV_ID, MISSING_ID]  # "d" is in the test rows only
    assert (sparse[:, 0, 1] == MISSING_ID).all()  # single-valued tables fill slot 0 only


def vocabulary_order(table, values: str) -> list[str]:
    keys = fnv1a64(pa.array([v.encode() for v in values], pa.binary()))
    found = {int(k): v for k, v in zip(keys, values, strict=True)}
    return [found[int(k)] for k in table.vocabulary]


def test_headerless_tsv_named_by_columns(tmp_path):
    lines = [f"{i % 2}\t{i}\tcat{i % 3}\n" for i in range(10)]
    (tmp_path / "log.tsv").write_text("".join(lines))
    fmt = csv_format(tmp_path / "log.tsv", "y", ["n"], ["c"], columns=["y", "n", "c"])
    assert fmt.delimiter == "\t" and not fmt.header
    schema = convert(tmp_path / "log.tsv", fmt, tmp_path / "d", ConvertConfig(**QUIET))
    assert schema.rows == 10 and load_dataset(tmp_path / "d").dense[:, 0].tolist() == list(
        range(10)
    )


def test_vocabularies_travel_with_copy_vocabularies(tmp_path):
    (tmp_path / "day.tsv").write_text("".join(criteo_rows(20)))
    convert(tmp_path / "day.tsv", criteo_format(), tmp_path / "d", ConvertConfig(**QUIET))
    (tmp_path / "run").mkdir()
    copied = copy_vocabularies(tmp_path / "d", tmp_path / "run")
    assert len(copied) == 27 and (tmp_path / "run" / "transform.json").is_file()
    assert (
        load_transform(tmp_path / "run").table_sizes == load_transform(tmp_path / "d").table_sizes
    )
    assert copy_vocabularies(tmp_path / "run" / "nothing-here", tmp_path / "run") == []


@pytest.mark.parametrize("encoding", ["vocab", "hash"])
def test_max_rows_reads_a_prefix(tmp_path, encoding):
    (tmp_path / "day.tsv").write_text("".join(criteo_rows(50)))
    config = ConvertConfig(encoding=encoding, max_rows=20, chunk_rows=8, **QUIET)
    schema = convert(tmp_path / "day.tsv", criteo_format(), tmp_path / "d", config)
    assert schema.rows == 20 and len(load_dataset(tmp_path / "d")) == 20


def test_cli_front_doors_print_the_summary(tmp_path, capsys):
    from cli import main

    (tmp_path / "train.csv").write_text(AVAZU_HEADER + "".join(avazu_rows(30)))
    assert main(["data", "avazu", str(tmp_path / "train.csv"), "--out", str(tmp_path / "a"),
                 "--hash", "50"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "30 rows, click rate 0.2000" in printed and "hour_of_day" in printed
    assert load_dataset(tmp_path / "a").schema.table_sizes == (51,) * 6
    pq.write_table(pa.table(GENERIC), tmp_path / "log.parquet")
    args = ["data", "csv", str(tmp_path / "log.parquet"), "--out", str(tmp_path / "c"),
            "--label", "liked", "--dense", "age", "--categorical", "user,genres",
            "--multi-hot", "genres:|", "--hotness", "3", "--min-count", "2"]  # fmt: skip
    assert main(args) == 0
    assert load_dataset(tmp_path / "c").sparse.shape == (10, 2, 3)
    assert main([*args[:-4], "--hotness", "1", "--overwrite"]) == 2  # multi-hot needs H >= 2


def test_value_counts_count_every_id_but_missing_and_the_oov_id_per_table():
    ids = np.array([[[MISSING_ID, 5], [OOV_ID, OOV_ID]], [[7, OOV_ID], [MISSING_ID, 2]]])
    values, oov = value_counts(ids)  # [B=2, T=2, H=2]
    assert values.tolist() == [3, 3] and oov.tolist() == [1, 2]
    values, oov = value_counts(ids[:, :, 0])  # hotness 1: [B, T]
    assert values.tolist() == [1, 1] and oov.tolist() == [0, 1]


def test_key_counter_vocabularies_hold_keys_seen_min_count_times_across_merges():
    rng = np.random.default_rng(0)
    counter, seen = KeyCounter(merge_above=50), {}  # merges (group_by) every few batches
    for _ in range(20):
        keys = np.unique(rng.integers(0, 2**63, 30, dtype=np.uint64) % np.uint64(200))
        counts = rng.integers(1, 4, len(keys))
        counter.add_counts(keys, counts)
        for key, count in zip(keys.tolist(), counts.tolist(), strict=True):
            seen[key] = seen.get(key, 0) + count
    for min_count in (1, 2, 10):
        expected = sorted(k for k, c in seen.items() if c >= min_count)
        vocabulary = counter.vocabulary(min_count)
        assert vocabulary.dtype == np.uint64 and vocabulary.tolist() == expected
    assert KeyCounter().vocabulary(1).tolist() == [] == KeyCounter().vocabulary(2).tolist()
