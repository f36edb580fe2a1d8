"""Strict checks of a request's inputs against the model's spec, before any runtime sees them."""

from __future__ import annotations

import functools

import numpy as np

from mlet.spec import ExportSpec
from serve.model_config import ConfigSpec
from serve.protocol import InferenceError, InferRequest


def validate_inputs(spec: ExportSpec | ConfigSpec, request: InferRequest) -> dict[str, np.ndarray]:
    """The request's inputs as arrays in the spec's order, or an InferenceError naming the fault.

    A model's values are checked here too; a raw-row model's are checked by its transform.
    """
    given = {}
    for tensor in request.inputs:
        if tensor.name in given:
            raise InferenceError(f"input '{tensor.name}' is given more than once")
        given[tensor.name] = tensor
    unknown = sorted(set(given) - set(spec.input_names))
    if unknown:
        raise InferenceError(f"unknown input(s) {unknown}; the model takes {spec.input_names}")
    missing = [name for name in spec.input_names if name not in given]
    if missing:
        raise InferenceError(f"missing input(s) {missing}; the model takes {spec.input_names}")

    batch = None
    arrays = {}
    for expected in spec.inputs:
        tensor = given[expected.name]
        where = f"input '{expected.name}'"
        if tensor.datatype != expected.datatype:
            raise InferenceError(
                f"{where} has datatype {tensor.datatype}, expected {expected.datatype}"
            )
        if len(tensor.shape) != 1 + len(expected.shape) or tensor.shape[1:] != expected.shape:
            raise InferenceError(
                f"{where} has shape {list(tensor.shape)}, expected [batch, "
                + ", ".join(str(d) for d in expected.shape)
                + "]"
            )
        rows = tensor.shape[0]
        if rows < 1:
            raise InferenceError(f"{where} has an empty batch")
        if rows > spec.max_batch_size:
            raise InferenceError(
                f"{where} has batch {rows}, above the model's maximum of {spec.max_batch_size}"
            )
        if batch is not None and rows != batch:
            raise InferenceError(f"inputs disagree on the batch size ({batch} and {rows})")
        batch = rows
        arrays[expected.name] = tensor.data
    if isinstance(spec, ExportSpec):
        check_values(spec, arrays)
    return arrays


def check_values(spec: ExportSpec, arrays: dict[str, np.ndarray]) -> None:
    if spec.dense_input is not None:
        dense_name = spec.dense_input.name
        dense = arrays[dense_name]
        if not np.isfinite(dense).all():
            row, column = np.argwhere(~np.isfinite(dense))[0][:2]
            raise InferenceError(
                f"input '{dense_name}' holds a non-finite value at row {row}, feature {column}"
            )
    sparse_name = spec.sparse_input.name
    ids = arrays[sparse_name]
    bad = (ids < 0) | (ids >= id_bounds(tuple(spec.table_rows), ids.ndim))
    if bad.any():
        row, table = np.argwhere(bad)[0][:2]
        value = ids[(row, table)].ravel()
        value = value[(value < 0) | (value >= spec.table_rows[table])][0]
        raise InferenceError(
            f"input '{sparse_name}' row {row}: id {value} is outside table "
            f"{spec.table_names[table]} (valid ids 0..{spec.table_rows[table] - 1})"
        )


@functools.lru_cache(maxsize=256)
def id_bounds(table_rows: tuple[int, ...], ndim: int) -> np.ndarray:
    """Each table's row count, shaped to broadcast against ids [B, T] or [B, T, H]."""
    bounds = np.asarray(table_rows).reshape(1, -1, *([1] * (ndim - 2)))
    bounds.flags.writeable = False  # shared by every request
    return bounds


def requested_outputs(spec: ExportSpec | ConfigSpec, request: InferRequest) -> list[str]:
    if not request.outputs:
        return spec.output_names
    names = [o["name"] for o in request.outputs]
    unknown = sorted(set(names) - set(spec.output_names))
    if unknown:
        raise InferenceError(f"unknown output(s) {unknown}; the model gives {spec.output_names}")
    return names
