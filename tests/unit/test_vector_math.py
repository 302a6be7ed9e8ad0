"""Exact search and dedup on hand-made unit vectors: the blocked top-k and the pairs equal a numpy brute force, and
the int8 copy's stored error bounds hold (siglip_cli/vectors.py, quantized.py, search.py)."""

from __future__ import annotations

import numpy as np
import pytest

from siglip_cli.quantized import column_scales, quantize
from siglip_cli.vectors import top_k


def vectors(kind: str, n: int, d: int, rng) -> np.ndarray:
    """Unit rows: isotropic, near-ties (200 tight clusters; "alike": 5), or with one large dimension (as real
    embeddings have)."""
    if kind == "random":
        m = rng.standard_normal((n, d))
    elif kind in ("ties", "alike"):
        k = 200 if kind == "ties" else 5
        m = rng.standard_normal((k, d))[rng.integers(0, k, n)] + 1e-3 * rng.standard_normal((n, d))
    else:
        m = rng.standard_normal((n, d))
        m[:, 3] += 40
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["random", "ties", "outlier"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("two_pass", [False, True])
def test_blocked_top_k_equals_brute_force(kind, dtype, two_pass, tmp_path):
    rng = np.random.default_rng(1)
    m = vectors(kind, 50_000, 64, rng).astype(dtype)
    np.save(tmp_path / "m.npy", m)
    m = np.load(tmp_path / "m.npy", mmap_mode="r")  # read as a sidecar is: pread into blocks
    q = m[7].astype(np.float32) + (0.0 if kind == "ties" else rng.standard_normal(64).astype(np.float32))
    q /= np.linalg.norm(q)
    keep = rng.random(50_000) < 0.5
    fast = quantize(m, column_scales(m)) if two_pass else None  # the sidecar's int8 copy
    idx, cos = top_k(m, q, 25, keep, fast=fast)
    brute = np.where(keep, m.astype(np.float32) @ q, -np.inf)
    want = np.argsort(-brute, kind="stable")[:25]
    np.testing.assert_allclose(cos, brute[want], rtol=1e-5, atol=1e-6)
    if kind != "ties":  # near-ties may swap places within float32 rounding; scores above say they are the same
        assert list(idx) == list(want)  # recall 1.0, in order


def test_quantized_error_bounds_hold():
    """Each row's stored bound is at least its true error (float64), whatever the rows: isotropic, tied, with a
    large dimension, all zeros, tiny, huge; rows that are not finite get an infinite bound and are never results.
    Column scales keep a large dimension from widening every bound (it would send most rows to the recheck)."""
    rng = np.random.default_rng(2)
    medians = {}
    for kind in ("random", "ties", "outlier"):
        m = vectors(kind, 2_000, 1152, rng)
        m[:4] = [np.zeros(1152), m[4] * 1e-39, m[5] * 1e-20, m[6] * 1e30]
        f = quantize(m, column_scales(m))
        true = np.linalg.norm(
            m.astype(np.float64) - (f.scale[:, None] * f.values * f.columns).astype(np.float64), axis=1
        )
        assert (true <= f.error).all() and f.values.dtype == np.int8 and np.abs(f.values).max() == 127
        medians[kind] = np.median(f.error[4:])
    assert medians["outlier"] < 2 * medians["random"]
    m = vectors("random", 100, 64, rng)
    m[[3, 7]] = np.nan
    m[9, 5] = np.inf
    f = quantize(m, column_scales(m))
    assert np.isinf(f.error[[3, 7, 9]]).all() and np.isfinite(f.error[:3]).all()
    q = m[0] / np.linalg.norm(m[0])
    idx, cos = top_k(m, q, 10, fast=f)
    brute = np.where(np.isfinite(m).all(axis=1), np.nan_to_num(m @ q, nan=-np.inf), -np.inf)
    assert list(idx) == list(np.argsort(-brute, kind="stable")[:10])


@pytest.mark.parametrize("kind", ["random", "ties", "alike", "outlier"])
def test_pairs_equal_brute_force(kind):
    """dedup's pairs, with its low-dimensional first pass (rows of 512) and its full-block fallback (the few
    tight clusters of "alike"), equal a float32 brute force at both presets, planted near-copies included."""
    from siglip_cli.search import NEAR_IDENTICAL, SIMILAR, pairs

    rng = np.random.default_rng(3)
    m = vectors(kind, 3000, 512, rng)
    m[::50] = m[1::50] + 0.004 * rng.standard_normal((60, 512)).astype(np.float32)  # near-copies
    m[2::50] = m[3::50] + 0.012 * rng.standard_normal((60, 512)).astype(np.float32)  # similar shots
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    sims = m @ m.T
    for threshold in (NEAR_IDENTICAL, SIMILAR):
        i, j, s = pairs(m, threshold, block=1024)
        got = set(zip(i.tolist(), j.tolist()))
        a, b = np.nonzero(np.triu(sims >= threshold, k=1))
        sure = {(x, y) for x, y in zip(a.tolist(), b.tolist()) if sims[x, y] >= threshold + 1e-5}
        assert sure <= got and len(got) >= 60
        assert all(sims[x, y] >= threshold - 1e-5 for x, y in got)  # nothing below, beyond rounding
        np.testing.assert_allclose(s, sims[i, j], atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_identical_copies_reach_threshold_1(dtype):
    """--threshold 1 finds identical vectors, stored as float16 (unit length only to |x|^2 0.99992-1.00008, so
    a copy scored 0.99992 and was missed) or float32 (0.99999994), and nothing else; scores are cosines."""
    from siglip_cli.search import pairs

    rng = np.random.default_rng(5)
    m = rng.standard_normal((3000, 1152)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    m[1::100] = m[::100]
    m = m.astype(dtype)
    i, j, s = pairs(m, 1.0, block=1024)
    assert set(zip(i.tolist(), j.tolist())) == {(k, k + 1) for k in range(0, 3000, 100)}
    assert np.abs(s - 1).max() < 1e-6
