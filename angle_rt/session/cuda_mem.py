"""CUDA memory for the TensorRT backend through cuda-python (`cuda.bindings.runtime`): one
stream, a device buffer and a pinned host buffer per named tensor, reused for every batch.

Kept apart from TensorRT so that it is tested on any CUDA machine, TensorRT or not.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from angle_rt._imports import cuda_runtime
from angle_rt.errors import BackendUnavailableError


def check(result: tuple[Any, ...]) -> Any:
    """Unwrap a cuda-python call's (err, value...) tuple, raising on a CUDA error."""
    err, *values = result
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {getattr(err, 'name', err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def cuda_available() -> str | None:
    """None when cuda-python loads and sees a CUDA device, else why not."""
    try:
        count = check(cuda_runtime().cudaGetDeviceCount())
    except (BackendUnavailableError, RuntimeError) as exc:
        return str(exc)
    return None if count > 0 else "no CUDA device is visible"


def gpu_info() -> dict[str, str]:
    """Name and compute capability of the current CUDA device."""
    cudart = cuda_runtime()
    device = check(cudart.cudaGetDevice())
    prop = check(cudart.cudaGetDeviceProperties(device))
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) \
        else str(prop.name)
    return {"gpu_name": name.split("\x00")[0].strip(),
            "compute_capability": f"{prop.major}.{prop.minor}"}


class CudaBuffers:
    """A stream plus, per tensor name, `sizes[name]` bytes on the device and in pinned host
    memory viewed as `dtypes[name]`. Not thread-safe: one owner (an execution context) uses it
    at a time."""

    def __init__(self, sizes: dict[str, int], dtypes: dict[str, type]) -> None:
        self.cudart = cuda_runtime()
        self.sizes = dict(sizes)
        self.stream = check(self.cudart.cudaStreamCreate())
        self.device: dict[str, int] = {}
        self._host_ptr: dict[str, int] = {}
        self.host: dict[str, np.ndarray] = {}
        try:
            for name, n in sizes.items():
                self.device[name] = int(check(self.cudart.cudaMalloc(n)))
                self._host_ptr[name] = int(check(self.cudart.cudaMallocHost(n)))
                self.host[name] = _pinned_array(self._host_ptr[name], n, dtypes[name])
        except Exception:
            self.close()
            raise

    def upload(self, name: str, arr: np.ndarray) -> None:
        """Copy `arr` into the pinned buffer and queue its host→device copy on the stream;
        the pinned buffer must not change again until the stream is synchronized."""
        flat = self._fit(name, arr.size)
        flat[:] = arr.ravel()
        check(self.cudart.cudaMemcpyAsync(self.device[name], self._host_ptr[name],
                                          flat.nbytes, self._kind("HostToDevice"),
                                          self.stream))

    def download(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Queue the device→host copy of `shape` elements, wait for the stream, return a copy
        (the pinned buffer is reused by the next batch)."""
        flat = self._fit(name, int(np.prod(shape)))
        check(self.cudart.cudaMemcpyAsync(self._host_ptr[name], self.device[name],
                                          flat.nbytes, self._kind("DeviceToHost"),
                                          self.stream))
        self.synchronize()
        return flat.reshape(shape).copy()

    def synchronize(self) -> None:
        check(self.cudart.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        """Free everything; safe to call twice and after a failed __init__."""
        for ptr in self.device.values():
            self.cudart.cudaFree(ptr)
        for ptr in self._host_ptr.values():
            self.cudart.cudaFreeHost(ptr)
        self.device.clear()
        self._host_ptr.clear()
        self.host.clear()
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def _fit(self, name: str, n: int) -> np.ndarray:
        host = self.host[name]
        if n > host.size:
            raise ValueError(f"{n} elements do not fit the {host.size}-element buffer "
                             f"'{name}' ({self.sizes[name]} bytes)")
        return host[:n]

    def _kind(self, direction: str) -> Any:
        return getattr(self.cudart.cudaMemcpyKind, f"cudaMemcpy{direction}")


def _pinned_array(ptr: int, nbytes: int, dtype: type) -> np.ndarray:
    ctype = np.ctypeslib.as_ctypes_type(np.dtype(dtype))
    n = nbytes // np.dtype(dtype).itemsize
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctype)), (n,))
