"""Backends: each turns one padded batch into embeddings; `open_session` picks one."""

from __future__ import annotations

from pathlib import Path

from angle_rt.errors import BackendUnavailableError
from angle_rt.session.base import Session
from angle_rt.session.onnxrt import OrtSession

BACKENDS = ("auto", "cpu", "cuda")


def open_session(
    path: str | Path, backend: str = "auto", intra_op_threads: int | None = None
) -> Session:
    """Open the model file at `path` on `backend` ("auto", "cpu" or "cuda")."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path = Path(path)
    if path.suffix == ".plan":
        raise BackendUnavailableError(
            f"{path.name} is a TensorRT engine; this angle_rt has no TensorRT backend yet. "
            "Open the bundle's model.onnx instead"
        )
    return OrtSession(path, device=backend, intra_op_threads=intra_op_threads)


__all__ = ["BACKENDS", "OrtSession", "Session", "open_session"]
