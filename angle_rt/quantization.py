"""Embedding quantization: float vectors → float16 / int8 / uint8 / packed sign bits.

Numpy only. Semantics are those of sentence-transformers' ``quantize_embeddings``
(``sentence_transformers/util/quantization.py``): int8/uint8 map each dimension's
[min, max] range (from ``ranges``, calibration embeddings, or the embeddings themselves)
onto 256 buckets; binary/ubinary keep the sign bit (``x > 0``) of each dimension, packed
8 per byte (binary as int8, offset by -128). float16 is angle_rt's addition.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
           "binary": np.int8, "ubinary": np.uint8}


def check_precision(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else ValueError listing them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                         f"got {precision!r}")
    return precision


def needs_ranges(precision: str) -> bool:
    """True for the scalar precisions (int8, uint8) that need calibrated ranges."""
    return check_precision(precision) in ("int8", "uint8")


def quantized_dtype(precision: str) -> np.dtype:
    """The numpy dtype `quantize_embeddings` returns for `precision`."""
    return np.dtype(_DTYPES[check_precision(precision)])


def quantized_width(dim: int, precision: str) -> int:
    """Values per vector after quantization: `dim`, or ceil(dim / 8) for packed bits.

    >>> [quantized_width(d, p) for d, p in ((384, "int8"), (384, "binary"), (20, "ubinary"))]
    [384, 48, 3]
    """
    return (dim + 7) // 8 if check_precision(precision).endswith("binary") else dim


def calibration_ranges(embeddings: np.ndarray) -> np.ndarray:
    """(2, dim) float32: each dimension's minimum and maximum over `embeddings` (n ≥ 2)."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise ValueError("int8/uint8 ranges need at least 2 embeddings to calibrate on, got "
                         f"shape {emb.shape}; pass `ranges` or `calibration_embeddings`")
    return np.vstack((emb.min(axis=0), emb.max(axis=0))).astype(np.float32)


def quantize_embeddings(
    embeddings: np.ndarray,
    precision: str,
    ranges: np.ndarray | None = None,
    calibration_embeddings: np.ndarray | None = None,
) -> np.ndarray:
    """Quantize float embeddings (n, dim) — or one vector (dim,) — to `precision`.

    int8 / uint8 use `ranges` ((2, dim): per-dimension min and max) if given, else the
    ranges of `calibration_embeddings`, else of `embeddings` themselves (compute them once
    with `calibration_ranges` and reuse them for a whole corpus). binary / ubinary return
    ceil(dim / 8) bytes per vector.

    >>> e = np.array([[-1.0, 0.5, 0.0], [1.0, -0.5, 2.0]], dtype=np.float32)
    >>> quantize_embeddings(e, "ubinary").tolist(), quantize_embeddings(e, "binary").tolist()
    ([[64], [160]], [[-64], [32]])
    >>> quantize_embeddings(e, "uint8", ranges=np.array([[-2, -2, -2], [2, 2, 2]])).tolist()
    [[63, 159, 127], [191, 95, 254]]
    """
    check_precision(precision)
    emb = np.asarray(embeddings)
    if emb.dtype.kind not in "f":
        raise TypeError(f"embeddings to quantize must be float, not {emb.dtype}")
    if precision == "float32":
        return emb.astype(np.float32)
    if precision == "float16":
        return emb.astype(np.float16)
    if precision == "binary":
        return (np.packbits(emb > 0, axis=-1) - 128).astype(np.int8)
    if precision == "ubinary":
        return np.packbits(emb > 0, axis=-1)
    if ranges is None:
        ranges = calibration_ranges(emb if calibration_embeddings is None
                                    else calibration_embeddings)
    ranges = np.asarray(ranges).astype(np.float32, copy=False)
    if ranges.shape != (2, emb.shape[-1]):
        raise ValueError(f"ranges must have shape (2, {emb.shape[-1]}), got {ranges.shape}")
    starts = ranges[0]
    steps = (ranges[1] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    buckets = np.clip(np.floor((emb - starts) / steps), 0, 255)
    if precision == "uint8":
        return buckets.astype(np.uint8)
    return (buckets - 128).astype(np.int8)


def read_ranges(path: str | Path) -> np.ndarray:
    """int8/uint8 ranges saved for reuse: a (2, dim) `.npy` (e.g. `calibration_ranges` of a
    sample), or a JSON job record of `angle-rt embed` (`vectors.npy.json`,
    `_angle_rt_embed.json`) with its `"ranges"`. ValueError says what is wrong."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            ranges = np.load(path, allow_pickle=False)
        else:
            record = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or record.get("ranges") is None:
                raise ValueError("it holds no \"ranges\" (was the job int8 or uint8?)")
            ranges = np.asarray(record["ranges"], dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read int8/uint8 ranges from {path}: {exc}") from None
    if ranges.ndim != 2 or ranges.shape[0] != 2 or ranges.dtype.kind != "f":
        raise ValueError(f"{path}: ranges must be a float (2, dim) array, got "
                         f"{ranges.dtype} {ranges.shape}")
    return ranges.astype(np.float32)
