"""exporters: Hugging Face model → ONNX bundle (→ precision passes → TensorRT), verified."""

from __future__ import annotations

from typing import Any

__all__ = ["export"]


def __getattr__(name: str) -> Any:
    # export() pulls in torch and transformers; load it on first use so that the torch-free
    # helpers (exporters.texts' sentences, say) import without them
    if name == "export":
        from exporters.pipeline import export

        return export
    raise AttributeError(f"module 'exporters' has no attribute {name!r}")
