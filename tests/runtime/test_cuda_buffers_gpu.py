"""The TensorRT backend's CUDA layer on a real GPU, TensorRT or not: pinned and device
buffers, the stream, device info. Skipped where cuda-python sees no CUDA device."""

import re
import threading

import numpy as np
import pytest

from angle_rt.profiles import ShapeProfile, buffer_bytes
from angle_rt.session.cuda_mem import CudaBuffers, check, gpu_info

pytestmark = pytest.mark.gpu

PROFILES = [ShapeProfile((1, 1), (32, 64), (64, 128)), ShapeProfile((1, 129), (8, 256),
                                                                      (16, 512))]


def _buffers(id_dtype=np.int32, dim=384) -> CudaBuffers:
    sizes = buffer_bytes(PROFILES, dim, np.dtype(id_dtype).itemsize)
    return CudaBuffers(sizes, {"input_ids": id_dtype, "attention_mask": id_dtype,
                               "embedding": np.float32})


@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_round_trip_through_device_at_every_shape(id_dtype):
    mem = _buffers(id_dtype)
    rng = np.random.default_rng(0)
    try:
        assert mem.host["input_ids"].size == 64 * 512  # the largest batch × sequence
        assert int(mem.stream) != 0  # TensorRT's execute_async_v3 takes the handle as int
        for shape in [(1, 8), (64, 128), (16, 512), (3, 17)]:
            ids = rng.integers(0, 30522, shape).astype(id_dtype)
            mem.upload("input_ids", ids)
            mem.synchronize()  # the pinned buffer may be reused only once the copy is done
            mem.host["input_ids"][:] = -1  # the device copy, not the host one, comes back
            np.testing.assert_array_equal(mem.download("input_ids", shape), ids)
    finally:
        mem.close()
        mem.close()


def test_device_to_device_then_download_like_an_engine_output():
    """What TensorRT does between upload and download: write the output tensor on the
    device. A device→device copy stands in for the engine's kernel."""
    mem = _buffers()
    try:
        vec = np.linspace(-1, 1, 5 * 384, dtype=np.float32).reshape(5, 384)
        mem.upload("embedding", vec)
        check(mem.cudart.cudaMemcpyAsync(
            mem.device["input_ids"], mem.device["embedding"], vec.nbytes,
            mem.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, mem.stream))
        check(mem.cudart.cudaMemsetAsync(mem.device["embedding"], 0, vec.nbytes, mem.stream))
        assert not mem.download("embedding", (5, 384)).any()
        raw = mem.download("input_ids", (5 * 384,))
        np.testing.assert_array_equal(raw.view(np.float32).reshape(5, 384), vec)
    finally:
        mem.close()


def test_buffer_overflow_is_refused_before_any_copy():
    mem = _buffers()
    try:
        with pytest.raises(ValueError, match=r"do not fit .* 'input_ids'"):
            mem.upload("input_ids", np.zeros((65, 512), np.int32))
        with pytest.raises(ValueError, match="'embedding'"):
            mem.download("embedding", (65, 384))
    finally:
        mem.close()


def test_one_stream_per_thread_stays_separate():
    """Eight owners on eight threads, as the TensorRT context pool runs them."""
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        mem = _buffers()
        try:
            rng = np.random.default_rng(seed)
            for _ in range(50):
                shape = (int(rng.integers(1, 65)), int(rng.integers(1, 129)))
                ids = rng.integers(0, 2**31 - 1, shape, dtype=np.int32)
                mem.upload("input_ids", ids)
                np.testing.assert_array_equal(mem.download("input_ids", shape), ids)
        except BaseException as exc:  # re-raised on the main thread
            errors.append(exc)
        finally:
            mem.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_gpu_info_names_the_device():
    info = gpu_info()
    assert info["gpu_name"] and "\x00" not in info["gpu_name"]
    assert re.fullmatch(r"\d+\.\d+", info["compute_capability"])
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        assert info["compute_capability"] == f"{major}.{minor}"
        assert info["gpu_name"] == torch.cuda.get_device_name(0)
