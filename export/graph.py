"""Build the inference graph of a collapsed DLRM from its weights, for every variant.

One builder writes every exported model, whatever its precision and size:

    fp32  tables and MLPs in float32
    fp16  tables and MLPs in float16; float32 inputs and output (casts inside the graph)
    int8  tables row-wise quantized (int8 codes and a float16 scale per row, see
          export.quantize), dequantized right after the Gather; MLP weights stored in
          float16 and cast to float32 once (computed in float32)
    int4  4-bit codes packed two to a byte with a float16 scale and offset per row,
          unpacked after the Gather with BitwiseAnd and BitShift; MLPs as int8

The graph is written with onnx.helper rather than traced from PyTorch: tracing needs the
whole model in memory and serializes it in one protobuf, which fails past 2 GB and needs
two or three copies of the weights on the way. Here each table is collapsed and written
block by block into `model.onnx.data` (one file, page-aligned tensors that ONNX Runtime
maps instead of copying), the initializers point at their byte ranges, and the protobuf
holds only the graph and the small tensors. Every variant goes through the same code, and
the exporter compares each with PyTorch before it is kept.

Shape legend: B batch, F dense features, T tables, H hotness, D width, P = (T+1)T/2 pairs.
A table of N x D >= `max_tensor_elements` is split into row blocks (TensorRT refuses
tensors of 2^31 elements or more); a lookup then gathers from every block with the ids
clamped into it and keeps the vector of the block that holds the id.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from export.quantize import BITS, check_finite, encode_rows, packed_width, to_float16
from export.sources import ModelWeights
from mlet.dlrm import DLRMConfig, build_mlps
from mlet.spec import ExportSpec
from mlet.variants import ONNX_VARIANTS

# Weights past this go to model.onnx.data. Protobuf stops at 2 GB, but well below that an
# inline model already costs: ONNX Runtime parses it into private memory (a 675 MB int8
# model took 700 MB resident), while an external data file is memory-mapped and shared.
EXTERNAL_DATA_BYTES = 64 << 20
IR_VERSION = 8  # the IR of opset 18; older readers (TensorRT's parser among them) accept it
PRODUCER = "mlet-export"


@dataclass(frozen=True)
class LoweringOptions:
    """max_tensor_elements: larger tables are split into row blocks (TensorRT's limit).
    external_data_bytes: a variant whose weights exceed this keeps its tables in model.onnx.data.
    block_rows: rows collapsed and written at a time; bounds the exporter's memory.
    alignment: byte alignment of each tensor in the external data file."""

    max_tensor_elements: int = 2**31 - 1
    external_data_bytes: int = EXTERNAL_DATA_BYTES
    block_rows: int = 1 << 16
    alignment: int = 4096


@dataclass
class LoweredModel:
    variant: str
    path: Path
    external_data: bool
    table_bytes: int  # bytes of every table tensor (codes, scales and offsets included)
    row_blocks: dict[str, int] = field(default_factory=dict)  # tables split, and into how many


def data_file_name(onnx_path: Path) -> str:
    return onnx_path.name + ".data"


def table_row_bytes(variant: str, dim: int) -> int:
    """Bytes per table row: 4 or 2 per element; int8 a byte per code and a float16 scale;
    int4 half a byte per code and a float16 scale and offset."""
    return {"fp32": 4 * dim, "fp16": 2 * dim, "int8": dim + 2, "int4": packed_width(dim) + 4}[
        variant
    ]


def mlp_weight_bytes(variant: str) -> int:
    """Bytes per MLP parameter: float32 in fp32, float16 in every smaller variant (int8 and
    int4 compute in float32 on weights cast up from float16 once)."""
    return 4 if variant == "fp32" else 2


def planned_bytes(config: DLRMConfig, variant: str) -> int:
    """Weight bytes of a variant, known before anything is written."""
    tables = sum(t.rows * table_row_bytes(variant, t.dim) for t in config.tables)
    mlp_params = sum(p.numel() for m in build_mlps(config) for p in m.parameters())
    return tables + mlp_params * mlp_weight_bytes(variant)


def row_parts(rows: int, dim: int, max_elements: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges so that no part holds max_elements elements or more."""
    per_part = max(1, (max_elements - 1) // dim)
    return [(start, min(rows, start + per_part)) for start in range(0, rows, per_part)]


class TensorStore:
    """Initializers of one model: inline in the protobuf, or appended to one data file."""

    def __init__(self, onnx_path: Path, external: bool, alignment: int) -> None:
        self.location = data_file_name(onnx_path)
        self.alignment = alignment
        self.file = open(onnx_path.parent / self.location, "wb") if external else None  # noqa: SIM115

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def stream(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> TensorStream:
        if self.file is None:
            return InlineStream(name, dtype, shape)
        padding = -self.file.tell() % self.alignment
        self.file.write(b"\0" * padding)
        return ExternalStream(name, dtype, shape, self.file, self.location)

    def whole(self, name: str, array: np.ndarray) -> TensorProto:
        stream = self.stream(name, array.dtype, array.shape)
        stream.write(array)
        return stream.finish()


class TensorStream:
    """A tensor written in blocks of rows; `finish` checks it is complete."""

    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.name, self.dtype, self.shape = name, np.dtype(dtype), tuple(shape)
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        self.written = 0

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        self.written += block.nbytes
        if self.written > self.nbytes:
            raise ValueError(f"tensor {self.name}: more data than its shape {self.shape} holds")
        self._write(block)

    def finish(self) -> TensorProto:
        if self.written != self.nbytes:
            raise ValueError(f"tensor {self.name}: {self.written} of {self.nbytes} bytes written")
        return self._finish()

    def _write(self, block: np.ndarray) -> None:
        raise NotImplementedError

    def _finish(self) -> TensorProto:
        raise NotImplementedError


class InlineStream(TensorStream):
    def __init__(self, name, dtype, shape) -> None:
        super().__init__(name, dtype, shape)
        self.blocks: list[np.ndarray] = []

    def _write(self, block: np.ndarray) -> None:
        self.blocks.append(block)

    def _finish(self) -> TensorProto:
        data = np.concatenate(self.blocks) if self.blocks else np.empty(0, self.dtype)
        return numpy_helper.from_array(data.reshape(self.shape), self.name)


class ExternalStream(TensorStream):
    def __init__(self, name, dtype, shape, file, location: str) -> None:
        super().__init__(name, dtype, shape)
        self.file, self.location, self.offset = file, location, file.tell()

    def _write(self, block: np.ndarray) -> None:
        self.file.write(block.data)

    def _finish(self) -> TensorProto:
        tensor = TensorProto(name=self.name, dims=self.shape)
        tensor.data_type = helper.np_dtype_to_tensor_dtype(self.dtype)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", self.offset)):
            tensor.external_data.add(key=key, value=str(value))
        tensor.external_data.add(key="length", value=str(self.nbytes))
        return tensor


@dataclass(frozen=True)
class TablePart:
    """One row block of a table in one variant: initializer names and the rows it holds."""

    start: int
    rows: int
    values: str  # float table, or codes (int8: int8; int4: uint8, two a byte)
    dim: int
    scale: str | None = None
    offset: str | None = None


class TableEncoder:
    """Writes one table part of one variant as its blocks of collapsed rows arrive."""

    def __init__(
        self, variant: str, store: TensorStore, name: str, start: int, rows: int, dim: int
    ):
        self.variant, self.store, self.what = variant, store, f"table {name}"
        quantized = variant in BITS
        self.part = TablePart(
            start,
            rows,
            values=name + (".codes" if quantized else ""),
            dim=dim,
            scale=name + ".scale" if quantized else None,
            offset=name + ".offset" if variant == "int4" else None,
        )
        dtype = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8, "int4": np.uint8}[variant]
        width = packed_width(dim) if variant == "int4" else dim
        self.values = store.stream(self.part.values, dtype, (rows, width))
        self.scales: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        self.tensors: list[TensorProto] = []

    def write(self, block: np.ndarray) -> None:
        if self.variant == "fp32":
            self.values.write(block)
        elif self.variant == "fp16":
            self.values.write(to_float16(block, self.what))
        else:
            codes, scale, offset = encode_rows(self.variant, block, self.what)
            self.values.write(codes)
            self.scales.append(scale)
            self.offsets.append(offset)

    def finish(self) -> TablePart:
        self.tensors.append(self.values.finish())
        if self.variant in BITS:
            # Scales and offsets are small next to the codes: collected, then written after them.
            self.tensors.append(self.store.whole(self.part.scale, np.concatenate(self.scales)))
            if self.part.offset is not None:
                offsets = np.concatenate(self.offsets)
                self.tensors.append(self.store.whole(self.part.offset, offsets))
        return self.part


class GraphBuilder:
    """The nodes and initializers of one variant's graph, with deterministic names."""

    def __init__(self, variant: str, spec: ExportSpec, config: DLRMConfig) -> None:
        self.variant, self.spec, self.config = variant, spec, config
        self.compute = TensorProto.FLOAT16 if variant == "fp16" else TensorProto.FLOAT
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._counts: Counter[str] = Counter()
        self._constants: set[str] = set()

    def node(self, op: str, inputs: list[str], **attributes) -> str:
        self._counts[op] += 1
        output = f"{op.lower()}_{self._counts[op]}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def constant(self, name: str, array: np.ndarray) -> str:
        """A small initializer, created once per name."""
        if name not in self._constants:
            self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
            self._constants.add(name)
        return name

    def int64s(self, *values: int) -> str:
        return self.constant(
            "const." + "_".join(str(v) for v in values), np.array(values, np.int64)
        )

    def float_array(self, array: np.ndarray) -> np.ndarray:
        return array.astype(np.float16 if self.variant == "fp16" else np.float32)

    # -- dense side -----------------------------------------------------------------------

    def dense_features(self, dense: str) -> str:
        """dense [B, F] raw values -> transformed [B, F] in the compute type."""
        if self.config.dense_transform == "log1p":  # log(1 + max(x, 0)), in float32
            dense = self.node("Log", [self.node("Add", [self.node("Relu", [dense]), self.one()])])
        if self.compute != TensorProto.FLOAT:
            dense = self.node("Cast", [dense], to=self.compute)
        return dense

    def constant_bottom(self, sparse: str, bottom: nn.Sequential) -> str:
        """A model without numeric features: the bottom MLP of no inputs is a constant [1, D]
        (its biases through the layers), broadcast to [B, D] with B taken from `sparse`."""
        with torch.no_grad():
            value = bottom(torch.zeros(1, 0)).numpy()  # [1, D]
        batch = self.node("Shape", [sparse], start=0, end=1)  # [1]
        shape = self.node("Concat", [batch, self.int64s(value.shape[1])], axis=0)  # [2]
        return self.node(
            "Expand", [self.constant("bottom.constant", self.float_array(value)), shape]
        )

    def one(self) -> str:
        return self.constant("const.one_fp32", np.array(1.0, np.float32))

    def mlp(self, x: str, prefix: str, sequential: nn.Sequential) -> str:
        """Linear layers as MatMul + Add (the form ONNX Runtime's quantizer and TensorRT take)."""
        modules = list(sequential)
        for index, module in enumerate(modules):
            if isinstance(module, nn.Linear):
                weight = module.weight.detach().numpy().T  # [in, out]
                bias = module.bias.detach().numpy()
                w = self.mlp_weight(f"{prefix}.{index}.weight", weight)
                b = self.mlp_weight(f"{prefix}.{index}.bias", bias)
                x = self.node("Add", [self.node("MatMul", [x, w]), b])
            elif isinstance(module, nn.ReLU):
                x = self.node("Relu", [x])
            else:
                raise ValueError(f"{prefix}: cannot lower layer {type(module).__name__}")
        return x

    def mlp_weight(self, name: str, array: np.ndarray) -> str:
        """An MLP tensor in the compute type; int8 and int4 store it in float16 and cast it
        (the cast of an initializer is folded once when ONNX Runtime loads the model)."""
        if self.variant not in BITS:
            return self.constant(name, self.float_array(array))
        stored = self.constant(name, to_float16(array, f"MLP weight {name}"))
        return self.node("Cast", [stored], to=TensorProto.FLOAT)

    # -- tables -----------------------------------------------------------------------------

    def lookup(self, sparse: str, index: int, parts: list[TablePart]) -> str:
        """sparse [B, T(, H)] -> table `index`'s vectors [B, D], summed over H."""
        position = self.constant(f"const.table_{index}", np.array(index, np.int64))
        ids = self.node("Gather", [sparse, position], axis=1)  # [B] or [B, H]
        if len(parts) == 1:
            vectors = self.gather_part(parts[0], ids)
        else:
            vectors = None
            for part in parts:
                block = self.gather_block(part, ids)
                vectors = block if vectors is None else self.node("Add", [vectors, block])
        if self.config.hotness > 1:
            vectors = self.node("ReduceSum", [vectors, self.int64s(1)], keepdims=0)
        return vectors

    def gather_part(self, part: TablePart, ids: str) -> str:
        if self.variant not in BITS:
            return self.node("Gather", [part.values, ids])
        codes = self.node("Gather", [part.values, ids])  # [..., D] or int4's [..., ceil(D/2)]
        if self.variant == "int4":
            codes = self.unpack_int4(codes, part.dim)
        codes = self.node("Cast", [codes], to=TensorProto.FLOAT)
        scale = self.node("Cast", [self.node("Gather", [part.scale, ids])], to=TensorProto.FLOAT)
        rows = self.node("Mul", [codes, scale])
        if part.offset is None:  # int8 is symmetric
            return rows
        offset = self.node("Cast", [self.node("Gather", [part.offset, ids])], to=TensorProto.FLOAT)
        return self.node("Add", [rows, offset])

    def unpack_int4(self, packed: str, dim: int) -> str:
        """[..., ceil(D/2)] bytes -> [..., D] codes: low nibble first, as export.quantize packs."""
        low = self.node("BitwiseAnd", [packed, self.constant("const.low_nibble", np.uint8(15))])
        high = self.node(
            "BitShift", [packed, self.constant("const.nibble_bits", np.uint8(4))], direction="RIGHT"
        )
        pairs = self.node(
            "Concat",
            [self.node("Unsqueeze", [x, self.int64s(-1)]) for x in (low, high)],
            axis=-1,
        )  # [..., ceil(D/2), 2]
        keep = [0] * (1 if self.config.hotness == 1 else 2)  # Reshape's 0 keeps B (and H)
        codes = self.node("Reshape", [pairs, self.int64s(*keep, -1)])
        if dim % 2:  # the last high nibble is padding
            last = self.int64s(-1)
            codes = self.node("Slice", [codes, self.int64s(0), self.int64s(dim), last])
        return codes

    def gather_block(self, part: TablePart, ids: str) -> str:
        """The vectors of ids that fall in this row block, zeros for the others."""
        local = self.node("Sub", [ids, self.int64s(part.start)])
        clamped = self.node(
            "Min", [self.node("Max", [local, self.int64s(0)]), self.int64s(part.rows - 1)]
        )
        inside = self.node("Unsqueeze", [self.node("Equal", [local, clamped]), self.int64s(-1)])
        zero = self.constant(f"const.zero_{self.variant}", self.float_array(np.array(0.0)))
        return self.node("Where", [inside, self.gather_part(part, clamped), zero])

    # -- interaction, top, output -----------------------------------------------------------

    def interaction(self, bottom: str, vectors: list[str]) -> str:
        """bottom [B, D] and T vectors [B, D] -> [B, D + P] (dot) or [B, (T+1) D] (cat), as
        DLRM.forward."""
        tables = len(self.config.tables)
        stacked = self.node("Concat", [bottom, *vectors], axis=1)  # [B, (T+1) D]
        if self.config.interaction == "cat":
            return stacked
        stacked = self.node("Reshape", [stacked, self.int64s(-1, tables + 1, self.config.dim)])
        transposed = self.node("Transpose", [stacked], perm=[0, 2, 1])  # [B, D, T+1]
        dots = self.node("MatMul", [stacked, transposed])  # [B, T+1, T+1]
        flat = self.node("Reshape", [dots, self.int64s(-1, (tables + 1) ** 2)])
        rows, cols = np.tril_indices(tables + 1, -1)
        pairs_index = self.constant(
            "interaction_index", (rows * (tables + 1) + cols).astype(np.int64)
        )
        pairs = self.node("Gather", [flat, pairs_index], axis=1)  # [B, P]
        return self.node("Concat", [bottom, pairs], axis=1)

    def probability(self, logit: str) -> str:
        if self.compute != TensorProto.FLOAT:
            logit = self.node("Cast", [logit], to=TensorProto.FLOAT)
        self.nodes.append(helper.make_node("Sigmoid", [logit], [self.spec.output_names[0]]))
        return self.spec.output_names[0]

    def model(self) -> onnx.ModelProto:
        inputs = [
            helper.make_tensor_value_info(
                t.name, helper.np_dtype_to_tensor_dtype(t.dtype), ["batch", *t.shape]
            )
            for t in self.spec.inputs
        ]
        (out,) = self.spec.outputs
        outputs = [
            helper.make_tensor_value_info(out.name, TensorProto.FLOAT, ["batch", *out.shape])
        ]
        graph = helper.make_graph(
            self.nodes, f"dlrm_{self.variant}", inputs, outputs, self.initializers
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", self.spec.opset)],
            producer_name=PRODUCER,
            ir_version=IR_VERSION,
        )
        helper.set_model_props(model, {"variant": self.variant})
        return model


def lower_variants(
    weights: ModelWeights,
    spec: ExportSpec,
    targets: dict[str, Path],
    options: LoweringOptions | None = None,
) -> dict[str, LoweredModel]:
    """Write targets[variant] (+ its data file when large) for every variant, reading each
    table once, one block of rows at a time."""
    options = options or LoweringOptions()
    config = weights.config
    unknown = sorted(set(targets) - set(ONNX_VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(ONNX_VARIANTS)}")
    stores, builders, lowered = {}, {}, {}
    try:
        for variant, path in targets.items():
            external = planned_bytes(config, variant) > options.external_data_bytes
            stores[variant] = TensorStore(path, external, options.alignment)
            builders[variant] = GraphBuilder(variant, spec, config)
            lowered[variant] = LoweredModel(variant, path, external, table_bytes=0)
        bottom_mlp, top_mlp = weights.mlps()
        sparse_name = spec.sparse_input.name
        bottoms = {
            v: b.mlp(b.dense_features(spec.dense_input.name), "bottom", bottom_mlp)
            if spec.dense_input is not None
            else b.constant_bottom(sparse_name, bottom_mlp)
            for v, b in builders.items()
        }
        vectors: dict[str, list[str]] = {v: [] for v in builders}
        for index, table in enumerate(config.tables):
            for v, (parts, tensors) in write_table(weights, index, stores, options).items():
                builders[v].initializers.extend(tensors)
                lowered[v].table_bytes += sum(_tensor_bytes(t) for t in tensors)
                vectors[v].append(builders[v].lookup(sparse_name, index, parts))
                if len(parts) > 1:
                    lowered[v].row_blocks[table.name] = len(parts)
        for v, builder in builders.items():
            top_input = builder.interaction(bottoms[v], vectors[v])
            builder.probability(builder.mlp(top_input, "top", top_mlp))
            stores[v].close()
            onnx.save(builder.model(), str(targets[v]))
    finally:
        for store in stores.values():
            store.close()
    return lowered


def write_table(
    weights: ModelWeights, index: int, stores: dict[str, TensorStore], options: LoweringOptions
) -> dict[str, tuple[list[TablePart], list[TensorProto]]]:
    """Collapse table `index` block by block into every variant's store: its row blocks
    and initializers per variant."""
    table = weights.config.tables[index]
    parts = row_parts(table.rows, table.dim, options.max_tensor_elements)
    written: dict[str, tuple[list[TablePart], list[TensorProto]]] = {v: ([], []) for v in stores}
    for number, (start, stop) in enumerate(parts):
        name = f"table.{table.name}" + (f".block{number}" if len(parts) > 1 else "")
        encoders = {
            v: TableEncoder(v, store, name, start, stop - start, table.dim)
            for v, store in stores.items()
        }
        for first in range(start, stop, options.block_rows):
            block = weights.collapsed_rows(index, first, min(stop, first + options.block_rows))
            check_finite(block, f"table {table.name} rows from {first}")
            for encoder in encoders.values():
                encoder.write(block)
        for v, encoder in encoders.items():
            written[v][0].append(encoder.finish())
            written[v][1].extend(encoder.tensors)
    return written


def _tensor_bytes(tensor: TensorProto) -> int:
    elements = int(np.prod(tensor.dims, dtype=np.int64))
    return elements * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
