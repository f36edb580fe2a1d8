"""Fuzzing the raw-row surface: BYTES tensors over HTTP (JSON, binary) and gRPC.

serve.fuzz draws requests for a model's ids; this draws them for its raw-row model
`<model>-raw`, whose inputs are logged columns. Hypothesis draws:

- rows of logged values: values from a logged file (`rows_from`), made-up text or hex,
  bytes that are not UTF-8, numbers, NaN and infinities, sent as JSON, binary or gRPC
  (raw_input_contents or typed contents). Each row's expected answer comes from the
  model's own Transform and in-process ONNX Runtime: a probability where the transform
  takes the row, a refusal (400, INVALID_ARGUMENT) where it does not;
- the same requests with one structural fault: a column dropped or added, a wrong
  datatype, a batch size that differs across columns, a length prefix running past the
  body, numbers where strings belong; each must be refused;
- arbitrary bytes as a protobuf message.

The properties are serve.fuzz's: no 5xx, no INTERNAL or UNKNOWN, no hang, right numbers.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import orjson
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from mlet.formats import DataFormatError, read_batches
from mlet.infer_request import InputTensor, tensor_bytes
from mlet.raw_rows import RAW_SUFFIX, RawColumn, batch_columns, raw_columns, raw_to_inputs
from mlet.repository import open_model
from mlet.transform import load_transform
from serve.fuzz import Case, Fuzzer, FuzzReport, decode_response, fuzz, rss_mib
from serve.process import HOST, free_port, running_server
from serve.protocol import HEADER_LENGTH

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
# Codes that say the server failed rather than refused: none may answer a fuzzed request.
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
FAULTS = ("drop_column", "extra_column", "datatype", "batch_size", "length_prefix", "numbers",
          "surrogate")  # fmt: skip
HEX = "0123456789abcdef"


@dataclass
class RawCase(Case):
    protocol: str = "http"  # or "grpc": `body` is then the serialized ModelInferRequest
    columns: dict[str, np.ndarray] | None = None  # a request without structural faults


def logged_values(folder: Path, rows_from: Path | None, limit: int = 2000) -> dict[str, list]:
    """Per column, values of up to `limit` logged rows (none without a file)."""
    if rows_from is None:
        return {}
    fmt = load_transform(folder).fmt
    batch = next(read_batches(Path(rows_from), fmt)).slice(0, limit)
    columns = batch_columns(fmt.without_label(), batch)
    return {name: values.ravel().tolist() for name, values in columns.items()}


def value_strategy(column: RawColumn, logged: list, text_only: bool, noisy: bool):
    """One value of `column`: logged, or (noisy) made up, malformed or unseen."""
    if logged and not noisy:
        return st.sampled_from(logged)
    if column.datatype == "FP32":
        made_up = st.floats(width=32) | st.integers(-(2**31), 2**31).map(float)
    else:
        made_up = st.text(HEX, max_size=9) | st.text(max_size=6)
        made_up = made_up.map(str.encode)
        if not text_only:  # JSON carries text only
            made_up = made_up | st.binary(max_size=6)
    return (st.sampled_from(logged) | made_up) if logged else made_up


@st.composite
def raw_columns_of(draw, columns: list[RawColumn], logged: dict, rows: int, text_only: bool):
    """Rows of logged values; in half the requests some values are made up."""
    noisy = draw(st.booleans())
    drawn = {}
    for column in columns:
        strategy = value_strategy(column, logged.get(column.name, []), text_only, noisy)
        values = [draw(strategy) for _ in range(rows)]
        if column.datatype == "FP32":
            drawn[column.name] = np.asarray(values, np.float32).reshape(rows, 1)
        else:
            array = np.empty(rows, dtype=object)
            array[:] = values
            drawn[column.name] = array.reshape(rows, 1)
    return drawn


def wire_bytes(name: str, array: np.ndarray) -> bytes:
    """A column as binary HTTP and gRPC raw inputs carry it."""
    datatype = "BYTES" if array.dtype == object else "FP32"
    return tensor_bytes(InputTensor(name, datatype, array))


def http_body(columns: dict[str, np.ndarray], binary: bool, fault: str | None, draw):
    """A KServe v2 HTTP body of the columns, with `fault` applied."""
    entries, blobs = [], []
    for name, array in columns.items():
        datatype = "BYTES" if array.dtype == object else "FP32"
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = wire_bytes(name, array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [v.decode() for v in array.ravel()]
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    entries, blobs = with_fault(entries, blobs, fault, binary, draw)
    # json writes NaN and Infinity as tritonclient does (orjson would write null)
    header = json.dumps({"inputs": entries}).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return header + b"".join(blobs), headers


def with_fault(entries: list[dict], blobs: list[bytes], fault: str | None, binary: bool, draw):
    """The request's tensors with one structural fault (none for fault None)."""
    if fault is None:
        return entries, blobs
    index = draw(st.integers(0, len(entries) - 1))
    entry = entries[index]
    if fault == "drop_column":
        entries = entries[:index] + entries[index + 1 :]
        blobs = blobs[:index] + blobs[index + 1 :] if binary else blobs
    elif fault == "extra_column":
        entries = [*entries, {**entry, "name": entry["name"] + "_x"}]
        blobs = [*blobs, blobs[index]] if binary else blobs
    elif fault == "datatype":
        other = {"BYTES": ["FP32", "INT64"], "FP32": ["BYTES", "INT32"]}[entry["datatype"]]
        entry["datatype"] = draw(st.sampled_from(other))
        if not binary:
            values = ["1"] if entry["datatype"] == "BYTES" else [0]
            entry["data"] = values * math.prod(entry["shape"])
    elif fault == "batch_size" and len(entries) > 1:
        entry["shape"] = [entry["shape"][0] + 1, 1]  # its data no longer fits either
    elif fault == "length_prefix" and binary and entry["datatype"] == "BYTES":
        blob = bytearray(blobs[index])
        blob[0:4] = (len(blob) + draw(st.integers(1, 1 << 20))).to_bytes(4, "little")
        blobs = [*blobs[:index], bytes(blob), *blobs[index + 1 :]]
    elif fault == "numbers" and entry["datatype"] == "BYTES":
        entry.pop("parameters", None)
        if binary:
            blobs = blobs[:index] + blobs[index + 1 :]
        entry["data"] = list(range(math.prod(entry["shape"])))
    elif fault == "surrogate" and not binary and entry["datatype"] == "BYTES":
        # JSON's escapes spell a lone surrogate, a str that has no UTF-8
        entry["data"] = [draw(st.sampled_from(["\ud800", "a\udfff"])), *entry["data"][1:]]
    else:  # the fault does not apply to this tensor: drop it instead
        return with_fault(entries, blobs, "drop_column", binary, draw)
    return entries, blobs


def grpc_message(model: str, columns: dict[str, np.ndarray], raw: bool, fault: str | None, draw):
    """A serialized ModelInferRequest of the columns, with `fault` applied."""
    message = pb.ModelInferRequest(model_name=model)
    for name, array in columns.items():
        datatype = "BYTES" if array.dtype == object else "FP32"
        tensor = message.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            message.raw_input_contents.append(wire_bytes(name, array))
        elif datatype == "BYTES":
            tensor.contents.bytes_contents.extend(array.ravel().tolist())
        else:
            tensor.contents.fp32_contents.extend(array.ravel().tolist())
    if fault is not None:
        grpc_fault(message, raw, fault, draw)
    return message.SerializeToString()


def grpc_fault(message: pb.ModelInferRequest, raw: bool, fault: str, draw) -> None:
    index = draw(st.integers(0, len(message.inputs) - 1))
    tensor = message.inputs[index]
    if fault == "drop_column":
        del message.inputs[index]
        if raw:
            del message.raw_input_contents[index]
    elif fault == "extra_column":
        message.inputs.add().CopyFrom(tensor)
        message.inputs[-1].name = tensor.name + "_x"
        if raw:
            message.raw_input_contents.append(message.raw_input_contents[index])
    elif fault == "datatype":
        tensor.datatype = "FP32" if tensor.datatype == "BYTES" else "BYTES"
    elif fault == "batch_size":
        tensor.shape[0] += 1
    elif fault == "length_prefix" and raw and tensor.datatype == "BYTES":
        blob = bytearray(message.raw_input_contents[index])
        blob[0:4] = (len(blob) + draw(st.integers(1, 1 << 20))).to_bytes(4, "little")
        message.raw_input_contents[index] = bytes(blob)
    else:  # numbers where strings belong, or a fault that does not apply: a shape fault
        tensor.shape.append(2)


class RawFuzzer(Fuzzer):
    """Sends raw-row cases to `<model>-raw` over HTTP and gRPC and checks each answer."""

    def __init__(
        self,
        url: str,
        grpc_address: str,
        model_folder: Path,
        hang_s: float,
        rows_from: Path | None = None,
    ) -> None:
        opened = open_model(model_folder)
        super().__init__(url, f"{model_folder.name}-raw", opened.model_path, opened.manifest.spec,
                         hang_s)  # fmt: skip
        self.transform = load_transform(model_folder)
        self.columns = raw_columns(self.transform.fmt.without_label())
        self.logged = logged_values(model_folder, rows_from)
        self.channel = grpc.insecure_channel(grpc_address)
        self.infer_call = self.channel.unary_unary(MODEL_INFER)  # bytes in, bytes out

    def strategy(self, max_rows: int):
        return raw_cases(self, max_rows)

    def expected(self, columns: dict[str, np.ndarray]) -> np.ndarray | None:
        """What the model answers for these rows; None where the transform refuses them."""
        try:
            dense, ids = raw_to_inputs(self.transform, columns)
        except DataFormatError:
            return None
        return self.reference(self.spec.model_inputs(dense, ids))

    def check(self, case: RawCase) -> None:
        if case.protocol == "grpc":
            self.check_grpc(case)
            return
        answer = self.counted_post(case, f"http {case.kind}")
        if answer is None:
            return
        status, body, headers = answer
        if status >= 500:
            self.server_error(f"{status} {body[:300]!r}", case)
        elif case.columns is not None:
            got = decode_response(body, headers) if status == 200 else None
            self.compare(case, got and got["probability"], orjson.loads(body).get("error"))
        elif status == 200:
            self.report.wrong_answers.append(f"a faulty request ({case.kind}) answered 200")

    def check_grpc(self, case: RawCase) -> None:
        report = self.report
        report.cases += 1
        report.kinds[f"grpc {case.kind}"] += 1
        try:
            answer = self.infer_call(case.body, timeout=self.hang_s)
        except grpc.RpcError as e:
            code = e.code()
            report.statuses[code.name] += 1
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                report.hangs += 1
            elif code in SERVER_FAULTS:
                self.server_error(f"{code.name} {e.details()[:300]!r}", case)
            elif case.columns is not None:
                self.compare(case, None, e.details())
            return
        report.statuses["OK"] += 1
        if case.columns is None:
            report.wrong_answers.append(f"a faulty message ({case.kind}) answered OK")
            return
        response = pb.ModelInferResponse.FromString(answer)
        self.compare(case, np.frombuffer(response.raw_output_contents[0], "<f4"), None)

    def compare(self, case: RawCase, got: np.ndarray | None, error: str | None) -> None:
        """A well-formed request: the model's numbers, or a refusal naming the fault."""
        expected, report = self.expected(case.columns), self.report
        if expected is None:
            if got is not None:
                report.wrong_answers.append(
                    f"rows the transform refuses were answered ({case.kind})"
                )
            elif not error:
                report.wrong_answers.append("a refusal without a message")
            return
        if got is None:
            report.wrong_answers.append(f"rows the transform takes were refused: {error}")
            return
        diff = float(np.max(np.abs(np.asarray(got, np.float64).ravel() - expected.ravel())))
        report.valid_checked += 1
        report.max_abs_diff = max(report.max_abs_diff, diff)
        if not diff <= self.spec.tolerance:
            report.wrong_answers.append(f"differs from in-process ONNX Runtime by {diff:.3g}")

    def server_error(self, what: str, case: RawCase) -> None:
        if len(self.report.server_errors) < 10:
            self.report.server_errors.append(f"{what} for a {case.protocol} {case.kind} case")

    def close_channel(self) -> None:
        self.close()
        self.channel.close()


@st.composite
def raw_cases(draw, fuzzer: RawFuzzer, max_rows: int = 8) -> RawCase:
    """A well-formed raw-row request, one with a structural fault, or a random message."""
    protocol = draw(st.sampled_from(["http", "grpc"]))
    kind = draw(st.sampled_from(["rows", "rows", "fault", "fault", "bytes"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=256))
        if protocol == "grpc":
            return RawCase(body, {}, "bytes", protocol=protocol)
        return RawCase(body, {"Content-Type": "application/json"}, "bytes", protocol=protocol)
    binary = draw(st.booleans())  # HTTP: the binary extension; gRPC: raw_input_contents
    text_only = protocol == "http" and not binary
    rows = draw(st.integers(1, max_rows))
    columns = draw(raw_columns_of(fuzzer.columns, fuzzer.logged, rows, text_only))
    fault = draw(st.sampled_from(FAULTS)) if kind == "fault" else None
    label = fault or ("binary" if binary else "json" if protocol == "http" else "typed")
    well_formed = None if fault else columns
    if protocol == "grpc":
        body = grpc_message(fuzzer.model, columns, binary, fault, draw)
        return RawCase(body, {}, label, protocol=protocol, columns=well_formed)
    body, headers = http_body(columns, binary, fault, draw)
    return RawCase(body, headers, label, protocol=protocol, columns=well_formed)


def run_raw_fuzz(
    repo: Path, model: str, count: int, hang_s: float = 10.0, seed: int = 0, rows_from=None
) -> tuple[FuzzReport, float]:
    """Start a server with gRPC on `repo`, fuzz `model` (a `<name>-raw`), report figures."""
    name = model.removesuffix(RAW_SUFFIX)
    port = free_port()
    with running_server(Path(repo), [model], "--grpc-port", str(port)) as (url, process):
        fuzzer = RawFuzzer(url, f"{HOST}:{port}", Path(repo) / name, hang_s, rows_from)
        try:
            fuzz(fuzzer, min(200, count), seed)  # warm-up: sessions, arenas, allocator pools
            fuzzer.report = FuzzReport(rss_before_mib=rss_mib(process))
            started = time.perf_counter()
            report = fuzz(fuzzer, count, seed + 1)
            report.rss_after_mib = rss_mib(process)
            seconds = time.perf_counter() - started
        finally:
            fuzzer.close_channel()
    return report, seconds
