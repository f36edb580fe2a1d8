"""Reduced-precision tables: row-wise 8-bit quantization and float16.

Row-wise quantization stores each row x (D floats) as D codes q in 0..255 plus one scale s
and one offset o, and reads it back as x' = q * s + o. With o the row's minimum and
s = (max - min) / 255 the error of every element is at most s / 2. Scale and offset are
kept in float16: at D=4 a float32 pair would cost 8 bytes per row next to 4 bytes of
codes, half of them costs 4. The float16 rounding of o and s is taken into account when
the codes are chosen, so the bound becomes s / 2 plus the rounding of o (|o| * 2^-11).

Each row is quantized on its own, so any subset of rows quantizes exactly as it does inside
the whole table: the exporter streams blocks, the reference model quantizes only the rows
a check touches, and both see identical codes.
"""

from __future__ import annotations

import numpy as np

FLOAT16_MAX = float(np.finfo(np.float16).max)
CODE_MAX = 255


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


def quantize_rows(rows: np.ndarray, what: str = "table") -> tuple[np.ndarray, ...]:
    """float32 [N, D] -> codes uint8 [N, D], scale float16 [N, 1], offset float16 [N, 1]."""
    rows = np.asarray(rows, dtype=np.float32)
    check_finite(rows, what)
    low = rows.min(axis=1, keepdims=True)
    high = rows.max(axis=1, keepdims=True)
    offset = to_float16(low, what)
    span = high - offset.astype(np.float32)
    scale = (span / CODE_MAX).astype(np.float16)
    # float16 rounding may leave offset + 255 * scale short of the row's maximum; step the
    # scale up one float16 ulp there so that the top code still reaches it.
    short = offset.astype(np.float32) + CODE_MAX * scale.astype(np.float32) < high
    scale[short] = np.nextafter(scale[short], np.float16(np.inf))
    scale[scale == 0] = np.float16(1.0)  # a constant row: every code is 0, the offset is exact
    if not np.isfinite(scale).all():
        raise ValueError(f"{what}: a row spans more than float16 scales can hold")
    codes = np.rint((rows - offset.astype(np.float32)) / scale.astype(np.float32))
    return np.clip(codes, 0, CODE_MAX).astype(np.uint8), scale, offset


def dequantize_rows(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """What the int8 graph computes after its Gathers: codes * scale + offset in float32."""
    return codes.astype(np.float32) * scale.astype(np.float32) + offset.astype(np.float32)
