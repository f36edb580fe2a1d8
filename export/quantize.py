"""Reduced-precision tables: row-wise 8-bit and 4-bit quantization, and float16.

int8 is symmetric: each row x (D floats) becomes D signed codes q in -127..127 and one
scale s = max|x| / 127, read back as x' = q * s, so a row costs D + 2 bytes (no more than
fp16's 2D from D = 2 on). The error of every element is at most s / 2.

int4 is asymmetric, since 16 levels are few: D codes q in 0..15 plus one scale s and one
offset o, read back as x' = q * s + o; with o the row's minimum and s = (max - min) / 15
the error is at most s / 2. Its codes are packed two to a byte, column 2j in the low
nibble and column 2j + 1 in the high one (an odd D leaves the last high nibble 0).

Scales and offsets are float16: a float32 pair would cost as much as a small row's codes.
Their rounding is taken into account when the codes are chosen (the scale is stepped up
where it would fall short of the row's extreme), so the asymmetric bound becomes s / 2
plus the rounding of o (|o| * 2^-11). `quantize_rows` also takes 8 bits (codes 0..255).

Each row is quantized on its own, so any subset of rows quantizes exactly as it does inside
the whole table: the exporter streams blocks, the reference model quantizes only the rows
a check touches, and both see identical codes.
"""

from __future__ import annotations

import numpy as np

FLOAT16_MAX = float(np.finfo(np.float16).max)
CODE_MAX = 255  # of quantize_rows' 8-bit codes
SYMMETRIC_MAX = 127  # int8's codes are -127..127
BITS = {"int8": 8, "int4": 4}  # code width of each quantized variant


def check_finite(rows: np.ndarray, what: str) -> None:
    if not np.isfinite(rows).all():
        bad = int(np.argwhere(~np.isfinite(rows))[0][0])
        raise ValueError(f"{what}: row {bad} holds a value that is not finite")


def to_float16(rows: np.ndarray, what: str) -> np.ndarray:
    """float32 -> float16, refusing values that float16 cannot hold."""
    largest = float(np.max(np.abs(rows))) if rows.size else 0.0
    if largest > FLOAT16_MAX:
        raise ValueError(
            f"{what}: |value| reaches {largest:.4g}, beyond float16's {FLOAT16_MAX:g}; "
            "export the fp32 variant instead"
        )
    return rows.astype(np.float16)


def quantize_rows(rows: np.ndarray, what: str = "table", bits: int = 8) -> tuple[np.ndarray, ...]:
    """float32 [N, D] -> codes uint8 [N, D] (0..2^bits - 1), scale and offset float16 [N, 1]."""
    if bits not in BITS.values():
        raise ValueError(f"codes are 8 or 4 bits wide, got {bits}")
    code_max = (1 << bits) - 1
    rows = np.asarray(rows, dtype=np.float32)
    check_finite(rows, what)
    low = rows.min(axis=1, keepdims=True)
    high = rows.max(axis=1, keepdims=True)
    offset = to_float16(low, what)
    span = high - offset.astype(np.float32)
    scale = (span / code_max).astype(np.float16)
    # float16 rounding may leave offset + code_max * scale short of the row's maximum; step
    # the scale up one float16 ulp there so that the top code still reaches it.
    short = offset.astype(np.float32) + code_max * scale.astype(np.float32) < high
    scale[short] = np.nextafter(scale[short], np.float16(np.inf))
    scale[scale == 0] = np.float16(1.0)  # a constant row: every code is 0, the offset is exact
    if not np.isfinite(scale).all():
        raise ValueError(f"{what}: a row spans more than float16 scales can hold")
    codes = np.rint((rows - offset.astype(np.float32)) / scale.astype(np.float32))
    return np.clip(codes, 0, code_max).astype(np.uint8), scale, offset


def quantize_rows_symmetric(rows: np.ndarray, what: str = "table") -> tuple[np.ndarray, ...]:
    """float32 [N, D] -> codes int8 [N, D] in -127..127 and scale float16 [N, 1]."""
    rows = np.asarray(rows, dtype=np.float32)
    check_finite(rows, what)
    largest = np.abs(rows).max(axis=1, keepdims=True) if rows.size else np.zeros((len(rows), 1))
    scale = to_float16(largest / SYMMETRIC_MAX, what)
    # float16 rounding may leave 127 * scale short of the row's largest value; step the
    # scale up one float16 ulp there so that the extreme codes still reach it.
    short = SYMMETRIC_MAX * scale.astype(np.float32) < largest
    scale[short] = np.nextafter(scale[short], np.float16(np.inf))
    scale[scale == 0] = np.float16(1.0)  # a row of zeros: every code is 0
    if not np.isfinite(scale).all():
        raise ValueError(f"{what}: a row holds values beyond what float16 scales can hold")
    codes = np.rint(rows / scale.astype(np.float32))
    return np.clip(codes, -SYMMETRIC_MAX, SYMMETRIC_MAX).astype(np.int8), scale


def encode_rows(variant: str, rows: np.ndarray, what: str = "table") -> tuple:
    """A block of table rows as the variant stores them: (codes, scale, offset or None);
    int4's codes packed."""
    if variant == "int8":
        return (*quantize_rows_symmetric(rows, what), None)
    codes, scale, offset = quantize_rows(rows, what, bits=4)
    return pack_int4(codes), scale, offset


def round_trip(variant: str, rows: np.ndarray) -> np.ndarray:
    """What the variant's graph reads back for these rows, in float32."""
    codes, scale, offset = encode_rows(variant, rows)
    if variant == "int4":
        codes = unpack_int4(codes, rows.shape[1])
    return dequantize_rows(codes, scale, offset)


def packed_width(dim: int) -> int:
    """Bytes of a row of 4-bit codes."""
    return (dim + 1) // 2


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """codes uint8 [N, D] in 0..15 -> [N, ceil(D/2)], two codes a byte (even column low)."""
    if codes.shape[1] % 2:
        codes = np.concatenate([codes, np.zeros((len(codes), 1), np.uint8)], axis=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, dim: int) -> np.ndarray:
    """pack_int4's inverse: [N, ceil(D/2)] -> codes uint8 [N, D]."""
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(len(packed), -1)
    return codes[:, :dim]


def dequantize_rows(
    codes: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None
) -> np.ndarray:
    """What a quantized graph computes after its Gathers: codes * scale (+ offset), float32."""
    rows = codes.astype(np.float32) * scale.astype(np.float32)
    return rows if offset is None else rows + offset.astype(np.float32)
