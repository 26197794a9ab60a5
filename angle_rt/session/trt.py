"""TensorRT backend: a deserialized engine, a pool of execution contexts with their own
CUDA stream and buffers, and the smallest optimization profile that fits each batch.

Memory and streams go through cuda-python (`cuda.bindings.runtime`), never torch.
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import numpy as np

from angle_rt._imports import lazy_import
from angle_rt.errors import BackendUnavailableError, BundleError
from angle_rt.manifest import INPUT_NAMES, OUTPUT_NAME
from angle_rt.profiles import ShapeProfile, buffer_bytes, choose_profile, max_shapes
from angle_rt.session.base import Session
from angle_rt.session.cuda_mem import CudaBuffers, cuda_available


def engine_problem(info: dict[str, Any], trt_version: str, gpu: dict[str, str]) -> str | None:
    """Why an engine built as `info` says cannot run here, or None if it can.

    >>> built = {"tensorrt_version": "10.8.0.43", "compute_capability": "9.0",
    ...          "gpu_name": "NVIDIA H100"}
    >>> engine_problem(built, "10.8.0.43", {"compute_capability": "9.0", "gpu_name": "x"})
    >>> "TensorRT 10.7.0.23" in engine_problem(built, "10.7.0.23", {"compute_capability": "9.0"})
    True
    """
    if info.get("tensorrt_version") != trt_version:
        return (f"it was built with TensorRT {info.get('tensorrt_version')}, this machine "
                f"has TensorRT {trt_version}")
    if info.get("compute_capability") != gpu.get("compute_capability"):
        return (f"it was built for {info.get('gpu_name')} (compute capability "
                f"{info.get('compute_capability')}), this GPU is {gpu.get('gpu_name')} "
                f"(compute capability {gpu.get('compute_capability')})")
    return None


class _Slot:
    """One execution context bound to its own stream and buffers.

    Profile rule (TensorRT 10 `IExecutionContext::setOptimizationProfileAsync`, NvInferRuntime.h
    / the Python API's `set_optimization_profile_async`): a context is not thread-safe, so one
    thread uses a slot at a time; each context selects its own profile on its own stream
    before `set_input_shape`, and the switch must be ordered with the enqueue that follows (here
    both go on the slot's stream). Several contexts may select the same profile at once: the
    "profile unique to one context" rule of TensorRT ≤ 8.0 is gone, so there is no lock per
    profile and concurrent batches of one length bucket run in parallel.
    """

    def __init__(self, engine: Any, sizes: dict[str, int], id_dtype: type) -> None:
        self.profile: int | None = None  # set explicitly before the first batch
        self.mem: CudaBuffers | None = None
        self.ctx = engine.create_execution_context()
        if self.ctx is None:
            raise BackendUnavailableError("TensorRT could not create an execution context "
                                          "(out of GPU memory?)")
        try:
            self.mem = CudaBuffers(sizes, {name: np.float32 if name == OUTPUT_NAME else id_dtype
                                           for name in sizes})
            for name in sizes:
                if not self.ctx.set_tensor_address(name, self.mem.device[name]):
                    raise BundleError(f"the engine has no I/O tensor named {name!r}; rebuild "
                                      "it with `angle-export build-engine BUNDLE`")
        except BaseException:
            self.close()  # a traceback must not keep the context alive
            raise

    def infer(self, ids: np.ndarray, mask: np.ndarray, profile: int, dim: int) -> np.ndarray:
        stream = int(self.mem.stream)
        if profile != self.profile:
            if not self.ctx.set_optimization_profile_async(profile, stream):
                raise RuntimeError(f"TensorRT refused optimization profile {profile}")
            self.profile = profile
        for name, arr in zip(INPUT_NAMES, (ids, mask), strict=True):
            self.mem.upload(name, arr)
            if not self.ctx.set_input_shape(name, tuple(arr.shape)):
                raise RuntimeError(f"TensorRT refused shape {arr.shape} for {name} "
                                   f"(profile {profile})")
        if not self.ctx.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return self.mem.download(OUTPUT_NAME, (ids.shape[0], dim))

    def close(self) -> None:
        """Destroy the context first (it refers to the buffers), then free the buffers."""
        self.ctx = None
        if self.mem is not None:
            self.mem.close()


class TrtSession(Session):
    """Deserialize once; `workers` contexts serve concurrent calls (one per thread at a
    time); batches larger than the engine's largest profile are split, and the encoder
    never pads wider than the largest profile (`max_width`)."""

    name = "tensorrt"
    pad_multiple = 8
    batch_cost = 512  # as onnxrt.GPU_BATCH_COST: an estimate, not a GPU measurement

    def __init__(self, path: str | Path, dim: int, workers: int = 2) -> None:
        trt = lazy_import("tensorrt")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise BundleError(f"TensorRT {trt.__version__} could not deserialize {path}: it was "
                              "built with another TensorRT version or GPU, or is damaged; "
                              "rebuild it with `angle-export build-engine BUNDLE`")
        self.profiles = [ShapeProfile(*map(tuple, self.engine.get_tensor_profile_shape(
            INPUT_NAMES[0], k))) for k in range(self.engine.num_optimization_profiles)]
        self.input_dtype = np.int32 if self.engine.get_tensor_dtype(INPUT_NAMES[0]) == \
            trt.DataType.INT32 else np.int64
        self.dim = dim
        _check_io(trt, self.engine, dim, path)
        self._max_batch, self.max_width = max_shapes(self.profiles)
        sizes = buffer_bytes(self.profiles, dim, np.dtype(self.input_dtype).itemsize)
        self._slots: queue.Queue[_Slot] = queue.Queue()
        self._all: list[_Slot] = []
        try:
            for _ in range(max(1, workers)):
                self._all.append(_Slot(self.engine, sizes, self.input_dtype))
        except BaseException:
            self.close()  # free the contexts and buffers made before the failure
            raise
        for slot in self._all:
            self._slots.put(slot)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        parts = [self._run_one(input_ids[i:i + self._max_batch],
                               attention_mask[i:i + self._max_batch])
                 for i in range(0, len(input_ids), self._max_batch)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _run_one(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        k = choose_profile(self.profiles, ids.shape[0], ids.shape[1])
        slot = self._slots.get()
        try:
            return slot.infer(ids.astype(self.input_dtype, copy=False),
                              mask.astype(self.input_dtype, copy=False), k, self.dim)
        finally:
            self._slots.put(slot)

    def close(self) -> None:
        """Contexts and their buffers and streams, then the engine and runtime; idempotent."""
        for slot in self._all:
            slot.close()
        self._all.clear()
        self._slots = queue.Queue()
        self.engine = None
        self._runtime = None


def tensorrt_available() -> str | None:
    """None when TensorRT, cuda-python and a CUDA device are all usable, else why not."""
    try:
        lazy_import("tensorrt")
    except BackendUnavailableError as exc:
        return str(exc)
    return cuda_available()


def _check_io(trt: Any, engine: Any, dim: int, path: str | Path) -> None:
    """The buffers assume int32/int64 ids and a mask of the same type, and a float32 output
    `dim` wide: an engine declaring anything else would be read as garbage or overrun them."""
    ids, mask = (engine.get_tensor_dtype(n) for n in INPUT_NAMES)
    out = engine.get_tensor_dtype(OUTPUT_NAME)
    width = int(engine.get_tensor_shape(OUTPUT_NAME)[-1])
    problems = []
    if ids not in (trt.DataType.INT32, trt.DataType.INT64) or mask != ids:
        problems.append(f"inputs {ids.name}/{mask.name} (int32 or int64, both alike)")
    if out != trt.DataType.FLOAT:
        problems.append(f"output {out.name} (float32)")
    if width not in (-1, dim):
        problems.append(f"output width {width} (the manifest's {dim})")
    if problems:
        raise BundleError(f"{path}: this runtime cannot run an engine with " +
                          ", ".join(problems) + "; rebuild it with `angle-export build-engine`")
