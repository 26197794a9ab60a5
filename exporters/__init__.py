"""exporters: Hugging Face model → ONNX bundle (→ precision passes → TensorRT), verified."""

from exporters.export import export

__all__ = ["export"]
