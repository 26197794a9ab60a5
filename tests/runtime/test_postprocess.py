"""Post-graph steps shared by encode and the server: a change of their arithmetic changes
every served and encoded vector, so they are pinned bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from angle_rt.postprocess import l2_normalize


@pytest.mark.parametrize("shape", [(384,), (1, 384), (7, 384), (32, 1024), (3, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_l2_normalize_is_bit_identical_to_numpys_norm(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    emb = rng.standard_normal(shape).astype(dtype)
    emb *= rng.uniform(1e-3, 1e3, (*shape[:-1], 1)).astype(dtype)  # scales far from 1
    if emb.ndim == 2:
        emb[0] = 0.0  # an all-zero row stays zero
    want = (emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)).astype(
        np.float32, copy=False)
    got = l2_normalize(emb)
    assert got.dtype == np.float32 and got.shape == emb.shape
    assert np.array_equal(got, want)
    if emb.ndim == 2:
        assert not got[0].any()


def test_l2_normalize_takes_integer_rows_like_numpy():
    emb = np.array([[60000, 80000], [3, 4]], dtype=np.int32)  # squares overflow int32
    want = (emb / np.linalg.norm(emb, axis=-1, keepdims=True)).astype(np.float32)
    assert np.array_equal(l2_normalize(emb), want)
