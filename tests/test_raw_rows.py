"""Raw-row models: the logged columns in, `mlet predict`'s probabilities out.

The transform step (mlet.raw_rows) against the file readers `mlet data` and `mlet predict`
use, for every source format; the folders export writes; and real Triton serving the
ensemble over HTTP with BYTES inputs, in JSON and in binary form.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from bench.inprocess.data_bench import generate_criteo
from data.engine import ConvertConfig, convert
from data.formats import avazu_format, criteo_format, csv_format
from export.exporter import ExportConfig, export_variants
from export.triton_config import check_triton_config
from mlet.formats import DataFormatError, read_batches
from mlet.raw_rows import batch_columns, raw_columns, raw_to_inputs
from mlet.repository import CONFIG_FILE
from mlet.transform import load_transform
from predict.predict import PredictConfig, predict_files
from serve.process import free_port
from serve.triton_engine import TritonConfig, running_triton, unavailable_reason
from tests.conftest import tiny_train_config
from tests.test_data_engine import AVAZU_HEADER, GENERIC, avazu_rows
from train.trainer import train_run

TRITON = unavailable_reason()
QUIET = {"progress": False}


def generic_csv(path, rows: int = 400) -> None:
    rng = np.random.default_rng(1)
    lines = ["user,age,genres,liked"]
    for i in range(rows):
        age = "" if i % 7 == 0 else f"{rng.integers(15, 70)}"
        genres = "|".join(rng.choice(list("abcde"), size=rng.integers(0, 4), replace=False))
        lines.append(f"u{rng.integers(0, 40)},{age},{genres},{int(rng.random() < 0.4)}")
    path.write_text("\n".join(lines) + "\n")


def sources(root):
    """(name, raw file, format, convert config) for every source format and encoding."""
    criteo, avazu, generic = root / "day.tsv", root / "train.csv", root / "log.csv"
    generate_criteo(criteo, 1200, seed=5)
    avazu.write_text(AVAZU_HEADER + "".join(avazu_rows(600)))
    generic_csv(generic)
    generic_fmt = csv_format(generic, "liked", ["age"], ["user", "genres"],
                             multi_hot={"genres": "|"})  # fmt: skip
    return [
        ("criteo", criteo, criteo_format(), ConvertConfig(min_count=2, **QUIET)),
        ("criteo-hash", criteo, criteo_format(),
         ConvertConfig(encoding="hash", hash_size=500, **QUIET)),
        ("avazu", avazu, avazu_format(AVAZU_HEADER.strip().split(",")), ConvertConfig(**QUIET)),
        ("generic", generic, generic_fmt, ConvertConfig(hotness=2, **QUIET)),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    out = {}
    for name, raw, fmt, config in sources(root):
        convert(raw, fmt, root / name, config)
        out[name] = (raw, root / name)
    return out


@pytest.mark.parametrize("name", ["criteo", "criteo-hash", "avazu", "generic"])
def test_the_transform_step_gives_what_the_file_readers_give(datasets, name):
    raw, data = datasets[name]
    transform = load_transform(data)
    fmt = transform.fmt.without_label()
    for batch in read_batches(raw, transform.fmt):
        features = transform.features(batch, str(raw), 1)
        expected = transform.encode(features.keys)
        dense, sparse = raw_to_inputs(transform, batch_columns(fmt, batch))
        np.testing.assert_array_equal(dense, features.dense)
        np.testing.assert_array_equal(sparse, expected.astype(np.int64))


def test_raw_columns_are_the_logged_columns():
    fmt = avazu_format(AVAZU_HEADER.strip().split(","))
    assert [(c.name, c.datatype) for c in raw_columns(fmt)] == [
        ("C1", "BYTES"), ("banner_pos", "BYTES"), ("site_id", "BYTES"), ("device_ip", "BYTES"),
        ("hour", "BYTES"),
    ]  # fmt: skip
    assert [c.datatype for c in raw_columns(criteo_format())] == ["FP32"] * 13 + ["BYTES"] * 26


def test_a_bad_raw_value_names_its_column_and_row(datasets):
    transform = load_transform(datasets["criteo"][1])
    columns = batch_columns(
        transform.fmt.without_label(),
        next(read_batches(datasets["criteo"][0], transform.fmt)).slice(0, 4),
    )
    columns["C3"] = columns["C3"].copy()
    columns["C3"][2, 0] = b"not-hex"
    with pytest.raises(DataFormatError, match=r"request row:2: column 'C3'"):
        raw_to_inputs(transform, columns)
    del columns["C5"]
    with pytest.raises(DataFormatError, match=r"missing input column\(s\) \['C5'\]"):
        raw_to_inputs(transform, columns)
    avazu = load_transform(datasets["avazu"][1])
    hours = {c.name: np.array([[b"x"]], dtype=object) for c in raw_columns(avazu.fmt)}
    with pytest.raises(DataFormatError, match="column 'hour': not a YYMMDDHH hour"):
        raw_to_inputs(avazu, hours)


def test_parquet_nulls_are_missing_values_like_empty_csv_fields(tmp_path):
    table = pa.table(GENERIC | {"user": [None if u == "u3" else u for u in GENERIC["user"]]})
    pq.write_table(table, tmp_path / "log.parquet")
    fmt = csv_format(tmp_path / "log.parquet", "liked", ["age"], ["user", "genres"],
                     multi_hot={"genres": "|"})  # fmt: skip
    convert(tmp_path / "log.parquet", fmt, tmp_path / "d", ConvertConfig(hotness=2, **QUIET))
    transform = load_transform(tmp_path / "d")
    batch = next(read_batches(tmp_path / "log.parquet", transform.fmt))
    columns = batch_columns(transform.fmt.without_label(), batch)
    assert columns["user"][3, 0] == b"" and np.isnan(columns["age"][2, 0])
    _, sparse = raw_to_inputs(transform, columns)
    expected = transform.encode(transform.features(batch, "log", 1).keys)
    np.testing.assert_array_equal(sparse, expected)


@pytest.fixture(scope="module")
def exported(datasets, tmp_path_factory):
    """A tiny model of each source, exported with fp32 and int8, raw models beside."""
    root = tmp_path_factory.mktemp("raw-models")
    repo = root / "models"
    for name, (_, data) in datasets.items():
        train_run(data, root / name, tiny_train_config(dim=4))
        export_variants(root / name, repo, ExportConfig(name=name, variants=("fp32", "int8"),
                                                        max_batch_size=512))  # fmt: skip
    return repo


def test_export_writes_a_raw_model_and_its_transform_beside_every_model(exported):
    for model in ("criteo", "criteo-int8", "avazu", "generic"):
        transform, raw = exported / f"{model}-transform", exported / f"{model}-raw"
        assert sorted(p.name for p in (transform / "1").iterdir()) == sorted(
            ["model.py", *(p.name for p in (exported / model).iterdir()
                           if p.name.startswith(("vocab.", "transform.json")))]
        )  # fmt: skip
        assert (raw / "1").is_dir() and not any((raw / "1").iterdir())
        for folder in (transform, raw):
            check_triton_config((folder / CONFIG_FILE).read_text(), folder.name)
        text = (raw / CONFIG_FILE).read_text()
        assert 'platform: "ensemble"' in text and f'model_name: "{model}-transform"' in text
    assert "TYPE_STRING" in (exported / "criteo-raw" / CONFIG_FILE).read_text()
    assert 'name: "dense"' not in (exported / "avazu-transform" / CONFIG_FILE).read_text()


def raw_request(columns: dict[str, np.ndarray], binary: bool) -> list:
    inputs = []
    for name, values in columns.items():
        entry = httpclient.InferInput(name, list(values.shape), np_to_triton_dtype(values.dtype))
        entry.set_data_from_numpy(values, binary_data=binary)
        inputs.append(entry)
    return inputs


@pytest.fixture(scope="module")
def triton(exported, tmp_path_factory):
    if TRITON:
        pytest.skip(f"no Triton here: {TRITON}")
    models = [f"{m}{suffix}" for m in ("criteo", "criteo-int8", "criteo-hash", "avazu", "generic")
              for suffix in ("", "-transform", "-raw")]  # fmt: skip
    log = tmp_path_factory.mktemp("triton-raw") / "triton.log"
    config = TritonConfig(repo=exported, port=free_port(), models=models)
    with (
        running_triton(config, log) as server,
        httpclient.InferenceServerClient(server.url.removeprefix("http://")) as client,
    ):
        yield client


@pytest.mark.parametrize("model", ["criteo", "criteo-int8", "criteo-hash", "avazu", "generic"])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_triton_scores_raw_rows_as_mlet_predict_does(triton, exported, datasets, model, binary,
                                                     tmp_path):  # fmt: skip
    raw, _ = datasets[model.removesuffix("-int8")]
    predicted = tmp_path / "predicted.csv"
    predict_files(exported / model, [raw], predicted, PredictConfig())
    expected = pacsv.read_csv(predicted).column("probability").to_numpy()
    transform = load_transform(exported / model)
    fmt, done = transform.fmt.without_label(), 0
    for batch in read_batches(raw, transform.fmt):
        for start in range(0, batch.num_rows, 300):
            part = batch.slice(start, 300)
            inputs = raw_request(batch_columns(fmt, part), binary)
            result = triton.infer(f"{model}-raw", inputs)
            probability = result.as_numpy("probability").reshape(-1)
            np.testing.assert_allclose(probability, expected[done : done + len(part)], atol=1e-6)
            done += len(part)
    assert done == len(expected)


def test_triton_answers_a_bad_raw_value_with_the_column_and_row(triton, exported, datasets):
    transform = load_transform(exported / "criteo")
    batch = next(read_batches(datasets["criteo"][0], transform.fmt)).slice(0, 3)
    columns = batch_columns(transform.fmt.without_label(), batch)
    columns["C3"] = columns["C3"].copy()
    columns["C3"][1, 0] = b"zz"
    with pytest.raises(InferenceServerException, match=r"request row:1: column 'C3'"):
        triton.infer("criteo-raw", raw_request(columns, binary=True))


def test_mlet_predict_sends_raw_rows_to_the_raw_model(exported, datasets, tmp_path_factory):
    if TRITON:
        pytest.skip(f"no Triton here: {TRITON}")
    raw, _ = datasets["avazu"]
    out = tmp_path_factory.mktemp("predict-raw")
    predict_files(exported / "avazu", [raw], out / "local.csv", PredictConfig())
    log = out / "triton.log"
    models = ["avazu", "avazu-transform", "avazu-raw"]
    with running_triton(TritonConfig(repo=exported, port=free_port(), models=models), log) as t:
        config = PredictConfig(url=t.url, raw=True, request_rows=128)
        predict_files(exported / "avazu", [raw], out / "served.csv", config)
    local = pacsv.read_csv(out / "local.csv").column("probability").to_numpy()
    served = pacsv.read_csv(out / "served.csv").column("probability").to_numpy()
    np.testing.assert_allclose(served, local, atol=1e-6)


def test_raw_rows_need_a_server(exported, datasets, tmp_path):
    with pytest.raises(ValueError, match="give --url too"):
        predict_files(exported / "avazu", [datasets["avazu"][0]], tmp_path / "p.csv",
                      PredictConfig(raw=True))  # fmt: skip
