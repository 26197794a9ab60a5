"""angle_rt: the slim runtime for AnglE sentence embeddings (numpy + tokenizers + ORT)."""

from angle_rt.encoder import Encoder
from angle_rt.errors import (
    AngleRTError,
    BackendUnavailableError,
    BundleError,
    BundleVersionError,
    ChecksumError,
    ClosedError,
    ParityError,
)
from angle_rt.manifest import FORMAT_VERSION, Manifest, read_manifest
from angle_rt.prompts import PROMPTS
from angle_rt.quantization import calibration_ranges, quantize_embeddings

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "PROMPTS",
    "AngleRTError",
    "BackendUnavailableError",
    "BundleError",
    "BundleVersionError",
    "ChecksumError",
    "ClosedError",
    "Encoder",
    "Manifest",
    "ParityError",
    "__version__",
    "calibration_ranges",
    "quantize_embeddings",
    "read_manifest",
]
