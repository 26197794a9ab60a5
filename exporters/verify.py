"""Parity figures: each precision's threshold, the per-row cosine report of an artifact
against its reference, and the failure message naming the worst sentences (the gates that
use them: exporters/gates.py for exports, exporters/engines.py for TensorRT engines)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from angle_rt.errors import ParityError
from angle_rt.postprocess import cosine_rows

# Per-sentence cosine to torch fp32 that each precision must reach (docs/precision.md).
THRESHOLDS = {"fp32": 0.99999, "fp16": 0.999, "bf16": 0.99, "int8": 0.98,
              "int8-dynamic": 0.98}


@dataclass(frozen=True)
class ParityReport:
    """How closely `got` follows `ref`, one cosine per sentence."""

    n: int
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float
    non_finite: int
    threshold: float
    worst: list[int]

    @property
    def passed(self) -> bool:
        return self.non_finite == 0 and self.min_cosine >= self.threshold

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def compare(ref: np.ndarray, got: np.ndarray, threshold: float) -> ParityReport:
    """Per-row cosine (float64), max |diff| and non-finite rows of `got` against `ref`."""
    if ref.shape != got.shape:
        raise ParityError(f"shape mismatch: reference {ref.shape}, exported {got.shape}")
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(got64).all(axis=1) & np.isfinite(ref64).all(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows are set to -1
        cos = np.where(finite, cosine_rows(ref64, got64), -1.0)
    worst = np.argsort(cos)[:5]
    return ParityReport(
        n=len(ref), min_cosine=float(cos.min(initial=1.0)), mean_cosine=float(cos.mean()),
        max_abs_diff=float(np.abs(np.nan_to_num(got64 - ref64, nan=np.inf)).max(initial=0)),
        non_finite=int((~finite).sum()), threshold=threshold, worst=worst.tolist())


def explain(report: ParityReport, texts: list[str], label: str) -> str:
    """A failure message: what diverged, by how much, on which sentences."""
    lines = [f"{label} parity failed on {report.n} sentences: min cosine "
             f"{report.min_cosine:.6f} (threshold {report.threshold}), mean "
             f"{report.mean_cosine:.6f}, max |diff| {report.max_abs_diff:.3g}, "
             f"non-finite rows {report.non_finite}. Worst sentences:"]
    lines += [f"  [{i}] {texts[i][:100]!r}" for i in report.worst]
    return "\n".join(lines)
