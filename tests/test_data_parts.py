"""Files cut into parts read by several threads give the dataset one thread gives."""

import gzip
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.engine import ConvertConfig, convert
from data.formats import avazu_format, criteo_format, csv_format
from data.parts import byte_ranges, count_lines, plan_parts
from mlet.formats import DataFormatError
from tests.test_data_engine import AVAZU_HEADER, avazu_rows, criteo_rows

ONE_THREAD = {"part_bytes": 1 << 30, "workers": 1, "progress": False}
MANY_PARTS = {"part_bytes": 3_000, "workers": 3, "chunk_rows": 40, "progress": False}


def dataset_files(folder: Path) -> dict[str, bytes]:
    """Every output file but schema.json (which records timings)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "schema.json"}


def criteo_file(tmp_path: Path, rows: int) -> Path:
    lines = criteo_rows(rows, c1=lambda i: "" if i % 11 == 0 else f"{(i * 7919) % 500:08x}")
    path = tmp_path / "day.tsv"
    path.write_text("".join(lines))
    return path


def test_byte_ranges_end_at_newlines_and_count_every_line(tmp_path):
    path = criteo_file(tmp_path, 300)
    ranges = byte_ranges(path, 0, 1_000)
    data = path.read_bytes()
    assert len(ranges) > 10 and ranges[0][0] == 0 and sum(n for _, n in ranges) == len(data)
    assert all(data[offset + length - 1 : offset + length] == b"\n" for offset, length in ranges)
    assert sum(count_lines(path, offset, length) for offset, length in ranges) == 300
    (tmp_path / "open.tsv").write_bytes(data.rstrip(b"\n"))  # a last line without newline
    assert count_lines(tmp_path / "open.tsv", 0, len(data) - 1) == 300


@pytest.mark.parametrize("encoding", ["vocab", "hash"])
def test_many_parts_and_threads_give_the_one_thread_dataset(tmp_path, encoding):
    path = criteo_file(tmp_path, 700)
    one = convert(path, criteo_format(), tmp_path / "one", ConvertConfig(encoding, **ONE_THREAD))
    many = convert(path, criteo_format(), tmp_path / "many", ConvertConfig(encoding, **MANY_PARTS))
    assert dataset_files(tmp_path / "one") == dataset_files(tmp_path / "many")
    assert one.source["summary"]["tables"] == many.source["summary"]["tables"]
    assert one.table_sizes == many.table_sizes


def test_a_header_file_cut_into_parts_reads_every_row_once(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(AVAZU_HEADER + "".join(avazu_rows(500)))
    fmt = avazu_format(AVAZU_HEADER.strip().split(","))
    one = convert(path, fmt, tmp_path / "one", ConvertConfig(**ONE_THREAD))
    many = convert(path, fmt, tmp_path / "many", ConvertConfig(**MANY_PARTS))
    assert one.rows == many.rows == 500
    assert dataset_files(tmp_path / "one") == dataset_files(tmp_path / "many")


def test_parquet_row_groups_gzip_and_plain_files_mix_in_order(tmp_path):
    lines = criteo_rows(400)
    (tmp_path / "all.tsv").write_text("".join(lines))
    (tmp_path / "a.tsv").write_text("".join(lines[:150]))
    with gzip.open(tmp_path / "b.tsv.gz", "wt") as f:
        f.writelines(lines[150:300])
    (tmp_path / "c.tsv").write_text("".join(lines[300:]))
    files = [tmp_path / "a.tsv", tmp_path / "b.tsv.gz", tmp_path / "c.tsv"]
    convert(tmp_path / "all.tsv", criteo_format(), tmp_path / "one", ConvertConfig(**ONE_THREAD))
    convert(files, criteo_format(), tmp_path / "many", ConvertConfig(**MANY_PARTS))
    assert dataset_files(tmp_path / "one") == dataset_files(tmp_path / "many")


def test_parquet_row_groups_are_parts(tmp_path):
    table = pa.table({"y": [i % 2 for i in range(90)], "c": [f"v{i % 7}" for i in range(90)]})
    pq.write_table(table, tmp_path / "log.parquet", row_group_size=20)
    fmt = csv_format(tmp_path / "log.parquet", "y", [], ["c"])
    with ThreadPoolExecutor(2) as pool:
        parts = plan_parts([tmp_path / "log.parquet"], fmt, 1 << 20, 50, pool)
    assert [(p.offset, p.rows, p.start) for p in parts] == [(0, 20, 0), (1, 20, 20), (2, 10, 40)]
    convert(tmp_path / "log.parquet", fmt, tmp_path / "one", ConvertConfig(**ONE_THREAD))
    convert(tmp_path / "log.parquet", fmt, tmp_path / "many", ConvertConfig(**MANY_PARTS))
    assert dataset_files(tmp_path / "one") == dataset_files(tmp_path / "many")


def test_max_rows_cuts_inside_a_part(tmp_path):
    path = criteo_file(tmp_path, 700)
    config = ConvertConfig(max_rows=333, **MANY_PARTS)
    schema = convert(path, criteo_format(), tmp_path / "many", config)
    one = ConvertConfig(max_rows=333, **ONE_THREAD)
    convert(path, criteo_format(), tmp_path / "one", one)
    assert schema.rows == 333
    assert dataset_files(tmp_path / "one") == dataset_files(tmp_path / "many")


def test_an_error_in_a_later_part_names_its_file_line(tmp_path):
    lines = criteo_rows(600)
    lines[457] = "1\t2\t3\n"
    (tmp_path / "day.tsv").write_text("".join(lines))
    with pytest.raises(DataFormatError, match=r"day.tsv:458: expected 40 tab-separated"):
        convert(tmp_path / "day.tsv", criteo_format(), tmp_path / "d", ConvertConfig(**MANY_PARTS))
    assert not (tmp_path / "d").exists()
    assert not [t for t in threading.enumerate() if t.name == "mlet-data-reader"]


def test_a_bad_value_in_a_later_part_names_its_line_and_column(tmp_path):
    lines = criteo_rows(600)
    fields = lines[500].rstrip("\n").split("\t")
    fields[14] = "zzzzzzzz"  # C1
    lines[500] = "\t".join(fields) + "\n"
    (tmp_path / "day.tsv").write_text("".join(lines))
    with pytest.raises(DataFormatError, match=r"day.tsv:501: column 'C1': not hexadecimal"):
        convert(tmp_path / "day.tsv", criteo_format(), tmp_path / "d", ConvertConfig(**MANY_PARTS))
    # the thread that hands parts to the pool has stopped (were it left to the garbage
    # collector, its cleanup could run inside a later conversion's pool and deadlock it)
    assert not [t for t in threading.enumerate() if t.name == "mlet-data-reader"]


def test_values_decoded_through_their_dictionary_match_per_value_decoding(tmp_path):
    # Two spellings of one key ("0000000a" and "a" are not both 8 digits, so the slow
    # path decodes them) must count as one vocabulary key.
    lines = [f"1\t1{chr(9) * 12}\t{v}{chr(9) * 25}\n" for v in ["a", "0000000a", "A", "b"] * 5]
    (tmp_path / "day.tsv").write_text("".join(lines))
    convert(tmp_path / "day.tsv", criteo_format(), tmp_path / "d", ConvertConfig(**ONE_THREAD))
    assert np.load(tmp_path / "d" / "vocab.C1.npy").tolist() == [10, 11]
    sparse = np.load(tmp_path / "d" / "sparse.npy")
    assert sparse[:16, 0].tolist() == [2, 2, 2, 3] * 4


@pytest.mark.parametrize("count", ["2.5", "x1", "1e39"])
def test_a_count_that_is_not_a_whole_number_is_read_as_a_float(tmp_path, count):
    # Criteo's parts are parsed with integer counts first, then again as floats, which
    # also say where a bad value is.
    lines = criteo_rows(600)
    fields = lines[450].split("\t")
    fields[1] = count  # I1
    lines[450] = "\t".join(fields)
    (tmp_path / "day.tsv").write_text("".join(lines))
    config = ConvertConfig(**MANY_PARTS)
    if count != "2.5":
        with pytest.raises(DataFormatError, match=r"day.tsv:451: column 'I1': "):
            convert(tmp_path / "day.tsv", criteo_format(), tmp_path / "d", config)
        return
    convert(tmp_path / "day.tsv", criteo_format(), tmp_path / "d", config)
    dense = np.load(tmp_path / "d" / "dense.npy")
    assert dense[450, 0] == 2.5 and dense[449, 0] == 449 and dense[451, 0] == 451
