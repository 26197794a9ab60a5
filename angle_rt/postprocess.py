"""What follows the graph: Matryoshka truncation and L2 normalization (pooling is in the graph)."""

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
    norm = np.linalg.norm(emb, axis=-1, keepdims=True)
    return (emb / np.maximum(norm, eps)).astype(np.float32, copy=False)
