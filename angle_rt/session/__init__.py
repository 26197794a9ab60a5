"""Backends: each turns one padded batch into embeddings; `open_session` picks one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from angle_rt.errors import BackendUnavailableError
from angle_rt.session.base import Session
from angle_rt.session.onnxrt import OrtSession

BACKENDS = ("auto", "cpu", "cuda")


def default_device(backend: str | Callable[[Path], Session]) -> str:
    """"cuda" when `backend` allows it and onnxruntime-gpu sees a GPU, else "cpu"."""
    if backend == "cpu" or callable(backend):
        return "cpu"
    from angle_rt._imports import lazy_import

    providers = lazy_import("onnxruntime").get_available_providers()
    return "cuda" if "CUDAExecutionProvider" in providers else "cpu"


def open_session(
    path: str | Path, backend: str | Callable[[Path], Session] = "auto",
    intra_op_threads: int | None = None,
) -> Session:
    """Open the model file at `path` on `backend`: "auto", "cpu", "cuda", or a callable
    that takes the path and returns a Session (a loader of your own)."""
    if callable(backend):
        return backend(Path(path))
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path = Path(path)
    if path.suffix == ".plan":
        raise BackendUnavailableError(
            f"{path.name} is a TensorRT engine; this angle_rt has no TensorRT backend yet. "
            "Open the bundle's model.onnx instead"
        )
    return OrtSession(path, device=backend, intra_op_threads=intra_op_threads)


__all__ = ["BACKENDS", "OrtSession", "Session", "default_device", "open_session"]
