"""What can be checked of TensorRT compatibility without TensorRT: ops, types, sizes, shapes.

The rules come from the ONNX-TensorRT parser's operator support matrix (onnx/onnx-tensorrt,
docs/operators.md, the TensorRT 10.15 edition: opsets 9 to 24) and TensorRT's limits:

- every op is one the parser supports, with a data type it supports for that op
  (Gather takes FP32, FP16, BF16, INT32, INT64 and BOOL data; UINT8 is only supported as a
  network input or output, and INT8 only through quantize/dequantize, so a Gather on 8-bit
  codes cannot be parsed);
- no tensor holds 2^31 elements or more (tables past that are split into row blocks);
- Gather indices are INT32 or INT64;
- axes and target shapes (Reshape, Unsqueeze, Squeeze, Reduce*, Slice, Split) are constants;
- every input dimension except the batch is fixed, so that one optimization profile over
  the batch covers the model.

These checks run on every exported graph, so a model that TensorRT would refuse is known
at export time, also on machines without TensorRT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

MIN_OPSET, MAX_OPSET = 9, 24
MAX_ELEMENTS = 2**31  # TensorRT tensors hold fewer elements than this

# Operators marked supported in the matrix (docs/operators.md, TensorRT 10.15).
SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant
    ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
    Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
    GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow
    HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
    InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot
    Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike
    RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare
    Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding
    Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
    Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
    Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu
    Unsqueeze Upsample Where Xor
    """.split()  # noqa: SIM905 (a word list reads better than 150 quoted names)
)

F, H, B16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16
I32, I64, BOOL = TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL
FLOATS = {F, H, B16}
# Data types the matrix lists for the ops our graphs use (first input unless noted).
SUPPORTED_TYPES = {
    "Gather": FLOATS | {I32, I64, BOOL},
    "Cast": FLOATS | {I32, I64, TensorProto.UINT8, BOOL},
    "Add": FLOATS | {I32, I64},
    "Sub": FLOATS | {I32, I64},
    "Mul": FLOATS | {I32, I64},
    "Min": FLOATS | {I32, I64},
    "Max": FLOATS | {I32, I64},
    "Equal": FLOATS | {I32, I64},
    "Concat": FLOATS | {I32, I64, BOOL},
    "Reshape": FLOATS | {I32, I64, BOOL},
    "Transpose": FLOATS | {I32, I64, BOOL},
    "Unsqueeze": FLOATS | {I32, I64, BOOL},
    "Where": FLOATS | {I32, I64, BOOL},
    "MatMul": FLOATS,
    "Relu": FLOATS | {I32, I64},
    "Log": FLOATS,
    "Sigmoid": FLOATS,
    "ReduceSum": FLOATS | {I32, I64},
}
# Ops whose listed inputs must be build-time constants: (op, input positions).
CONSTANT_INPUTS = {
    "Reshape": (1,),
    "Unsqueeze": (1,),
    "Squeeze": (1,),
    "Slice": (1, 2, 3, 4),
    "Split": (1,),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
}


def tensorrt_problems(model: onnx.ModelProto, max_batch_size: int) -> list[str]:
    """Every reason TensorRT's ONNX parser or builder would refuse `model` (empty if none)."""
    graph = model.graph
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        problems.append(f"opset {opset} is outside TensorRT's {MIN_OPSET}..{MAX_OPSET}")
    types, shapes = value_types_and_shapes(model, max_batch_size)
    constants = {i.name for i in graph.initializer} | {
        n.output[0] for n in graph.node if n.op_type == "Constant"
    }
    graph_io = {v.name for v in [*graph.input, *graph.output]}
    for node in graph.node:
        problems += node_problems(node, types, constants, graph_io)
    for name, shape in shapes.items():
        elements = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if elements >= MAX_ELEMENTS:
            problems.append(f"tensor {name} {list(shape)} holds {elements:,} elements (>= 2^31)")
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            problems.append(f"input {value.name} has no dynamic batch dimension")
        fixed = [d.dim_value > 0 for d in dims[1:]]
        if not all(fixed):
            problems.append(f"input {value.name} has a dynamic dimension besides the batch")
    return problems


def node_problems(
    node: onnx.NodeProto, types: dict[str, int], constants: set[str], graph_io: set[str]
) -> list[str]:
    where = f"node {node.name or node.output[0]} ({node.op_type})"
    if node.domain not in ("", "ai.onnx"):
        return [f"{where}: custom domain {node.domain!r} needs a TensorRT plugin"]
    if node.op_type not in SUPPORTED_OPS:
        return [f"{where}: TensorRT's ONNX parser does not support {node.op_type}"]
    problems = []
    data_type = types.get(node.input[0]) if node.input else None
    allowed = SUPPORTED_TYPES.get(node.op_type)
    if allowed is not None and data_type is not None and data_type not in allowed:
        problems.append(f"{where}: input type {type_name(data_type)} is not supported")
    elif node.op_type != "Cast" and any(
        types.get(n) == TensorProto.UINT8 and n not in graph_io for n in node.input
    ):
        problems.append(f"{where}: UINT8 tensors are only allowed as network inputs/outputs")
    if node.op_type == "Gather" and types.get(node.input[1]) not in (I32, I64):
        problems.append(f"{where}: indices must be INT32 or INT64")
    for position in CONSTANT_INPUTS.get(node.op_type, ()):
        name = node.input[position] if position < len(node.input) else ""
        if name and name not in constants:
            problems.append(f"{where}: input {position} must be a constant")
    return problems


def value_types_and_shapes(
    model: onnx.ModelProto, max_batch_size: int
) -> tuple[dict[str, int], dict[str, tuple[int, ...]]]:
    """Element type of every named value, and the shape at the largest batch where known."""
    # Large initializers are external and not loaded: inference reads their dims only.
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except onnx.shape_inference.InferenceError:
        inferred = model.graph  # sizes of intermediate tensors stay unknown (ops are reported)
    types: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for tensor in model.graph.initializer:
        types[tensor.name] = tensor.data_type
        shapes[tensor.name] = tuple(tensor.dims)
    for value in [*inferred.input, *inferred.value_info, *inferred.output]:
        tensor_type = value.type.tensor_type
        types[value.name] = tensor_type.elem_type
        dims = tensor_type.shape.dim
        if all(d.dim_value > 0 or d.dim_param for d in dims) and tensor_type.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value or max_batch_size for d in dims)
    return types, shapes


def type_name(data_type: int) -> str:
    return helper.tensor_dtype_to_string(data_type).removeprefix("TensorProto.")


def check_tensorrt_file(path: Path, max_batch_size: int) -> list[str]:
    """tensorrt_problems of a model file, read without its external data."""
    return tensorrt_problems(onnx.load(str(path), load_external_data=False), max_batch_size)
