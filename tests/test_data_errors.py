"""Bad input: a clear error naming file, line (or row group) and column; nothing written."""

import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli import main
from data.engine import ConvertConfig, convert
from data.formats import avazu_format, criteo_format, csv_format
from mlet.formats import DataFormatError


def good_line(label="1", dense="5", value="68fd1e64") -> str:
    return "\t".join([label] + [dense] * 13 + [value] * 26) + "\n"


def convert_criteo(tmp_path, text: str | bytes, name="day.tsv"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return convert(path, criteo_format(), tmp_path / "out", ConvertConfig(progress=False))


def assert_nothing_written(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


GOOD = good_line() * 10  # lines 1..10; the bad line is line 11


@pytest.mark.parametrize(
    "bad, message",
    [
        ("1\t2\t3\n", r"day.tsv:11: expected 40 tab-separated fields, got 3"),
        (good_line(label="2"), r"day.tsv:11: column 'label': label must be 0 or 1, got 2"),
        (good_line(dense="1e39"), r"day.tsv:11: column 'I1': .*fits in float32"),
        (good_line(dense="x"), r"day.tsv:11: column 'I1': not a number: 'x'"),
        (good_line(value="zz"), r"day.tsv:11: column 'C1': not hexadecimal"),
        (good_line(value="6\xe98fd1e6"), r"day.tsv:11: column 'C1': not hexadecimal"),
        (
            "1,2,3,4\n",
            r"day.tsv:11: expected 40 tab-separated fields, got 1 \(this looks like a comma",
        ),
    ],
)
def test_criteo_errors_name_file_line_and_column(tmp_path, bad, message):
    with pytest.raises(DataFormatError, match=message):
        convert_criteo(tmp_path, GOOD + bad + GOOD)
    assert_nothing_written(tmp_path)


def test_truncated_and_fake_gzip_are_named(tmp_path):
    whole = gzip.compress((good_line() * 2000).encode())
    with pytest.raises(DataFormatError, match=r"day.tsv.gz: truncated"):
        convert_criteo(tmp_path, whole[: len(whole) // 2], name="day.tsv.gz")
    with pytest.raises(DataFormatError, match=r"fake.tsv.gz: not a gzip file"):
        convert_criteo(tmp_path, good_line().encode(), name="fake.tsv.gz")
    assert_nothing_written(tmp_path)


def test_undecodable_bytes_in_a_csv_are_refused(tmp_path):
    path = tmp_path / "log.csv"
    path.write_bytes(b"y,c\n" + b"1,ok\n" * 10 + b"0,caf\xe9\n")
    fmt = csv_format(path, "y", [], ["c"])
    with pytest.raises(DataFormatError, match=r"log.csv:12: column 'c': undecodable bytes"):
        convert(path, fmt, tmp_path / "out", ConvertConfig(progress=False))
    assert_nothing_written(tmp_path)


def test_unknown_columns_are_listed(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("y,c\n1,a\n")
    with pytest.raises(DataFormatError, match=r"unknown column 'price'; the file has \['y', 'c'\]"):
        convert(path, csv_format(path, "y", ["price"], ["c"]), tmp_path / "out")
    with pytest.raises(DataFormatError, match="not an Avazu header"):
        avazu_format(["y", "c"])
    assert_nothing_written(tmp_path)


def test_parquet_errors_name_the_row_group_and_column(tmp_path):
    path = tmp_path / "log.parquet"
    n = ["3"] * 10 + ["many"]
    pq.write_table(pa.table({"y": [1] * 11, "n": n, "c": ["a"] * 11}), path)
    with pytest.raises(DataFormatError, match=r"row group 0, column 'n'"):
        convert(path, csv_format(path, "y", ["n"], ["c"]), tmp_path / "out")
    assert_nothing_written(tmp_path)


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    (tmp_path / "day.tsv").write_text(GOOD + good_line(label="7"))
    code = main(["data", "criteo", str(tmp_path / "day.tsv"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "label must be 0 or 1, got 7" in capsys.readouterr().err
    assert_nothing_written(tmp_path)
