"""Raw-row models: the logged columns in, `mlet predict`'s probabilities out.

The transform step (mlet.raw_rows) against the file readers `mlet data` and `mlet predict`
use, for every source format; the folders export writes; and real Triton serving the
ensemble over HTTP with BYTES inputs, in JSON and in binary form.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from bench.inprocess.data_bench import generate_criteo
from data.engine import ConvertConfig, convert
from data.formats import avazu_format, criteo_format, csv_format
from export.exporter import ExportConfig, export_variants
from export.triton_config import check_triton_config
from mlet.encoding import OOV_ID
from mlet.formats import DataFormatError, read_batches
from mlet.raw_rows import (
    FEW_ROWS,
    batch_columns,
    batch_to_inputs,
    few_rows_to_inputs,
    raw_columns,
    raw_to_inputs,
)
from mlet.repository import CONFIG_FILE
from mlet.transform import SMALL, load_transform
from predict.predict import PredictConfig, predict_files
from serve.fuzz import fuzz
from serve.fuzz_raw import RawFuzzer
from serve.process import HOST, free_port, running_server
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


def grpc_request(columns: dict[str, np.ndarray]) -> list:
    inputs = []
    for name, values in columns.items():
        entry = grpcclient.InferInput(name, list(values.shape), np_to_triton_dtype(values.dtype))
        entry.set_data_from_numpy(values)  # BYTES: 4-byte lengths in raw_input_contents
        inputs.append(entry)
    return inputs


RAW_MODELS = ("criteo", "criteo-int8", "criteo-hash", "avazu", "generic")


@pytest.fixture(scope="module")
def triton(exported, tmp_path_factory):
    """Triton's (HTTP address, gRPC address) serving every raw-row model and its steps."""
    if TRITON:
        pytest.skip(f"no Triton here: {TRITON}")
    models = [f"{m}{suffix}" for m in RAW_MODELS for suffix in ("", "-transform", "-raw")]
    log = tmp_path_factory.mktemp("triton-raw") / "triton.log"
    config = TritonConfig(repo=exported, port=free_port(), grpc_port=free_port(), models=models)
    with running_triton(config, log) as server:
        yield server.url.removeprefix("http://"), f"{HOST}:{config.grpc_port}"


@pytest.fixture(scope="module")
def ours(exported):
    """Our server's (HTTP address, gRPC address), serving the whole repository."""
    port = free_port()
    with running_server(exported, [], "--grpc-port", str(port)) as (url, _):
        yield url.removeprefix("http://"), f"{HOST}:{port}"


@pytest.fixture(params=["mlet", "triton"])
def engine(request):
    """(HTTP address, gRPC address) of each engine in turn."""
    return request.getfixturevalue("ours" if request.param == "mlet" else "triton")


def raw_infer(engine, protocol: str, model: str, columns: dict[str, np.ndarray]) -> np.ndarray:
    """`model`'s probabilities for raw columns, over HTTP JSON, HTTP binary or gRPC."""
    http_address, grpc_address = engine
    if protocol == "grpc":
        with grpcclient.InferenceServerClient(grpc_address) as client:
            result = client.infer(model, grpc_request(columns))
    else:
        with httpclient.InferenceServerClient(http_address) as client:
            result = client.infer(model, raw_request(columns, binary=protocol == "binary"))
    return result.as_numpy("probability").reshape(-1)


@pytest.mark.parametrize("model", RAW_MODELS)
@pytest.mark.parametrize("protocol", ["json", "binary", "grpc"])
def test_both_engines_score_raw_rows_as_mlet_predict_does(engine, exported, datasets, model,
                                                          protocol, tmp_path):  # fmt: skip
    raw, _ = datasets[model.removesuffix("-int8")]
    predicted = tmp_path / "predicted.csv"
    predict_files(exported / model, [raw], predicted, PredictConfig())
    expected = pacsv.read_csv(predicted).column("probability").to_numpy()
    transform = load_transform(exported / model)
    fmt, done = transform.fmt.without_label(), 0
    for batch in read_batches(raw, transform.fmt):
        for start in range(0, batch.num_rows, 300):
            part = batch.slice(start, 300)
            probability = raw_infer(engine, protocol, f"{model}-raw", batch_columns(fmt, part))
            np.testing.assert_allclose(probability, expected[done : done + len(part)], atol=1e-6)
            done += len(part)
    assert done == len(expected)


def criteo_columns(exported, datasets, rows: int = 3) -> dict[str, np.ndarray]:
    transform = load_transform(exported / "criteo")
    batch = next(read_batches(datasets["criteo"][0], transform.fmt)).slice(0, rows)
    return {k: v.copy() for k, v in batch_columns(transform.fmt.without_label(), batch).items()}


@pytest.mark.parametrize("protocol", ["binary", "grpc"])
def test_both_engines_answer_a_bad_raw_value_with_the_column_and_row(engine, exported, datasets,
                                                                     protocol):  # fmt: skip
    columns = criteo_columns(exported, datasets)
    columns["C3"][1, 0] = b"zz"
    with pytest.raises(InferenceServerException, match=r"request row:1: column 'C3'"):
        raw_infer(engine, protocol, "criteo-raw", columns)


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


# -- our server: bad raw input is refused naming the input, and the server stays healthy --


def post_infer(address: str, model: str, request: dict, blobs: bytes = b"") -> tuple[int, dict]:
    """POST a hand-made request (header JSON, then binary tensors) to our server."""
    header = json.dumps(request).encode()
    headers = {"Content-Type": "application/octet-stream"}
    if blobs:
        headers["Inference-Header-Content-Length"] = str(len(header))
    post = urllib.request.Request(
        f"http://{address}/v2/models/{model}/infer", header + blobs, headers, method="POST"
    )
    try:
        with urllib.request.urlopen(post, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def json_request(columns: dict[str, np.ndarray]) -> dict:
    """A JSON request of raw columns, as tritonclient writes it (NaN for a missing number)."""
    inputs = []
    for name, values in columns.items():
        if values.dtype == object:
            data = [v.decode() for v in values.ravel()]
            entry = {"name": name, "datatype": "BYTES", "shape": list(values.shape), "data": data}
        else:
            data = [float(v) for v in values.ravel()]
            entry = {"name": name, "datatype": "FP32", "shape": list(values.shape), "data": data}
        inputs.append(entry)
    return {"inputs": inputs}


def length_prefixed(values: list[bytes]) -> bytes:
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


def entry_of(request: dict, name: str) -> dict:
    return next(e for e in request["inputs"] if e["name"] == name)


def ready(address: str) -> bool:
    with urllib.request.urlopen(f"http://{address}/v2/health/ready", timeout=10) as response:
        return response.status == 200


def refused_over_grpc(ours, model: str, inputs: list) -> InferenceServerException:
    with (
        grpcclient.InferenceServerClient(ours[1]) as client,
        pytest.raises(InferenceServerException) as refused,
    ):
        client.infer(model, inputs)
    return refused.value


def test_our_server_refuses_bad_raw_columns_naming_the_input(ours, exported, datasets):
    columns = criteo_columns(exported, datasets)
    cases = {}
    request = json_request({k: v for k, v in columns.items() if k != "C7"})
    cases["missing"] = (request, b"", r"missing input\(s\) \['C7'\]")
    request = json_request(columns)
    entry_of(request, "C2").update(datatype="FP32", data=[1.0, 2.0, 3.0])
    cases["datatype"] = (request, b"", "input 'C2' has datatype FP32, expected BYTES")
    request = json_request(columns)
    entry_of(request, "I4")["data"] = ["12", "a", "3"]
    cases["text for a number"] = (request, b"", "input 'I4': 'data' must hold numbers")
    request = json_request(columns)
    entry_of(request, "C5").update(shape=[2, 1], data=["68fd1e64", "68fd1e64"])
    cases["batch sizes"] = (request, b"", r"inputs disagree on the batch size \(3 and 2\)")
    request = json_request(columns)
    blob = length_prefixed([b"68fd1e64", b"68fd1e64"]) + (90).to_bytes(4, "little") + b"68fd"
    entry_of(request, "C9").pop("data")
    entry_of(request, "C9")["parameters"] = {"binary_data_size": len(blob)}
    cases["length past the body"] = (request, blob, "input 'C9': element 2 says 90 bytes")
    for case, (request, blob, message) in cases.items():
        status, answer = post_infer(ours[0], "criteo-raw", request, blob)
        assert status == 400, case
        assert re.search(message, answer["error"]), (case, answer)

    generic = load_transform(exported / "generic")
    batch = next(read_batches(datasets["generic"][0], generic.fmt)).slice(0, 2)
    text = batch_columns(generic.fmt.without_label(), batch)
    text["user"] = np.array([[b"u1"], [b"\xff\xfe"]], dtype=object)
    error = refused_over_grpc(ours, "generic-raw", grpc_request(text))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "request row:1: column 'user': undecodable bytes (not UTF-8)" in error.message()
    wrong = dict(columns, I1=columns["C1"])  # text where a number belongs
    inputs = grpc_request(wrong)
    error = refused_over_grpc(ours, "criteo-raw", inputs)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'I1' has datatype BYTES, expected FP32" in error.message()
    assert ready(ours[0])


def test_typed_bytes_contents_and_binary_bytes_score_alike_on_our_server(ours, exported,
                                                                       datasets):  # fmt: skip
    columns = criteo_columns(exported, datasets)
    request = service_pb2.ModelInferRequest(model_name="criteo-raw")
    for name, values in columns.items():
        tensor = request.inputs.add(name=name, shape=values.shape)
        if values.dtype == object:
            tensor.datatype = "BYTES"
            tensor.contents.bytes_contents.extend(values.ravel().tolist())
        else:
            tensor.datatype = "FP32"
            tensor.contents.fp32_contents.extend(values.ravel().tolist())
    with grpc.insecure_channel(ours[1]) as channel:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    typed = np.frombuffer(answer.raw_output_contents[0], np.float32)
    np.testing.assert_allclose(typed, raw_infer(ours, "binary", "criteo-raw", columns), atol=1e-7)


def oov_count(address: str, model: str, table: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = rf'mlet_oov_values_total{{model="{model}",table="{table}"}} (\S+)'
    found = re.search(pattern, text)
    return 0.0 if found is None else float(found.group(1))


def test_an_unseen_value_takes_the_oov_row_and_is_counted(ours, exported, datasets):
    columns = criteo_columns(exported, datasets, rows=2)
    columns["C4"][1, 0] = b"f00dfeed"  # hex, never in the training log
    before = oov_count(ours[0], "criteo-transform", "C4")
    probability = raw_infer(ours, "json", "criteo-raw", columns)
    assert oov_count(ours[0], "criteo-transform", "C4") == before + 1
    transform = load_transform(exported / "criteo")
    dense, ids = raw_to_inputs(transform, columns)
    assert ids[1, transform.fmt.categorical.index("C4")] == OOV_ID
    with httpclient.InferenceServerClient(ours[0]) as client:
        inputs = [httpclient.InferInput("dense", list(dense.shape), "FP32"),
                  httpclient.InferInput("sparse", list(ids.shape), "INT64")]  # fmt: skip
        inputs[0].set_data_from_numpy(dense)
        inputs[1].set_data_from_numpy(ids)
        by_ids = client.infer("criteo", inputs).as_numpy("probability").reshape(-1)
    np.testing.assert_allclose(probability, by_ids, atol=1e-7)


def test_our_server_describes_the_ensemble_as_triton_does(ours, triton):
    for address in (ours[1], triton[1]):
        with grpcclient.InferenceServerClient(address) as client:
            metadata = client.get_model_metadata("avazu-raw", as_json=True)
            config = client.get_model_config("avazu-raw", as_json=True)["config"]
        assert metadata["platform"] == "ensemble"
        assert {t["datatype"] for t in metadata["inputs"]} == {"BYTES"}
        steps = [s["model_name"] for s in config["ensemble_scheduling"]["step"]]
        assert steps == ["avazu-transform", "avazu"]
    with urllib.request.urlopen(f"http://{ours[0]}/v2/repository/index", timeout=10) as response:
        index = {m["name"]: m["state"] for m in json.loads(response.read())}
    assert index["avazu-raw"] == index["avazu-transform"] == "READY"


@pytest.mark.parametrize("model", ["criteo", "avazu", "generic"])
def test_fuzzed_raw_rows_get_no_server_error_and_right_numbers(ours, exported, datasets, model):
    raw, _ = datasets[model]
    fuzzer = RawFuzzer(f"http://{ours[0]}", ours[1], exported / model, 10.0, rows_from=raw)
    try:
        report = fuzz(fuzzer, 300, seed=3)
    finally:
        fuzzer.close_channel()
    assert report.failures() == []
    assert report.cases == 300 and report.hangs == 0
    assert report.valid_checked > 30  # rows the transform takes, answered with its numbers
    assert {"OK", "INVALID_ARGUMENT", 200, 400} <= set(report.statuses)
    assert ready(ours[0])


def test_loading_an_ensemble_loads_its_steps(exported, datasets):
    port = free_port()
    options = ("--grpc-port", str(port), "--model-control-mode", "explicit")
    with (
        running_server(exported, ["criteo"], *options),
        grpcclient.InferenceServerClient(f"{HOST}:{port}") as client,
    ):
        assert not client.is_model_ready("avazu-raw")
        client.load_model("avazu-raw")
        assert all(client.is_model_ready(m) for m in ("avazu-raw", "avazu-transform", "avazu"))
        transform = load_transform(exported / "avazu")
        batch = next(read_batches(datasets["avazu"][0], transform.fmt)).slice(0, 4)
        columns = batch_columns(transform.fmt.without_label(), batch)
        answer = client.infer("avazu-raw", grpc_request(columns))
        assert answer.as_numpy("probability").shape == (4, 1)
        client.unload_model("avazu")  # a step gone: the ensemble says so, and stays up
        with pytest.raises(InferenceServerException, match="step model 'avazu' is not loaded"):
            client.infer("avazu-raw", grpc_request(columns))


@pytest.mark.parametrize("name", ["criteo", "criteo-hash"])
def test_a_few_rows_get_the_ids_the_whole_file_gets(datasets, name):
    """Requests of a few rows decode every table's hex values in one call (Transform.
    small_hex_keys); a whole batch decodes column by column: the same ids either way."""
    raw, data = datasets[name]
    transform = load_transform(data)
    batch = next(read_batches(raw, transform.fmt))
    assert batch.num_rows * len(transform.fmt.categorical) > SMALL  # the per-column path
    whole = transform.features(batch, "whole", 0)
    ids = transform.encode(whole.keys)
    for start in range(0, batch.num_rows, 7):
        part = transform.features(batch.slice(start, 7), "part", start)
        np.testing.assert_array_equal(transform.encode(part.keys), ids[start : start + 7])
        np.testing.assert_array_equal(part.dense, whole.dense[start : start + 7])


@pytest.mark.parametrize("name", ["criteo", "criteo-hash", "avazu"])
def test_a_few_rows_value_by_value_get_what_the_batch_path_gets(datasets, name):
    """A request of at most FEW_ROWS rows is transformed one value at a time: the same
    dense values and ids as through the record batch, from bytes or from JSON's str."""
    raw, data = datasets[name]
    transform = load_transform(data)
    fmt = transform.fmt.without_label()
    batch = next(read_batches(raw, transform.fmt))
    assert batch.num_rows >= 4 * FEW_ROWS  # every slice below holds its rows
    for rows in range(1, FEW_ROWS + 1):
        columns = batch_columns(fmt, batch.slice(3 * rows, rows))
        as_text = {k: np.vectorize(bytes.decode, otypes=[object])(v) if v.dtype == object else v
                   for k, v in columns.items()}  # fmt: skip
        for request in (columns, as_text):
            few = few_rows_to_inputs(transform, request)
            assert few is not None
            for got, expected in zip(few, batch_to_inputs(transform, request), strict=True):
                np.testing.assert_array_equal(got, expected)
                assert got.dtype == expected.dtype
    assert few_rows_to_inputs(transform, batch_columns(fmt, batch.slice(0, FEW_ROWS + 1))) is None


def test_multi_hot_rows_take_the_batch_path(datasets):
    raw, data = datasets["generic"]
    transform = load_transform(data)
    batch = next(read_batches(raw, transform.fmt)).slice(0, 1)
    columns = batch_columns(transform.fmt.without_label(), batch)
    assert few_rows_to_inputs(transform, columns) is None


ODD_VALUES = {
    "hex": [b"0x1f", b" 1f", b"+1f", b"1_f", b"1" * 17, b"f" * 16, b"0" * 16 + b"1", b"zz",
            b"\xff", b"ABCDEF12", b"abc", b"0", b"00000000", b"\x00" * 8, b"+1234567"],
    "string": [b"\xff\xfe", "\u00e9".encode(), b" ", b"x" * 40, b"\x00", b"\xed\xa0\x80"],
    "hour": [b" 14102100", b"+14102100", b"14102199", b"14023000", b"1", b"x", b"9" * 20, b""],
    "dense": [np.inf, -np.inf, np.nan, 3.4e38, -0.0, 1e-45, 1e39, "text"],
}  # fmt: skip


@pytest.mark.parametrize("name", ["criteo", "criteo-hash", "avazu"])
def test_an_odd_value_gets_from_a_few_rows_what_the_batch_path_gives(datasets, name):
    """Odd values (lenient hex, undecodable bytes, odd hours, non-finite numbers): what is
    not plain takes the batch path, so a few rows read or refuse it as a file batch does."""
    raw, data = datasets[name]
    transform = load_transform(data)
    fmt = transform.fmt.without_label()
    columns = batch_columns(fmt, next(read_batches(raw, transform.fmt)).slice(0, 2))
    targets = [(fmt.categorical[0], "hex" if fmt.keys == "hex" else "string")]
    targets += [(fmt.dense[0], "dense")] if fmt.dense else []
    targets += [(fmt.hour, "hour")] if fmt.hour else []
    for column, kind in targets:
        for value in ODD_VALUES[kind]:
            # numbers as float64 and as the float32 that the server decodes FP32 into
            dtypes = (
                [object] if kind != "dense" or isinstance(value, str) else [np.float64, np.float32]
            )
            for dtype in dtypes:
                request = dict(columns)
                request[column] = columns[column].astype(dtype)
                with np.errstate(over="ignore"):  # 1e39 is inf in float32
                    request[column][1, 0] = value
                assert outcome(raw_to_inputs, transform, request) == outcome(
                    batch_to_inputs, transform, request
                ), (column, value, dtype)


def outcome(function, transform, columns):
    """What a transform gives, comparable: its arrays as lists, or its refusal."""
    try:
        dense, sparse = function(transform, columns)
    except ValueError as e:  # DataFormatError, or numpy's for text among numbers
        return type(e).__name__, str(e)
    return dense.tolist(), sparse.tolist()


def test_a_transform_step_runs_off_the_event_loop_when_grpc_is_served(exported):
    """gRPC calls arrive only while the event loop is free: with gRPC on, the transform's
    batches go to their own thread; HTTP alone runs them on the loop like small batches."""
    from serve.dataplane import BatchingOverrides, DataPlane, PlaneConfig

    for transform_inline, expected in ((True, 64), (False, 0)):
        batching = BatchingOverrides(transform_inline=transform_inline)
        plane = DataPlane(exported, PlaneConfig(batching=batching))
        plane.load_all(["criteo", "criteo-transform"])
        assert plane.model("criteo-transform").batcher.config.inline_rows == expected
        assert plane.model("criteo").batcher.config.inline_rows == 64
        asyncio.run(plane.close())


def test_a_raw_row_sweep_calls_the_raw_model(exported, tmp_path):
    from dataclasses import replace

    from bench.load.sweep import SweepConfig, request_kinds, run_sweep

    kinds = tuple(replace(kind, users=(1,)) for kind in request_kinds("http", raw=True))
    config = SweepConfig(kinds=kinds, duration=2, repetitions=1, raw=True)
    (summary,) = run_sweep(exported, ["criteo"], config, tmp_path)
    assert summary["called"] == "criteo-raw"
    assert list(summary["curves"]) == ["1-row raw JSON", "64-row raw binary"]
    for (step,) in summary["curves"].values():
        assert step["failures"] == 0 and step["requests_per_s"]["median"] > 0
