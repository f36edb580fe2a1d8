"""Load tests over gRPC and on raw rows: h2load's figures, the answer check around every
gRPC load, Locust's gRPC user, `mlet bench engines --protocol grpc --raw` on both engines,
and raw request values that every transform accepts. Loads are short and go to 127.0.0.1.
"""

from __future__ import annotations

import csv

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.inprocess.data_bench import generate_criteo
from bench.load.engines import EnginesConfig, run_engines
from bench.load.grpc_load import (
    check_answers,
    checked_request,
    h2load_missing_reason,
    log_figures,
)
from bench.load.load_test import LoadConfig, run_load
from bench.load.request_bodies import RawRequestFactory, RequestFactory
from bench.load.servers import Engine, running_engine
from data.engine import ConvertConfig, convert
from data.formats import avazu_format, criteo_format, csv_format
from mlet.encoding import OOV_ID
from mlet.infer_request import http_body
from mlet.raw_rows import raw_to_inputs
from mlet.repository import open_model
from mlet.transform import load_transform
from serve.process import free_port
from serve.triton_engine import unavailable_reason
from tests.test_data_engine import AVAZU_HEADER, GENERIC, avazu_rows
from tests.test_predict_grpc import criteo_raw_repo

TRITON = unavailable_reason()
H2LOAD = h2load_missing_reason()
QUIET = {"progress": False}
BOTH = ("mlet",) if TRITON else ("mlet", "triton")


@pytest.fixture(scope="module")
def criteo_repo(tmp_path_factory):
    return criteo_raw_repo(tmp_path_factory.mktemp("bench-raw"))[1]


# -- raw request values --------------------------------------------------------------------


def transforms(root):
    """Transforms of every source format and encoding, from small converted files."""
    criteo, avazu, log = root / "day.tsv", root / "train.csv", root / "log.parquet"
    generate_criteo(criteo, 600, seed=2)
    avazu.write_text(AVAZU_HEADER + "".join(avazu_rows(200)))
    pq.write_table(pa.table(GENERIC), log)
    multi_hot = csv_format(log, "liked", ["age"], ["user", "genres"], multi_hot={"genres": "|"})
    sources = {
        "criteo": (criteo, criteo_format(), ConvertConfig(min_count=2, **QUIET)),
        "criteo-hash": (criteo, criteo_format(),
                        ConvertConfig(encoding="hash", hash_size=300, **QUIET)),
        "avazu": (avazu, avazu_format(AVAZU_HEADER.strip().split(",")), ConvertConfig(**QUIET)),
        "multi-hot": (log, multi_hot, ConvertConfig(hotness=2, **QUIET)),
    }  # fmt: skip
    for name, (path, fmt, config) in sources.items():
        convert(path, fmt, root / name, config)
    return {name: load_transform(root / name) for name in sources}


def test_raw_request_values_are_accepted_by_every_transform(tmp_path):
    for name, transform in transforms(tmp_path).items():
        factory = RawRequestFactory(transform, seed=4)
        columns = factory.columns(64)
        assert all(values.shape == (64, 1) for values in columns.values()), name
        dense, sparse = raw_to_inputs(transform, columns)  # raises on a value it refuses
        assert sparse.shape[:2] == (64, len(transform.tables)) and np.isfinite(dense).all()
        assert (
            sparse < np.array(transform.table_sizes).reshape(1, -1, *[1] * (sparse.ndim - 2))
        ).all()
        http_body(factory.tensors(4), binary=False)  # JSON carries them: UTF-8 text
        if name == "criteo":  # hexadecimal keys are read back from the vocabularies
            assert (sparse[:, 0] != OOV_ID).mean() > 0.9


# -- h2load's log and the answer check ----------------------------------------------------


def test_h2load_log_figures():
    rows = [(1_000_000 + 1000 * i, 200, 1000 + 10 * i) for i in range(100)]
    rows += [(1_050_000, -1, 5), (1_060_000, 200, 900)]
    figures = log_figures("".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    assert figures["requests"] == 101 and figures["failures"] == 1
    assert figures["p50_ms"] == pytest.approx(np.percentile([1 + i / 100 for i in range(100)]
                                                            + [0.9], 50))  # fmt: skip
    assert figures["max_ms"] == pytest.approx(1.99)
    assert figures["requests_per_s"] == pytest.approx(101 / ((1_099_000 + 1990 - 1_000_000) / 1e6))
    with pytest.raises(RuntimeError, match="no request of the h2load run succeeded"):
        log_figures("1\t-1\t5\n")


def test_a_grpc_load_is_checked_against_onnx_runtime(tiny_repo):
    folder = tiny_repo / "mlet"
    port = free_port()
    with running_engine(Engine(), tiny_repo, ["mlet"], grpc_port=port) as (_, _):
        address = Engine().grpc_address(port)
        tensors = RequestFactory(open_model(folder).manifest.spec, seed=2).tensors(3)
        good = checked_request(folder, False, "mlet", tensors)
        assert check_answers(address, [good]) <= good.tolerance
        wrong = checked_request(folder, False, "mlet", tensors)
        wrong.expected = wrong.expected + 0.5
        with pytest.raises(RuntimeError, match="'mlet' over gRPC differs from ONNX Runtime"):
            check_answers(address, [wrong])
        with pytest.raises(RuntimeError, match="model 'nope': gRPC NOT_FOUND"):
            check_answers(address, [checked_request(folder, False, "nope", tensors)])


def test_grpc_needs_an_endpoint_and_a_generator_that_speaks_it(tiny_repo, tmp_path):
    with pytest.raises(ValueError, match="give its --grpc-url too"):
        Engine(name="url", url="http://127.0.0.1:1").grpc_address(None)
    assert Engine(name="url", url="u", grpc_url="h:1").grpc_address(None) == "h:1"
    with pytest.raises(ValueError, match="wrk does not load grpc: use h2load or locust"):
        EnginesConfig(protocol="grpc", generator="wrk")
    with pytest.raises(ValueError, match="h2load does not load http: use wrk or locust"):
        EnginesConfig(generator="h2load")
    with pytest.raises(FileNotFoundError, match="no raw-row model beside"):
        run_engines(tiny_repo, "mlet", EnginesConfig(raw=True), tmp_path)  # before any start


# -- the loads ----------------------------------------------------------------------------


@pytest.mark.skipif(H2LOAD is not None, reason=f"{H2LOAD}")
def test_bench_engines_over_grpc(tiny_repo, tmp_path):
    config = EnginesConfig(engines=BOTH, duration=2, connections=2, pool=4, rounds=1,
                           protocol="grpc")  # fmt: skip
    summary = run_engines(tiny_repo, "mlet", config, tmp_path)
    results = summary["results"]
    assert [(r["engine"], r["rows_per_request"], r["encoding"]) for r in results] == [
        *((e, 1, "gRPC") for e in (*BOTH, "mlet, batching off")),
        *((e, 256, "gRPC") for e in BOTH),
    ]
    for r in results:
        assert r["requests"] > 0 and r["failures"] == 0, r
        assert r["generator"] == "h2load" and r["protocol"] == "grpc"
        assert r["answers_checked"] == 2 and r["answer_max_diff"] <= 1e-4
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"] <= r["max_ms"]
        assert r["client_cpu_cores"] > 0 and r["server_cpu_cores"] > 0
    table = (tmp_path / "engines.md").read_text()
    assert "Engines on mlet over gRPC" in table and "| mlet | 256-row gRPC |" in table
    assert "gRPC answers checked: a request of each load" in table
    assert "1-row gRPC requests/s, ours / Triton (goal >= 1)" in table
    floor = summary["grpc_floor"]  # grpc.aio with nothing to do, under the same load
    assert floor["requests"] > 0 and floor["failures"] == 0 and floor["cpu_ms_per_call"] > 0
    assert "grpc.aio alone (bench/load/grpc_floor.py" in table
    if TRITON:
        pytest.skip(f"Triton half not run: {TRITON}")
    assert summary["goals"]["rows_ours_over_triton_batched"] is not None


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bench_engines_raw_rows_against_ids(criteo_repo, protocol, tmp_path):
    config = EnginesConfig(engines=BOTH, duration=2, connections=2, pool=4, rounds=1,
                           loads=((1, False),), batching_off=False, protocol=protocol,
                           raw=True)  # fmt: skip
    summary = run_engines(criteo_repo, "criteo", config, tmp_path)
    kind = "gRPC" if protocol == "grpc" else "JSON"
    assert [(r["engine"], r["encoding"], r["raw"]) for r in summary["results"]] == [
        *((e, kind, False) for e in BOTH), *((e, f"raw {kind}", True) for e in BOTH)
    ]  # fmt: skip
    for r in summary["results"]:
        assert r["requests"] > 0 and r["failures"] == 0, r
    goals, table = summary["goals"], (tmp_path / "engines.md").read_text()
    raw = next(r for r in summary["results"] if r["engine"] == "mlet" and r["raw"])
    ids = next(r for r in summary["results"] if r["engine"] == "mlet" and not r["raw"])
    assert goals["p99_raw_over_id_1row_mlet"] == pytest.approx(raw["p99_ms"] / ids["p99_ms"])
    assert f"| mlet | 1-row raw {kind} |" in table and "Raw loads: 1-row requests" in table
    assert f"1-row {kind} p99, raw rows / ids, ours (goal <= 1.5)" in table
    if TRITON:
        pytest.skip(f"Triton half not run: {TRITON}")
    assert goals["p99_raw_over_id_1row_triton"] is not None


@pytest.mark.parametrize("raw", [False, True], ids=["ids", "raw"])
def test_locust_grpc_user(tiny_repo, criteo_repo, raw, tmp_path):
    repo, model = (criteo_repo, "criteo") if raw else (tiny_repo, "mlet")
    config = LoadConfig(users=2, duration=2, protocol="grpc", raw=raw)
    (summary,) = run_load(repo, [model], config, tmp_path)
    called = f"{model}-raw" if raw else model
    assert summary["model"] == called and summary["failures"] == 0 and summary["requests"] > 0
    with open(tmp_path / f"locust-{called}_stats.csv") as f:
        (row, _) = list(csv.DictReader(f))
    assert row["Type"] == "grpc" and row["Name"] == f"infer {called}"
    assert "gRPC (" in (tmp_path / "summary.md").read_text()
