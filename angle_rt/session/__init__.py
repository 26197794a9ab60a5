"""Backends, and which artifact runs where: TensorRT engine → ONNX Runtime CUDA →
ONNX Runtime CPU, with a warning at each fallback that was not asked for."""

from __future__ import annotations

import platform
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

from angle_rt._imports import lazy_import
from angle_rt.errors import BackendUnavailableError
from angle_rt.manifest import Artifact, Manifest
from angle_rt.session.base import Session
from angle_rt.session.onnxrt import OrtSession

CPUINFO = Path("/proc/cpuinfo")
BACKENDS = ("auto", "tensorrt", "cuda", "cpu")
Backend = str | Callable[[Path], Session]
# Default artifact per device, best first: reduced precision where its kernels are fast
# (CPU: INT8; GPU: FP16/BF16), fp32 otherwise.
PREFERENCE = {
    "tensorrt": ("fp16", "int8", "bf16", "fp32"),
    "cuda": ("fp16", "bf16", "int8", "fp32"),
    "cpu": ("int8-dynamic", "int8", "fp32"),
}


def ort_cuda_available() -> bool:
    providers = lazy_import("onnxruntime").get_available_providers()
    return "CUDAExecutionProvider" in providers


def select(manifest: Manifest, file: str | None, precision: str | None,
           backend: Backend) -> tuple[Artifact, Backend]:
    """The artifact to run and where: (artifact, "tensorrt" | "cuda" | "cpu" | loader)."""
    art, device = _select(manifest, file, precision, backend)
    if device == "cpu" and art.precision.startswith("int8") and not int8_exact_here(art):
        _warn(f"{art.file} stores int8 weights at full range, whose sums saturate on this CPU "
              "(no VNNI): its vectors differ from those its gate measured; re-export it with "
              "this angle_rt (its int8 weights compute exactly on every x86 host)",
              stacklevel=4)
    return art, device


def int8_exact_here(art: Artifact) -> bool:
    """Whether ONNX Runtime's CPU INT8 kernels sum `art`'s products exactly on this host:
    always when each pair of weights along K sums to at most 128 in magnitude (this
    exporter's); otherwise only with VNNI/AMX (or off x86), since AVX2's u8·s8 pair sums
    saturate in int16."""
    return (art.quantization or {}).get("weight_pair_max", 254) <= 128 or int8_sums_exact()


def int8_sums_exact() -> bool:
    """Whether this CPU's ONNX Runtime INT8 kernels sum full-range weights exactly: off x86,
    or with VNNI/AMX (True when it cannot tell)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    try:
        flags = CPUINFO.read_text().split()
    except OSError:
        return True
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def _select(manifest: Manifest, file: str | None, precision: str | None,
            backend: Backend) -> tuple[Artifact, Backend]:
    if not callable(backend) and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or a loader, got {backend!r}")
    if file is not None:
        art = manifest.artifact(file)
        if precision is not None and art.precision != precision:
            raise ValueError(f"{file} is {art.precision}, not the requested {precision}")
        if not art.batch_invariant:  # asked for by its file: run, but say so
            _warn_batch_dependent(art)
        if art.format == "tensorrt":
            _require_engine(art, backend)
            return art, "tensorrt"
        return art, backend if callable(backend) else _onnx_device(backend)
    if backend in ("auto", "tensorrt"):
        art, problems = _usable_engine(manifest, precision)
        if art is not None:
            return art, "tensorrt"
        if backend == "tensorrt":
            raise BackendUnavailableError("no usable TensorRT engine: " + "; ".join(problems))
        if problems and any(a.format == "tensorrt" for a in manifest.artifacts):
            _warn("TensorRT engine not used (" + "; ".join(problems) + "); falling back to "
                  "ONNX Runtime")
    device = backend if callable(backend) else _onnx_device(backend)
    return _onnx_artifact(manifest, precision, "cpu" if callable(device) else device), device


def open_session(path: str | Path, device: Backend, dim: int,
                 intra_op_threads: int | None = None,
                 ort_config: Mapping[str, str] | None = None) -> Session:
    """Open `path` on the device `select` chose (or with a loader of your own);
    `ort_config`: ONNX Runtime session config entries (ignored by TensorRT)."""
    if callable(device):
        return device(Path(path))
    if device == "tensorrt":
        from angle_rt.session.trt import TrtSession

        return TrtSession(path, dim)
    return OrtSession(path, device=device, intra_op_threads=intra_op_threads, config=ort_config)


def _onnx_device(backend: str) -> str:
    if backend == "cpu":
        return "cpu"
    if ort_cuda_available():
        return "cuda"
    if backend == "cuda":
        raise BackendUnavailableError(
            "backend='cuda' needs onnxruntime-gpu with a CUDA device: replace onnxruntime with "
            "it (pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu), "
            "or use backend='cpu'")
    if gpu_visible():
        _warn("a CUDA GPU is present but this onnxruntime has no CUDA execution provider; "
              "running on CPU (replace onnxruntime with onnxruntime-gpu to use the GPU)",
              stacklevel=6)
    return "cpu"


def gpu_visible() -> bool:
    """Whether this machine has an NVIDIA GPU: cuda-python sees one, or the driver's device
    node exists (cuda-python need not be installed)."""
    from angle_rt.session.cuda_mem import cuda_available

    return Path("/dev/nvidiactl").exists() or cuda_available() is None


def _onnx_artifact(manifest: Manifest, precision: str | None, device: str) -> Artifact:
    from angle_rt.errors import BundleError

    onnx = {a.precision: a for a in manifest.artifacts if a.format == "onnx"}
    if precision in onnx:
        art = onnx[precision]
        if not art.batch_invariant:
            _warn_batch_dependent(art, stacklevel=7)
        return art
    for want in () if precision else PREFERENCE[device]:
        # never a default that gives a text another vector depending on its batch
        if want in onnx and onnx[want].batch_invariant:
            return onnx[want]
    have = ", ".join(f"{a.file} ({a.precision})" for a in manifest.artifacts)
    raise BundleError(f"bundle has no {precision or 'usable'} ONNX artifact (it has: {have}); "
                      "re-export with the precision you need")


def _usable_engine(manifest: Manifest, precision: str | None) -> tuple[Artifact | None,
                                                                       list[str]]:
    engines = [a for a in manifest.artifacts if a.format == "tensorrt"
               and (a.precision == precision if precision else a.batch_invariant)]
    if not engines:
        return None, ["the bundle has no engine" + (f" for {precision}" if precision else "")]
    from angle_rt.session.trt import tensorrt_available

    reason = tensorrt_available()
    if reason is not None:
        return None, [reason]
    order = PREFERENCE["tensorrt"]
    problems = []
    for art in sorted(engines, key=lambda a: order.index(a.precision)
                      if a.precision in order else len(order)):
        problem = _incompatibility(art)
        if problem is None:
            return art, []
        problems.append(f"{art.file}: {problem}")
    return None, problems


def _require_engine(art: Artifact, backend: Backend) -> None:
    if backend not in ("auto", "tensorrt"):
        raise ValueError(f"{art.file} is a TensorRT engine; backend={backend!r} cannot run it")
    from angle_rt.session.trt import tensorrt_available

    reason = tensorrt_available()
    if reason is not None:
        raise BackendUnavailableError(f"{art.file} needs TensorRT and a CUDA GPU: {reason}. "
                                      "Pass the bundle directory to fall back to ONNX Runtime")
    problem = _incompatibility(art)
    if problem is not None:
        from angle_rt.errors import BundleError

        raise BundleError(f"{art.file} cannot run here: {problem}")


def _incompatibility(art: Artifact) -> str | None:
    """Why a TensorRT engine cannot run on this machine (TensorRT version, GPU) and how to
    rebuild it, or None; TensorRT and CUDA are known to be usable."""
    from angle_rt.session.cuda_mem import gpu_info
    from angle_rt.session.trt import engine_problem

    problem = engine_problem(art.engine or {}, lazy_import("tensorrt").__version__, gpu_info())
    if problem is None:
        return None
    return (f"{problem}; rebuild it here with `angle-export build-engine BUNDLE --precision "
            f"{art.precision}`")


def _warn_batch_dependent(art: Artifact, stacklevel: int = 6) -> None:
    _warn(f"{art.file} is not batch-invariant (activation scales per batch: a text's vector "
          "depends on what shares its batch); re-export it with this angle_rt for per-token "
          "scales", stacklevel=stacklevel)


def _warn(message: str, stacklevel: int = 5) -> None:
    """Warn at the caller of Encoder(...) (_select → select → Encoder.__init__ → caller)."""
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


__all__ = ["BACKENDS", "PREFERENCE", "OrtSession", "Session", "open_session", "select"]
