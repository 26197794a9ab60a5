"""TensorRT optimization profiles as data: building them, choosing one per batch.

Pure Python so that both the exporter (which builds engines) and the runtime (which picks
a profile for each batch) share it, and the CPU tests check it without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from angle_rt.errors import BundleError
from angle_rt.manifest import INPUT_NAMES, OUTPUT_NAME

DEFAULT_BUCKETS = (32, 64, 128, 256, 512)


@dataclass(frozen=True)
class ShapeProfile:
    """(batch, sequence) ranges for input_ids and attention_mask; kernels tuned at `opt`."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    def fits(self, batch: int, seq: int) -> bool:
        return (self.min[0] <= batch <= self.max[0]) and (self.min[1] <= seq <= self.max[1])

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapeProfile:
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


def sequence_profiles(max_length: int, min_batch: int = 1, opt_batch: int = 32,
                      max_batch: int = 128,
                      buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> list[ShapeProfile]:
    """One profile per sequence bucket: bucket k covers (bucket k-1, bucket k] tokens.

    >>> [p.max for p in sequence_profiles(100, buckets=(32, 64, 128))]
    [(128, 32), (128, 64), (128, 100)]
    >>> sequence_profiles(100, buckets=(32, 64, 128))[1].min
    (1, 33)
    """
    if min_batch != 1:  # a last chunk or a lone request is one text
        raise ValueError(f"min_batch must be 1: the runtime runs batches of any size from 1 "
                         f"(got {min_batch})")
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 ≤ min_batch ≤ opt_batch ≤ max_batch, got "
                         f"{min_batch}, {opt_batch}, {max_batch}")
    edges = sorted({b for b in buckets if 0 < b < max_length} | {max_length})
    profiles, low = [], 1
    for high in edges:
        profiles.append(ShapeProfile((min_batch, low), (opt_batch, high), (max_batch, high)))
        low = high + 1
    return profiles


def choose_profile(profiles: list[ShapeProfile], batch: int, seq: int) -> int:
    """Index of the profile that fits (batch, seq) with the smallest sequence range."""
    fitting = [i for i, p in enumerate(profiles) if p.fits(batch, seq)]
    if not fitting:
        ranges = ", ".join(f"batch {p.min[0]}-{p.max[0]} × seq {p.min[1]}-{p.max[1]}"
                           for p in profiles)
        raise BundleError(f"no optimization profile of this engine fits batch {batch} × "
                          f"sequence {seq} (profiles: {ranges}); rebuild the engine with "
                          "larger --max-batch / --max-length")
    return min(fitting, key=lambda i: profiles[i].max[1] - profiles[i].min[1])


def max_shapes(profiles: list[ShapeProfile]) -> tuple[int, int]:
    """Largest batch and sequence over all profiles: what device buffers are sized for."""
    return max(p.max[0] for p in profiles), max(p.max[1] for p in profiles)


def buffer_bytes(profiles: list[ShapeProfile], dim: int, id_itemsize: int) -> dict[str, int]:
    """Bytes for each I/O buffer at the largest profile.

    >>> buffer_bytes([ShapeProfile((1, 1), (8, 64), (16, 128))], dim=384, id_itemsize=8)
    {'input_ids': 16384, 'attention_mask': 16384, 'embedding': 24576}
    """
    batch, seq = max_shapes(profiles)
    ids = batch * seq * id_itemsize
    return {**dict.fromkeys(INPUT_NAMES, ids), OUTPUT_NAME: batch * dim * 4}
