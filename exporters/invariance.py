"""One text, one vector: an artifact's vectors must not depend on what shares their batch.

The parity gate compares whole batches with torch, so it cannot see a vector that changes
with its neighbours (ONNX Runtime's per-tensor dynamic INT8 does: one activation scale per
batch). This check runs each text alone, then inside batches of other sizes and orders (by
length, shuffled, beside a max_length text), and compares each text with itself.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from angle_rt.errors import ParityError
from exporters.verify import compare

if TYPE_CHECKING:
    from angle_rt import Encoder

# A text alone vs in any batch, per-row cosine. Float kernels may pick other blockings per
# batch shape, and a last-bit difference upstream can flip a rounding in reduced precision:
# bf16 (8-bit mantissa) reached 0.99974 on the tiny random Llama (onnx reference evaluator),
# fp16 and the INT8 schemes ≥ 0.99999 on MiniLM (ONNX Runtime CPU).
THRESHOLDS = {"fp32": 0.99999, "int8": 0.99999, "int8-dynamic": 0.99999, "fp16": 0.9999,
              "bf16": 0.999}
BATCH_SIZES = (7, 64)
DEFAULT_TEXTS = 128


class InvarianceError(ParityError):
    """The artifact gives a text another vector depending on its batch: no per-layer
    refinement fixes that, the quantization scheme must change."""


def invariance_rows(lengths: list[int], n: int) -> list[int]:
    """`n` rows spread over the lengths (shortest and longest kept), in input order.

    >>> invariance_rows([5, 1, 9, 3, 7], 3)
    [1, 2, 4]
    """
    if n >= len(lengths):
        return list(range(len(lengths)))
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    picks = {order[round(j * (len(order) - 1) / max(n - 1, 1))] for j in range(n)}
    return sorted(picks)


def layouts(lengths: list[int], seed: int = 0) -> dict[str, list[list[int]]]:
    """Batchings of rows 0..n-1 to compare with each row alone: each batch size sorted by
    length and shuffled, and batches of BATCH_SIZES[0] - 1 rows beside the longest row."""
    n = len(lengths)
    rng = np.random.default_rng(seed)
    by_length = sorted(range(n), key=lambda i: lengths[i])
    longest = by_length[-1]
    out = {}
    for bs in BATCH_SIZES:
        shuffled = rng.permutation(n).tolist()
        out[f"{bs} by length"] = [by_length[i:i + bs] for i in range(0, n, bs)]
        out[f"{bs} shuffled"] = [shuffled[i:i + bs] for i in range(0, n, bs)]
    small = BATCH_SIZES[0] - 1
    rest = [i for i in rng.permutation(n).tolist() if i != longest]
    out[f"{small} + the longest"] = [[*rest[i:i + small], longest]
                                     for i in range(0, len(rest), small)]
    return out


def run_all(enc: Encoder, groups: list[list[list[list[int]]]]) -> list[list[np.ndarray]]:
    """Every batch of every group through `enc.run_batch`, `enc.streams` batches at a time
    as `encode` runs them (each run on its own threads: a batch's vectors are the same run
    alone or beside another; the check took a minute an artifact on one core of MiniLM)."""
    flat = [batch for group in groups for batch in group]
    if enc.streams > 1:
        with ThreadPoolExecutor(enc.streams) as pool:
            outs = list(pool.map(enc.run_batch, flat))
    else:
        outs = [enc.run_batch(batch) for batch in flat]
    it = iter(outs)
    return [[next(it) for _ in group] for group in groups]


def check_invariance(enc: Encoder, texts: list[str], precision: str,
                     n_texts: int = DEFAULT_TEXTS, threshold: float | None = None,
                     label: str | None = None) -> dict[str, Any]:
    """Each of `n_texts` texts (spread over lengths) alone vs in every layout; the report,
    or InvarianceError when the worst per-row cosine is under `threshold` (default: the
    precision's). `label` names the artifact in the message (default: the Encoder's)."""
    ids = enc.tokenize(texts, enc.template())
    rows = invariance_rows([len(r) for r in ids], n_texts)
    ids = [ids[i] for i in rows]
    plans = layouts([len(r) for r in ids])
    runs = run_all(enc, [[[r] for r in ids]] + [[[ids[i] for i in b] for b in batches]
                                                   for batches in plans.values()])
    alone = np.concatenate(runs[0])
    if threshold is None:
        threshold = THRESHOLDS.get(precision, THRESHOLDS["fp32"])
    worst, worst_layout, worst_row = 1.0, "", 0
    for (name, batches), outs in zip(plans.items(), runs[1:], strict=True):
        got = np.empty_like(alone)
        for batch, out in zip(batches, outs, strict=True):
            got[batch] = out
        report = compare(alone, got, threshold)
        if report.min_cosine < worst or not np.isfinite(got).all():
            worst, worst_layout = report.min_cosine, name
            worst_row = rows[report.worst[0]]
    info = {"min_cosine": worst, "threshold": threshold, "n_texts": len(ids),
            "batch_sizes": list(BATCH_SIZES), "layouts": list(layouts([0]).keys()),
            "worst_layout": worst_layout, "passed": worst >= threshold}
    if not info["passed"]:
        raise InvarianceError(
            f"{label or enc.artifact.file} is not batch-invariant: a text alone vs in a batch "
            f"({worst_layout}) gives min cosine {worst:.6f} (threshold {threshold}); worst "
            f"text: {texts[worst_row][:80]!r}. Its vectors depend on what shares their batch "
            "(e.g. per-tensor dynamic activation scales): use a per-token or static scheme")
    return info
