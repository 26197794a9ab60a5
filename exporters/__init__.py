"""exporters: Hugging Face model → ONNX bundle (→ precision passes → TensorRT), verified."""

from exporters.pipeline import export

__all__ = ["export"]
