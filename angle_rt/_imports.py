"""The one place that imports optional backends; errors name the extra to install."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from angle_rt.errors import BackendUnavailableError

# module name -> pip extra (or package) that provides it
_EXTRAS = {
    "onnxruntime": "angle-rt (base dependency: pip install onnxruntime)",
    "tensorrt": "angle-rt[gpu]",
    "cuda.bindings": "angle-rt[gpu] (cuda-python)",
    "cuda.bindings.runtime": "angle-rt[gpu] (cuda-python)",
    "cuda.cudart": "angle-rt[gpu] (cuda-python)",
    "tqdm": "tqdm",
}


def is_available(name: str) -> bool:
    """True if `name` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cuda_runtime() -> ModuleType:
    """The CUDA runtime bindings of cuda-python: `cuda.bindings.runtime` (12.6+), else
    the older `cuda.cudart`."""
    if is_available("cuda.bindings"):
        return lazy_import("cuda.bindings.runtime")
    return lazy_import("cuda.cudart")


def lazy_import(name: str) -> ModuleType:
    """Import `name` now, or raise BackendUnavailableError with the install hint."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        hint = _EXTRAS.get(name, name)
        raise BackendUnavailableError(
            f"{name} is required for this backend but could not be imported ({exc}); "
            f"install {hint}"
        ) from exc
