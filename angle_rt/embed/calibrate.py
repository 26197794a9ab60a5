"""`angle-rt calibrate`: int8/uint8 ranges from a sample of a corpus, written once and
passed to every shard's job (`--output-ranges`) and to the server (`--output-ranges`), so
all of them quantize with one code book."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from angle_rt.embed.errors import InputError
from angle_rt.embed.readers import bad_reason, open_input
from angle_rt.encoder import Encoder
from angle_rt.quantization import calibration_ranges

DEFAULT_ROWS = 10_000


def sample_texts(input: str | Path, rows: int, text_column: str = "text") -> list[str]:
    """About `rows` good texts spread evenly over INPUT (every k-th row, k from its row
    count); bad rows (null, non-str, invalid Unicode) are passed over."""
    if rows < 2:
        raise ValueError(f"a calibration sample needs ≥ 2 rows, got {rows}")
    reader = open_input(input, text_column, None)
    total = reader.count_rows() or rows
    step = max(1, total // rows)
    texts: list[str] = []
    for chunk in reader.chunks(4096):
        for k, text in enumerate(chunk.texts):
            if (chunk.start + k) % step == 0 and bad_reason(text) is None:
                texts.append(text)
        if len(texts) >= rows:
            break
    if len(texts) < 2:
        raise InputError(f"{input} has fewer than 2 good rows to calibrate on")
    return texts[:rows]


def calibrate_file(bundle: str | Path, input: str | Path, output: str | Path, *,
                   rows: int = DEFAULT_ROWS, text_column: str = "text",
                   precision: str | None = None, layers: int | None = None,
                   **encode_kwargs: Any) -> np.ndarray:
    """Encode a sample of INPUT as the embed job would (same prompt, normalize, dimensions:
    `encode_kwargs`) and write its per-dimension (min, max) to OUTPUT (.npy, (2, dim)
    float32); returns the ranges."""
    output = Path(output)
    if output.suffix != ".npy":
        raise ValueError(f"{output}: ranges are written as .npy")
    texts = sample_texts(input, rows, text_column)
    with Encoder(bundle, precision=precision, layers=layers) as enc:
        ranges = calibration_ranges(enc.encode(texts, **encode_kwargs))
    tmp = output.with_name(output.name + ".tmp.npy")
    np.save(tmp, ranges)
    os.replace(tmp, output)
    return ranges
