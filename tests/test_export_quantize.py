"""Row-wise quantized (8-bit asymmetric and symmetric, 4-bit) and float16 tables: exact codes,
error bounds, refusals."""

import numpy as np
import pytest

from export.quantize import CODE_MAX, dequantize_rows, quantize_rows, to_float16


def bound(rows: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Half a step, plus what float16 rounding of the offset above the row minimum costs."""
    low = rows.min(axis=1, keepdims=True)
    above = np.maximum(offset.astype(np.float32) - low, 0)
    return scale.astype(np.float32) / 2 + above + 1e-6 * np.abs(rows).max(axis=1, keepdims=True)


def test_known_table_codes_and_round_trip():
    rows = np.array(
        [
            [0.0, 0.5, 1.0, 0.25],  # a span of 1 from 0
            [2.0, 2.0, 2.0, 2.0],  # constant
            [-3.0, 0.0, 3.0, 1.5],  # symmetric span of 6
        ],
        dtype=np.float32,
    )
    codes, scale, offset = quantize_rows(rows)
    assert codes.dtype == np.uint8 and scale.dtype == offset.dtype == np.float16
    assert codes.shape == (3, 4) and scale.shape == offset.shape == (3, 1)
    assert offset.ravel().tolist() == [0.0, 2.0, -3.0]
    assert codes[0, 0] == 0 and codes[0, 2] == CODE_MAX and codes[2, 0] == 0
    assert codes[2, 2] == CODE_MAX and codes[1].tolist() == [0, 0, 0, 0]
    restored = dequantize_rows(codes, scale, offset)
    np.testing.assert_array_equal(restored[1], rows[1])  # a constant row comes back exactly
    assert (np.abs(restored - rows) <= bound(rows, scale, offset)).all()
    # A step is the row's span over 255: the middle of row 0 lands within half a step.
    assert abs(restored[0, 1] - 0.5) <= (1 / 255) / 2 + 1e-6


@pytest.mark.parametrize("magnitude", [1e-4, 0.05, 1.0, 300.0])
def test_round_trip_error_stays_within_half_a_step(magnitude):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((2000, 16)) * magnitude + rng.standard_normal((2000, 1)) * magnitude
    rows = rows.astype(np.float32)
    codes, scale, offset = quantize_rows(rows)
    error = np.abs(dequantize_rows(codes, scale, offset) - rows)
    assert (error <= bound(rows, scale, offset)).all()
    # and the step is no coarser than the row's span allows (float16 rounding aside)
    span = rows.max(axis=1, keepdims=True) - rows.min(axis=1, keepdims=True)
    assert (scale.astype(np.float32) <= span / CODE_MAX * (1 + 2**-9) + 1e-7).all()


def test_rows_quantize_alone_exactly_as_inside_a_block():
    rows = np.random.default_rng(1).standard_normal((300, 8)).astype(np.float32)
    whole = quantize_rows(rows)
    pieces = [quantize_rows(rows[i : i + 7]) for i in range(0, 300, 7)]
    for got, expected in zip(
        (np.concatenate(p) for p in zip(*pieces, strict=True)), whole, strict=True
    ):
        np.testing.assert_array_equal(got, expected)


def test_non_finite_rows_and_float16_overflow_are_refused():
    rows = np.ones((4, 3), dtype=np.float32)
    rows[2, 1] = np.nan
    with pytest.raises(ValueError, match="table C7: row 2 holds a value that is not finite"):
        quantize_rows(rows, "table C7")
    with pytest.raises(ValueError, match="beyond float16"):
        to_float16(np.array([[1.0, 7e4]], dtype=np.float32), "table C1")
    np.testing.assert_array_equal(to_float16(np.array([[0.5, -2.0]]), "t"), [[0.5, -2.0]])


def test_int8_is_symmetric_with_one_scale_a_row():
    from export.quantize import SYMMETRIC_MAX, quantize_rows_symmetric

    rows = np.array([[0.0, 0.5, -1.0, 0.25], [0.0, 0.0, 0.0, 0.0], [3.0, 1.5, 0.0, -3.0]],
                    dtype=np.float32)  # fmt: skip
    codes, scale = quantize_rows_symmetric(rows)
    assert codes.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (3, 1)
    assert codes[0, 2] == -SYMMETRIC_MAX and codes[2, 0] == SYMMETRIC_MAX
    assert codes[1].tolist() == [0, 0, 0, 0] and codes[2, 2] == 0  # zeros come back exactly
    restored = dequantize_rows(codes, scale)
    np.testing.assert_array_equal(restored[1], rows[1])
    assert (np.abs(restored - rows) <= scale.astype(np.float32) / 2 + 1e-7).all()


@pytest.mark.parametrize("magnitude", [1e-5, 0.05, 1.0, 300.0])
def test_int8_error_stays_within_half_a_step(magnitude):
    from export.quantize import SYMMETRIC_MAX, quantize_rows_symmetric

    rng = np.random.default_rng(5)
    rows = (rng.standard_normal((2000, 16)) * magnitude).astype(np.float32)
    codes, scale = quantize_rows_symmetric(rows)
    step = scale.astype(np.float32)
    assert (np.abs(dequantize_rows(codes, scale) - rows) <= step / 2 + 1e-9).all()
    largest = np.abs(rows).max(axis=1, keepdims=True)
    assert (step <= largest / SYMMETRIC_MAX * (1 + 2**-9) + 1e-7).all()


def test_int8_refuses_what_float16_scales_cannot_hold():
    from export.quantize import quantize_rows_symmetric

    with pytest.raises(ValueError, match="table C2: .*float16"):
        quantize_rows_symmetric(np.array([[1.0, 1e7]], dtype=np.float32), "table C2")


@pytest.mark.parametrize("variant,row_bytes", [("int8", 16 + 2), ("int4", 8 + 4)])
def test_every_variant_stays_within_what_its_rows_cost(variant, row_bytes):
    from export.graph import table_row_bytes
    from export.quantize import encode_rows, round_trip

    rows = np.random.default_rng(6).standard_normal((100, 16)).astype(np.float32)
    stored = encode_rows(variant, rows)
    assert sum(a.nbytes for a in stored if a is not None) == 100 * row_bytes
    assert table_row_bytes(variant, 16) == row_bytes < table_row_bytes("fp16", 16)
    levels = 127 if variant == "int8" else 7.5  # codes either side of the row's middle
    error = np.abs(round_trip(variant, rows) - rows).max(axis=1)
    assert (error <= np.abs(rows).max(axis=1) / levels).all()


def test_int4_refuses_what_float16_scales_and_offsets_cannot_hold():
    from export.quantize import encode_rows

    with pytest.raises(ValueError, match="table C3: .*beyond float16"):
        encode_rows("int4", np.array([[-7e4, 0.0, 1.0]], dtype=np.float32), "table C3")
    with pytest.raises(ValueError, match="table C3: a row spans more than float16"):
        encode_rows("int4", np.array([[-6e4, 0.0, 1e12]], dtype=np.float32), "table C3")
