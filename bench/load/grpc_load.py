"""gRPC loads: h2load posting one ModelInfer frame, its figures, and the answer check
around each load.

h2load (nghttp2's HTTP/2 load generator, compiled, event-driven; `make test` installs
Debian's nghttp2-client) speaks gRPC's HTTP/2 without knowing gRPC: it posts one fixed body,
the gRPC frame of a serialized ModelInferRequest, to /inference.GRPCInferenceService/
ModelInfer with `content-type: application/grpc` and `te: trailers`, and logs each
request's start, HTTP status and duration. It sees the HTTP status only, not grpc-status (a
refused call is an HTTP 200 with an error in its trailers), so every load is framed by
`check_answers`: the same request sent through grpcio before and after, its answer compared
with ONNX Runtime in this process on the same inputs.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlet.infer_request import (
    GRPC_INFER_PATH,
    InputTensor,
    grpc_frame,
    grpc_infer,
    grpc_output,
    grpc_request,
    grpc_stub,
)
from mlet.raw_rows import raw_to_inputs
from mlet.repository import open_model
from mlet.runtime import SessionOptions, onnxruntime_session
from mlet.transform import load_transform
from mlet.variants import ONNX_PLATFORM

CHECK_TIMEOUT_S = 30.0
PROBABILITY = "probability"


def h2load_missing_reason() -> str | None:
    if shutil.which("h2load") is None:
        return (
            "h2load is not installed (Debian: apt-get install nghttp2-client; "
            "`make test` does it as root)"
        )
    return None


def h2load_command(address: str, body: Path, log: Path, connections: int, seconds: float):
    return [
        "h2load", "-D", str(max(1, round(seconds))), "-c", str(connections),
        "-t", str(min(2, connections)), "-m", "1", "-d", str(body),
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        f"--log-file={log}", f"http://{address}{GRPC_INFER_PATH}",
    ]  # fmt: skip


def run_h2load(address: str, request, connections: int, seconds: float) -> dict:
    """h2load posting one ModelInferRequest over `connections` for `seconds`; figures from
    its per-request log."""
    with tempfile.TemporaryDirectory(prefix="mlet-h2load-") as folder:
        body, log = Path(folder) / "body.bin", Path(folder) / "log.tsv"
        body.write_bytes(grpc_frame(request.SerializeToString()))
        command = h2load_command(address, body, log, connections, seconds)
        result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
        text = log.read_text() if log.is_file() else ""
    if result.returncode != 0 or not text.strip():
        output = (result.stderr or result.stdout)[-1000:]
        raise RuntimeError(f"h2load failed (exit {result.returncode}): {output}")
    return log_figures(text)


def log_figures(text: str) -> dict:
    """Counts, rate and latency percentiles (ms) from h2load's log: per request its start
    (µs since the epoch), HTTP status (-1: the stream failed) and µs to the end."""
    rows = np.array([line.split("\t")[:3] for line in text.splitlines() if line], np.int64)
    starts, status, durations = rows[:, 0], rows[:, 1], rows[:, 2]
    done = durations[status == 200] / 1000
    if done.size == 0:
        raise RuntimeError(f"no request of the h2load run succeeded (statuses {set(status)})")
    seconds = ((starts + durations).max() - starts.min()) / 1e6
    p50, p99, p999 = np.percentile(done, [50, 99, 99.9])
    return {
        "requests": int(done.size),
        "failures": int((status != 200).sum()),
        "requests_per_s": done.size / seconds,
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "p999_ms": float(p999),
        "mean_ms": float(done.mean()),
        "max_ms": float(done.max()),
    }


# -- the answer check ----------------------------------------------------------------------


@dataclass
class CheckedRequest:
    """A request of a load and the probabilities it must get back."""

    request: object  # a ModelInferRequest
    expected: np.ndarray | None  # [B, 1]; None where the model does not run here (TensorRT)
    tolerance: float


def checked_request(folder: Path, raw: bool, model: str, tensors: list[InputTensor]):
    """The request a load sends, with what ONNX Runtime in this process answers: on the
    model's own inputs, or (raw) on the model's own Transform of the columns."""
    opened = open_model(folder)
    spec = opened.manifest.spec
    arrays = {t.name: t.array for t in tensors}
    if raw:
        dense, sparse = raw_to_inputs(load_transform(folder), arrays, spec.sparse_input.dtype)
        arrays = spec.model_inputs(dense, sparse)
    expected = None
    if opened.manifest.platform == ONNX_PLATFORM:
        session = onnxruntime_session(opened.model_path, SessionOptions(intra_op_threads=1))
        expected = session.run([PROBABILITY], arrays)[0]
    return CheckedRequest(grpc_request(model, tensors), expected, spec.tolerance)


def check_answers(address: str, checked: list[CheckedRequest]) -> float:
    """Send each request once through grpcio; raise unless every answer is a probability
    per row equal to the expected one. Returns the largest difference found."""
    worst = 0.0
    with grpc_stub(address) as stub:
        for item in checked:
            model = item.request.model_name
            answer = grpc_output(grpc_infer(stub, item.request, CHECK_TIMEOUT_S), PROBABILITY)
            rows = item.request.inputs[0].shape[0]
            if answer.shape != (rows, 1) or not ((answer >= 0) & (answer <= 1)).all():
                raise RuntimeError(f"model {model!r} answered {answer.shape} {answer.ravel()[:4]}")
            if item.expected is None:
                continue
            difference = float(np.abs(answer - item.expected).max())
            if difference > item.tolerance:
                raise RuntimeError(
                    f"model {model!r} over gRPC differs from ONNX Runtime in this process by "
                    f"{difference:.2e} (tolerance {item.tolerance:g})"
                )
            worst = max(worst, difference)
    return worst
