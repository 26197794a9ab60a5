"""ONNX Runtime backend (CPU EP by default; CUDA EP where onnxruntime-gpu is installed)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from angle_rt._imports import lazy_import
from angle_rt._system import physical_cores
from angle_rt.errors import BundleError, ClosedError
from angle_rt.manifest import INPUT_NAMES
from angle_rt.session.base import Session

_ORT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
# One run's fixed cost in padded tokens, per ONNX Runtime thread of the run: the overhead is
# wall time while a token's time shrinks with threads. CPU, measured (MiniLM int8-dynamic,
# EPYC Zen 4): on 2 threads ≈ 1.3 ms a run against ≈ 77 µs a token, i.e. 16 tokens, and 32
# served best (small batches also run each token a little slower; sorted input keeps its
# batches: 83 instead of 80 on STS-B test). On 1 thread, the server's default, served-shape
# windows of 8 / 16 STS-B sentences (benchmarks/served_batches.py) ran 0.77 / 0.78x sorted
# at 16 against 0.70 / 0.77x at 32 on Zen 4, 0.81 / 0.83x against 0.76 / 0.82x on Zen 3.
# GPU: a launch-bound call (≈ 6 ms at batch 1 on an H200 in torch) is worth hundreds of its
# ≈ 4 µs tokens; 512 is a conservative estimate, not a GPU measurement.
CPU_BATCH_COST_PER_THREAD = 16
GPU_BATCH_COST = 512


class OrtSession(Session):
    """One InferenceSession, shared by all threads (ORT's run() is thread-safe)."""

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        intra_op_threads: int | None = None,
        options: dict[str, object] | None = None,
        config: Mapping[str, str] | None = None,
    ) -> None:
        """`options` sets further ort.SessionOptions attributes (e.g. enable_profiling);
        `config` adds session config entries (e.g. ``{"session.intra_op.allow_spinning":
        "0"}``: idle intra-op threads sleep instead of spinning, which a server wants)."""
        ort = lazy_import("onnxruntime")
        providers = _providers(ort, device)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads or physical_cores()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in (options or {}).items():
            setattr(opts, key, value)
        for key, value in (config or {}).items():
            opts.add_session_config_entry(key, str(value))
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise BundleError(
                f"ONNX Runtime could not load {path} ({type(exc).__name__}: {exc}); the file is "
                "damaged or not an angle_rt graph: re-export the bundle"
            ) from exc
        if device == "cuda" and self._sess.get_providers()[0] != "CUDAExecutionProvider":
            warnings.warn(f"ONNX Runtime could not use CUDA for {Path(path).name}; running on "
                          "CPU (check the CUDA/cuDNN libraries onnxruntime-gpu needs)",
                          RuntimeWarning, stacklevel=4)
        self._inputs = [i.name for i in self._sess.get_inputs()]
        self._output = self._sess.get_outputs()[0].name
        if tuple(self._inputs) != INPUT_NAMES:
            raise BundleError(f"{path} has inputs {self._inputs}, expected input_ids, "
                              "attention_mask: re-export with angle-export")
        self.input_dtype = _ORT_TYPES.get(self._sess.get_inputs()[0].type, np.int64)
        self.providers = self._sess.get_providers()
        cuda = self.providers[0] == "CUDAExecutionProvider"
        self.pad_multiple = 8 if cuda else 1
        self.batch_cost = (GPU_BATCH_COST if cuda
                           else CPU_BATCH_COST_PER_THREAD * opts.intra_op_num_threads)
        self.name = "onnxruntime-cuda" if cuda else "onnxruntime-cpu"

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        sess = self._sess
        if sess is None:
            raise ClosedError("this ONNX Runtime session was closed")
        feed = dict(zip(INPUT_NAMES, (input_ids, attention_mask), strict=True))
        return sess.run([self._output], feed)[0]

    @property
    def inference_session(self):
        """The underlying onnxruntime.InferenceSession (profiling, I/O metadata)."""
        if self._sess is None:
            raise ClosedError("this ONNX Runtime session was closed")
        return self._sess

    def close(self) -> None:
        """Drop the InferenceSession (its weights and arenas); idempotent."""
        self._sess = None


def _providers(ort, device: str) -> list[str]:
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
