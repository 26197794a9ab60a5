"""What follows the graph: Matryoshka truncation, L2 normalization (pooling is in the graph),
and the row cosine that parity gates and STS scores use."""

from __future__ import annotations

import numpy as np


def truncate_dims(emb: np.ndarray, dim: int | None) -> np.ndarray:
    """Keep the first `dim` dimensions (Matryoshka); None keeps all."""
    if dim is None:
        return emb
    full = emb.shape[-1]
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or not 0 < dim <= full:
        raise ValueError(f"truncate_dim must be an int in 1..{full}, got {dim!r}")
    return emb[..., :dim]


def l2_normalize(emb: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm; an all-zero row stays zero.

    >>> l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    # np.linalg.norm's own arithmetic for a real axis norm, without its other checks (µs a
    # served request): the same bits
    emb = np.asarray(emb)
    if not np.issubdtype(emb.dtype, np.inexact):
        emb = emb.astype(float)  # as norm does: no integer overflow in the squares
    norm = np.sqrt(np.add.reduce(emb * emb, axis=-1, keepdims=True))
    return (emb / np.maximum(norm, eps)).astype(np.float32, copy=False)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows, in float64.

    >>> cosine_rows(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[2.0, 0.0], [-1.0, -1.0]]))
    array([ 1., -1.])
    """
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return (a64 * b64).sum(axis=1) / np.maximum(den, 1e-30)
