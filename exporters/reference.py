"""A Session on onnx's reference evaluator: slow numpy, but it runs BF16 graphs that
ONNX Runtime's CPU provider has no kernels for, so the gate can still check them here."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx

from angle_rt.manifest import INPUT_NAMES
from angle_rt.session.base import Session

MAX_REFERENCE_PARAMS = 100_000_000  # beyond this the evaluator is too slow to be useful


def parameter_count(path: Path) -> int:
    """Number of weights in an ONNX graph (initializers), without loading external data."""
    model = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


class ReferenceSession(Session):
    """onnx.reference.ReferenceEvaluator behind the Session interface."""

    name = "onnx-reference"

    def __init__(self, path: Path) -> None:
        from onnx.reference import ReferenceEvaluator

        self._ev = ReferenceEvaluator(str(path))
        self._lock = threading.Lock()  # the evaluator keeps per-run state

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with self._lock:
            out = self._ev.run(None, dict(zip(INPUT_NAMES, (input_ids, attention_mask),
                                               strict=True)))[0]
        return np.asarray(out, dtype=np.float32)
