"""Property-based fuzzing of the KServe v2 infer endpoint, JSON and binary.

Hypothesis draws requests of three kinds: valid ones (JSON flat or nested, or the binary
extension; some outputs asked for binary), valid ones with one mutation (a field dropped
or of the wrong type, a wrong shape, datatype or size, ids outside their table, NaN,
booleans, a broken binary length), and arbitrary bytes. Each goes to a real server over
loopback; the properties:

- no answer is a 5xx and none takes longer than `hang_s` (a hang);
- a valid request is answered 200 with in-process ONNX Runtime's numbers;
- an invalid one is answered 4xx with a JSON error message.

`run_fuzz` starts a server, sends `cases` requests and reports statuses and the server's
resident memory before and after (`mlet bench fuzz`). Hypothesis is a dev dependency.
"""

from __future__ import annotations

import http.client
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from mlet.infer_request import little_endian_bytes
from mlet.repository import open_model
from mlet.runtime import onnxruntime_runner
from mlet.spec import ExportSpec
from serve.process import running_server
from serve.protocol import HEADER_LENGTH

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@dataclass
class Case:
    """One request: its body, headers, and the inputs when it is valid."""

    body: bytes
    headers: dict[str, str]
    kind: str  # "valid", a mutation's name, or "bytes"
    inputs: dict[str, np.ndarray] | None = None
    binary_outputs: bool = False


def valid_inputs(spec: ExportSpec, draw, max_rows: int) -> dict[str, np.ndarray]:
    rows = draw(st.integers(1, max_rows))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    sparse_spec = spec.sparse_input
    scale = draw(st.sampled_from([1.0, 1e3, 1e6]))
    dense = rng.uniform(-scale, scale, (rows, spec.num_dense)).astype(np.float32)
    bounds = np.asarray(spec.table_rows).reshape(1, -1, *([1] * (len(sparse_spec.shape) - 1)))
    ids = (rng.random((rows, *sparse_spec.shape)) * bounds).astype(np.int64)
    return spec.model_inputs(dense, ids)


def encode(spec: ExportSpec, inputs: dict, binary: bool, nested: bool, binary_out: bool):
    """A request dict, the binary blobs, in spec order."""
    tensors, blobs = [], []
    for tensor in spec.inputs:
        array = np.ascontiguousarray(inputs[tensor.name], dtype=tensor.dtype)
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(array.shape)}
        if binary:
            blob = little_endian_bytes(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.tolist() if nested else array.ravel().tolist()
        tensors.append(entry)
    request: dict = {"inputs": tensors}
    if binary_out:
        request["outputs"] = [
            {"name": t.name, "parameters": {"binary_data": True}} for t in spec.outputs
        ]
    return request, blobs


def assemble(request, blobs: list[bytes], binary: bool) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps(request)
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


MUTATIONS = (
    "drop_field",
    "wrong_type",
    "shape",
    "datatype",
    "id_range",
    "nan",
    "booleans",
    "binary_size",
    "header_length",
    "top_level",
    "outputs",
    "extra_input",
    "surrogate",
)


def mutate(spec: ExportSpec, draw, request: dict, blobs: list[bytes], binary: bool):
    """One mutation of a valid request; returns (name, request, blobs, binary, header_length)."""
    name = draw(st.sampled_from(MUTATIONS))
    index = draw(st.integers(0, len(request["inputs"]) - 1))
    tensor = request["inputs"][index]
    header_length = None
    if name == "drop_field":
        tensor.pop(draw(st.sampled_from(sorted(tensor))))
    elif name == "wrong_type":
        key = draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters"]))
        tensor[key] = draw(JSON_VALUES)
    elif name == "shape":
        tensor["shape"] = draw(st.lists(st.integers(-2, 10_000), max_size=4))
    elif name == "datatype":
        tensor["datatype"] = draw(st.sampled_from(["FP16", "FP64", "INT32", "UINT8", "BYTES", ""]))
    elif name == "id_range":
        request, blobs, binary = out_of_range(spec, draw, request, blobs, binary)
    elif name == "nan" and not binary:
        data = request["inputs"][0]["data"]
        flat = data if not isinstance(data[0], list) else data[0]
        flat[0] = draw(st.sampled_from(["NaN", "Infinity", None, "1"]))
    elif name == "booleans" and not binary:
        request["inputs"][0]["data"] = [True] * math.prod(request["inputs"][0]["shape"])
    elif name == "binary_size" and binary:
        parameters = tensor.setdefault("parameters", {})
        parameters["binary_data_size"] = draw(st.integers(-5, 1 << 20) | JSON_VALUES)
    elif name == "header_length":
        header_length = draw(st.integers(-10, 1 << 20))
    elif name == "top_level":
        request = draw(JSON_VALUES | st.just({"inputs": draw(JSON_VALUES)}))
        blobs, binary = [], False
    elif name == "outputs":
        request["outputs"] = draw(JSON_VALUES)
    elif name == "extra_input":
        request["inputs"].append(dict(tensor))
    elif name == "surrogate":  # a lone surrogate, which JSON's escapes spell and UTF-8 cannot
        text = draw(st.sampled_from(["\ud800", "x\udfff"]))
        if draw(st.booleans()):
            request["id"] = text  # the answer repeats the id
        else:
            tensor["name"] = text
    return name, request, blobs, binary, header_length


def out_of_range(spec: ExportSpec, draw, request: dict, blobs: list[bytes], binary: bool):
    """The sparse input with one id set to -1 or to its table's row count."""
    sparse_name = spec.sparse_input.name
    position = spec.input_names.index(sparse_name)
    tensor = request["inputs"][position]
    shape = tuple(tensor["shape"])
    if binary:
        ids = np.frombuffer(blobs[position], dtype="<i8").reshape(shape).copy()
    else:
        ids = np.asarray(tensor["data"], dtype=np.int64).reshape(shape)
    table = draw(st.integers(0, len(spec.table_rows) - 1))
    ids[(0, table)] = draw(st.sampled_from([-1, spec.table_rows[table], 2**62]))
    if binary:
        blobs = [*blobs]
        blobs[position] = ids.tobytes()
    else:
        tensor["data"] = ids.ravel().tolist()
    return request, blobs, binary


@st.composite
def cases(draw, spec: ExportSpec, max_rows: int = 16) -> Case:
    """A valid request, a mutated one or raw bytes."""
    kind = draw(st.sampled_from(["valid", "valid", "mutated", "mutated", "mutated", "bytes"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=512))
        headers = draw(st.sampled_from([{}, {HEADER_LENGTH: str(draw(st.integers(0, 600)))}]))
        return Case(body, headers, "bytes")
    inputs = valid_inputs(spec, draw, max_rows)
    binary, nested, binary_out = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    request, blobs = encode(spec, inputs, binary, nested, binary_out)
    if kind == "valid":
        body, headers = assemble(request, blobs, binary)
        return Case(body, headers, "valid", inputs, binary_out)
    name, request, blobs, binary, header_length = mutate(spec, draw, request, blobs, binary)
    try:
        body, headers = assemble(request, blobs, binary)
    except TypeError:  # orjson refuses integers beyond 64 bits: send them as text
        body, headers = json.dumps(request).encode(), {"Content-Type": "application/json"}
    if header_length is not None:
        headers[HEADER_LENGTH] = str(header_length)
    return Case(body, headers, name)


# -- sending and checking -----------------------------------------------------------------


@dataclass
class FuzzReport:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    hangs: int = 0
    server_errors: list[str] = field(default_factory=list)  # first few, for the report
    wrong_answers: list[str] = field(default_factory=list)
    valid_checked: int = 0
    max_abs_diff: float = 0.0
    rss_before_mib: float | None = None
    rss_after_mib: float | None = None

    def failures(self) -> list[str]:
        problems = []
        if self.hangs:
            problems.append(f"{self.hangs} request(s) hung")
        problems += [f"5xx: {e}" for e in self.server_errors]
        problems += [f"wrong answer: {e}" for e in self.wrong_answers]
        return problems

    def to_dict(self) -> dict:
        data = asdict(self)
        data["statuses"] = {str(k): v for k, v in sorted_statuses(self.statuses)}
        data["kinds"] = dict(sorted(self.kinds.items()))
        return data


def decode_response(body: bytes, headers) -> dict[str, np.ndarray]:
    """Output name -> array of a JSON or binary response."""
    length = headers.get(HEADER_LENGTH)
    header = orjson.loads(body if length is None else body[: int(length)])
    blobs, offset, outputs = body[int(length or len(body)) :], 0, {}
    for tensor in header["outputs"]:
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is None:
            values = np.asarray(tensor["data"], dtype=np.float32)
        else:
            values = np.frombuffer(blobs[offset : offset + size], dtype="<f4")
            offset += size
        outputs[tensor["name"]] = values.reshape(tensor["shape"])
    return outputs


class Fuzzer:
    """Sends cases to one model of a server and checks each answer."""

    def __init__(self, url: str, model: str, model_path: Path, spec: ExportSpec, hang_s: float):
        host, port = url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.model, self.spec, self.hang_s = model, spec, hang_s
        self.reference = onnxruntime_runner(model_path)
        self.report = FuzzReport()
        self.connection: http.client.HTTPConnection | None = None

    def strategy(self, max_rows: int):
        """The Hypothesis strategy of this fuzzer's cases."""
        return cases(self.spec, max_rows)

    def post(self, case: Case) -> tuple[int, bytes, http.client.HTTPMessage] | None:
        """(status, body, headers), or None when no answer came within hang_s."""
        for attempt in range(2):  # a connection the server closed (after a 4xx) is reopened
            if self.connection is None:
                self.connection = http.client.HTTPConnection(*self.address, timeout=self.hang_s)
            try:
                self.connection.request(
                    "POST", f"/v2/models/{self.model}/infer", case.body, case.headers
                )
                response = self.connection.getresponse()
                body = response.read()
                if response.will_close:
                    self.close()
                return response.status, body, response.headers
            except TimeoutError:
                self.close()
                return None
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        return None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def counted_post(self, case: Case, kind: str):
        """Send a case and count it under `kind`; None (a hang) when no answer came."""
        report = self.report
        report.cases += 1
        report.kinds[kind] += 1
        answer = self.post(case)
        if answer is None:
            report.hangs += 1
            return None
        report.statuses[answer[0]] += 1
        return answer

    def check(self, case: Case) -> None:
        report = self.report
        answer = self.counted_post(case, case.kind)
        if answer is None:
            return
        status, body, headers = answer
        if status >= 500:
            if len(report.server_errors) < 10:
                report.server_errors.append(f"{status} {body[:300]!r} for {case.body[:200]!r}")
            return
        if case.inputs is not None:
            self.check_valid(case, status, body, headers)
        elif status == 200 and case.kind == "bytes":
            report.wrong_answers.append(f"random bytes answered 200: {case.body[:100]!r}")
        elif status != 200 and not orjson.loads(body).get("error"):
            report.wrong_answers.append(f"{status} without an error message")

    def check_valid(self, case: Case, status: int, body: bytes, headers) -> None:
        report = self.report
        if status != 200:
            report.wrong_answers.append(f"valid request answered {status}: {body[:300]!r}")
            return
        got = decode_response(body, headers)[self.spec.output_names[0]]
        expected = self.reference(case.inputs)
        diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
        report.valid_checked += 1
        report.max_abs_diff = max(report.max_abs_diff, diff)
        if not diff <= self.spec.tolerance:
            report.wrong_answers.append(f"differs from ONNX Runtime by {diff:.3g}")


def fuzz(fuzzer: Fuzzer, count: int, seed: int | None = None, max_rows: int = 16) -> FuzzReport:
    """Send `count` cases drawn by Hypothesis to `fuzzer` and return its report."""

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],  # every case is new; shrinking would resend old ones
    )
    @given(fuzzer.strategy(max_rows))
    def send(case: Case) -> None:
        fuzzer.check(case)

    if seed is not None:
        send = hypothesis_seed(seed)(send)
    send()
    fuzzer.close()
    return fuzzer.report


def sorted_statuses(statuses: Counter) -> list[tuple]:
    """HTTP statuses (numbers) and gRPC codes (names), in one order."""
    return sorted(statuses.items(), key=lambda item: (isinstance(item[0], str), str(item[0])))


def server_errors(statuses: Counter) -> int:
    """Answers that say the server failed: HTTP 5xx, gRPC's server-fault codes."""
    faults = ("INTERNAL", "UNKNOWN", "DATA_LOSS")
    return sum(n for k, n in statuses.items() if k in faults or isinstance(k, int) and k >= 500)


def rss_mib(process) -> float:
    return process.memory_info().rss / 2**20


def run_fuzz(repo: Path, model: str, count: int, hang_s: float = 10.0, seed: int = 0):
    """Start a server on `repo`, fuzz `model` with `count` cases, report figures."""
    opened = open_model(Path(repo) / model)
    with running_server(Path(repo), [model]) as (url, process):
        fuzzer = Fuzzer(url, model, opened.model_path, opened.manifest.spec, hang_s)
        fuzz(fuzzer, min(200, count), seed)  # warm-up: sessions, arenas, allocator pools
        fuzzer.report = FuzzReport(rss_before_mib=rss_mib(process))
        started = time.perf_counter()
        report = fuzz(fuzzer, count, seed + 1)
        report.rss_after_mib = rss_mib(process)
        seconds = time.perf_counter() - started
    return report, seconds


def report_lines(report: FuzzReport, seconds: float) -> list[str]:
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted_statuses(report.statuses))
    return [
        f"cases: {report.cases} in {seconds:.0f} s ({report.valid_checked} valid, checked "
        f"against in-process ONNX Runtime, max abs diff {report.max_abs_diff:.2e})",
        f"statuses: {statuses}",
        f"hangs: {report.hangs}; 5xx, INTERNAL or UNKNOWN: {server_errors(report.statuses)}",
        f"server RSS: {report.rss_before_mib:.1f} MiB before, {report.rss_after_mib:.1f} MiB after",
        "kinds: " + ", ".join(f"{k} {v}" for k, v in report.kinds.items()),
    ]
