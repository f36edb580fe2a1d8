"""`mlet bench int4-gather`: two ways to gather 4-bit rows in ONNX Runtime, timed.

1. Ours (what export writes): Gather the packed bytes, unpack the nibbles with the
   standard BitwiseAnd and BitShift, then scale and offset each row in float32.
2. `com.microsoft` GatherBlockQuantized: one contrib node gathers and dequantizes, with a
   float16 scale and a 4-bit zero point per block of `dim` values (here, one per row).
   Its block size must be a power of two of at least 16, so it cannot serve D < 16 rows.

Both read a table of `rows` x `dim` codes and gather `batch` random ids, in turns, in
this process with one ONNX Runtime session each; the median of `rounds` is reported.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mlet.files import write_json


@dataclass
class Int4GatherConfig:
    rows: int = 10_131_227  # Criteo Kaggle's largest table
    dim: int = 16
    batch: int = 256 * 26  # a 256-row request's ids of 26 tables
    calls: int = 200  # per round
    rounds: int = 5
    seed: int = 0


def table(config: Int4GatherConfig):
    rng = np.random.default_rng(config.seed)
    codes = rng.integers(0, 256, size=(config.rows, config.dim // 2), dtype=np.uint8)
    scale = rng.random((config.rows, 1), dtype=np.float32).astype(np.float16)
    offset = (-8 * scale.astype(np.float32)).astype(np.float16)  # zero point 8 in both graphs
    return codes, scale, offset


def model(nodes, initializers, dim: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "gather",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["B", dim])],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def unpacking_model(codes, scale, offset, dim: int) -> onnx.ModelProto:
    """What export writes for int4 rows (export/graph.py unpack_int4 and the affine step)."""
    node = helper.make_node
    nodes = [
        node("Gather", ["codes", "ids"], ["packed"]),
        node("BitwiseAnd", ["packed", "low_nibble"], ["low"]),
        node("BitShift", ["packed", "nibble_bits"], ["high"], direction="RIGHT"),
        node("Unsqueeze", ["low", "last"], ["low1"]),
        node("Unsqueeze", ["high", "last"], ["high1"]),
        node("Concat", ["low1", "high1"], ["pairs"], axis=-1),
        node("Reshape", ["pairs", "row_shape"], ["nibbles"]),
        node("Cast", ["nibbles"], ["values"], to=TensorProto.FLOAT),
        node("Gather", ["scale", "ids"], ["scale_rows16"]),
        node("Gather", ["offset", "ids"], ["offset_rows16"]),
        node("Cast", ["scale_rows16"], ["scale_rows"], to=TensorProto.FLOAT),
        node("Cast", ["offset_rows16"], ["offset_rows"], to=TensorProto.FLOAT),
        node("Mul", ["values", "scale_rows"], ["scaled"]),
        node("Add", ["scaled", "offset_rows"], ["rows"]),
    ]
    constants = {
        "codes": codes, "scale": scale, "offset": offset, "low_nibble": np.uint8(15),
        "nibble_bits": np.uint8(4), "last": np.array([-1], np.int64),
        "row_shape": np.array([0, -1], np.int64),
    }  # fmt: skip
    return model(nodes, constants, dim)


def block_quantized_model(codes, scale, dim: int) -> onnx.ModelProto:
    zero_points = np.full((len(codes), 1), 0x88, np.uint8)  # 8, packed two to a byte
    nodes = [
        helper.make_node("GatherBlockQuantized", ["codes", "ids", "scale", "zero_points"],
                         ["rows16"], domain="com.microsoft", block_size=dim, bits=4,
                         gather_axis=0, quantize_axis=1),
        helper.make_node("Cast", ["rows16"], ["rows"], to=TensorProto.FLOAT),
    ]  # fmt: skip
    return model(nodes, {"codes": codes, "scale": scale, "zero_points": zero_points}, dim)


def session(proto: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, ["CPUExecutionProvider"])


def run_int4_gather_bench(config: Int4GatherConfig, out: Path) -> dict:
    codes, scale, offset = table(config)
    sessions = {
        "unpacking (ours)": session(unpacking_model(codes, scale, offset, config.dim)),
        "GatherBlockQuantized": session(block_quantized_model(codes, scale, config.dim)),
    }
    rng = np.random.default_rng(config.seed + 1)
    ids = [rng.integers(0, config.rows, config.batch, dtype=np.int64) for _ in range(16)]
    outputs = {name: s.run(None, {"ids": ids[0]})[0] for name, s in sessions.items()}
    first, second = outputs.values()
    max_diff = float(np.abs(first - second).max())
    times = {name: [] for name in sessions}
    for _ in range(config.rounds):
        for name, s in sessions.items():
            started = time.perf_counter()
            for call in range(config.calls):
                s.run(None, {"ids": ids[call % len(ids)]})
            times[name].append(1000 * (time.perf_counter() - started) / config.calls)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    ours, contrib = medians.values()
    report = {
        "config": asdict(config),
        "median_ms_per_call": medians,
        "rounds_ms": times,
        "contrib_over_ours": contrib / ours,
        "max_abs_diff": max_diff,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "int4_gather.json", report)
    return report
