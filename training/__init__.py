"""training: the PyTorch AnglE model (backbone + pooling) that exporters trace.

`training.fit(model, train=..., **settings)` is the Python API (training.fit.train_model);
the module imports on first use, so `python -m training.fit` runs it only once.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name == "fit":  # the callable module
        return importlib.import_module("training.fit")
    raise AttributeError(f"module 'training' has no attribute {name!r}")
