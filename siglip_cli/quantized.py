"""Vectors in int8 with a bound on each one's error: the sidecar's first-pass copy (vectors.top_k rechecks in
float32 what the bound cannot decide). numpy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# float32's unit roundoff u: quantize's error bounds and top_k's first pass and recheck are bounded with it
ROUNDING = 2.0**-24


@dataclass
class Quantized:
    """Rows in int8: row ~ scale * values * columns (one scale per row, one per dimension), and a bound on each
    row's error, the norm of the difference, rounded up: a dot product with a query is then off by at most
    that bound times the query's length."""

    values: np.ndarray  # (n, D) int8
    scale: np.ndarray  # (n,) float32
    error: np.ndarray  # (n,) float32
    columns: np.ndarray  # (D,) float32


_HALF: np.ndarray | None = None  # every float16 bit pattern's float32 value


def to_float32(src: np.ndarray, out: np.ndarray) -> None:
    """out[...] = src, in float32. float16 goes through a table of its 65,536 values: numpy casts it one value
    at a time (0.88 ms per 256 x 1152 block on the 2-core EPYC, 0.63 ms by the table; int8's cast is SIMD)."""
    global _HALF
    if src.dtype != np.float16:
        np.copyto(out, src, casting="unsafe")
        return
    if _HALF is None:
        _HALF = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    np.take(_HALF, src.view(np.uint16), out=out)


def column_scales(rows: np.ndarray) -> np.ndarray:
    """Each dimension's root mean square over some rows (at least 1/1000 of the largest): dividing by it before
    the per-row scale keeps a dimension that is large in every row (embeddings have some) from taking all of
    int8's range, which would widen every row's error bound and send most rows to the float32 recheck."""
    x = np.asarray(rows, np.float32)
    x = x[np.isfinite(x).all(axis=1)]
    rms = np.sqrt((x.astype(np.float64) ** 2).mean(axis=0)) if len(x) else np.ones(rows.shape[1])
    top = rms.max() if len(rms) and rms.max() > 0 else 1.0
    return np.maximum(rms, top / 1000).astype(np.float32) / np.float32(top)


def quantize(rows: np.ndarray, columns: np.ndarray | None = None, block: int = 256) -> Quantized:
    """int8 rows, each dimension divided by its column scale and each row by its own (its largest magnitude maps
    to 127), and a bound on each row's error.

    Computed in float32, a block of rows at a time (small enough for the CPU's cache: a 1M-row build spends a
    few seconds here). The error's own rounding is bounded too: the reconstruction s*v_j*c_j and the residual
    r_j = x_j - s*v_j*c_j are each off by at most 3u(|x_j| + |r_j|) (u = 2^-24), and the norm's float32 sum of
    d squares by a factor (1 + d u), so |x - s v c| <= |r| (1 + (d + 6) u) + 3u sqrt(d) max|x_j|, where
    max|x_j| <= M = max|x_j / c_j| max(c) (1 + 2u). Rows with M under 2^-60 are stored as zeros with the bound
    sqrt(d) 2^-59; rows that are not finite get an infinite bound (they are never results); blocks with rows
    outside [2^-40, 2^40] take the norm of r / M (neither overflows nor underflows)."""
    n, d = rows.shape
    columns = np.ones(d, np.float32) if columns is None else np.asarray(columns, np.float32)
    inverse, widest = (1 / columns).astype(np.float32), np.float32(columns.max() * (1 + 2.0**-20))
    out = Quantized(np.empty((n, d), np.int8), np.empty(n, np.float32), np.empty(n, np.float32), columns)
    x, y = np.empty((block, d), np.float32), np.empty((block, d), np.float32)
    for lo in range(0, n, block):
        m = min(block, n - lo)
        xs, ys = x[:m], y[:m]
        to_float32(rows[lo : lo + m], xs)
        np.multiply(xs, inverse, out=ys)
        top = np.abs(ys).max(axis=1)
        big = top * widest  # at least max|x_j|
        finite = np.isfinite(big)
        tiny = ~(big >= 2.0**-60)  # NaN too
        zero = tiny | ~finite  # stored as zeros
        scale = np.where(zero, np.float32(1), top / np.float32(127)).astype(np.float32)
        if zero.any():
            ys[zero] = 0
        np.multiply(ys, (1 / scale)[:, None], out=ys)
        np.rint(ys, out=ys)
        np.clip(ys, -127, 127, out=ys)
        out.values[lo : lo + m] = ys
        np.multiply(ys, scale[:, None], out=ys)
        np.multiply(ys, columns, out=ys)
        np.subtract(xs, ys, out=ys)
        unit = np.ones(m, np.float32)
        if not ((big >= 2.0**-40) & (big <= 2.0**40) | tiny).all():
            unit = np.where(zero, np.float32(1), big).astype(np.float32)
            np.multiply(ys, (1 / unit)[:, None], out=ys)
        norm = unit * np.sqrt(np.einsum("ij,ij->i", ys, ys))
        bound = norm * np.float32(1 + (d + 6) * ROUNDING * 1.01) + big * np.float32(3 * ROUNDING * d**0.5 * 1.01)
        bound = np.where(tiny, np.float32(d**0.5 * 2.0**-59), bound)
        out.scale[lo : lo + m] = scale
        out.error[lo : lo + m] = np.where(finite, np.nextafter(bound, np.float32(np.inf)), np.float32(np.inf))
    return out
