"""Contract-checking fakes of `tensorrt` (10.x) and `cuda.bindings.runtime` for CPU tests.

They enforce what the real APIs require of a caller and compute outputs with ONNX Runtime on
the ONNX graph the engine was built from, so the TensorRT session, its context pool and the
engine builder run end to end without a GPU:
- CUDA: device and pinned-host allocations are tracked separately; a copy must go the way its
  kind says, inside the allocations' bounds; async work (copies, `execute_async_v3`) is queued
  on its stream and runs only when that stream is synchronized, so a caller that reads a
  result before synchronizing, or uploads on one stream and runs on another, gets wrong
  numbers; freeing twice or freeing an unknown pointer raises.
- TensorRT runtime: `set_input_shape` must follow the profile selection and fit the selected
  profile (else False, as TensorRT returns); every I/O tensor needs an address, large enough
  for its shape in the engine's declared dtype, before `execute_async_v3`; the profile must be
  switched on the stream that then executes; an execution context is not thread-safe (two
  threads inside one context raise). Engines and contexts created and destroyed are counted,
  so tests can show that `close` releases them.
- TensorRT builder: records the network flags, profiles, workspace, optimization level and
  timing-cache use, and refuses profiles that leave an input unset or are not min ≤ opt ≤ max.

Per TensorRT 10's `IExecutionContext::setOptimizationProfileAsync` docs (NvInferRuntime.h),
several contexts may select the same profile; only TensorRT ≤ 8.0 required a profile to be
unique to one context. The fake allows sharing and counts the most contexts that ran one
profile at the same time, so tests can show that concurrent batches don't serialize.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import importlib.machinery
import json
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

PLAN_MAGIC = b"FAKETRT1"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"


class ContractError(AssertionError):
    """The code under test broke a rule the real API states."""


# ----------------------------------------------------------------------------------- CUDA


class _Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class _Props:
    name = b"Fake GPU (CPU fake)\x00\x00"
    major, minor = 9, 0


class FakeCuda:
    """State of the fake CUDA runtime: allocations, streams and what ran on them."""

    def __init__(self, device_count: int = 1, fail_malloc_after: int | None = None) -> None:
        self.device_count = device_count
        self.fail_malloc_after = fail_malloc_after  # the (n+1)-th cudaMalloc fails
        self.device: dict[int, ctypes.Array] = {}
        self.host: dict[int, ctypes.Array] = {}
        self.streams: dict[int, list] = {}
        self.freed: list = []  # kept alive: queued work may still point at freed memory
        self.mallocs = 0
        self.lock = threading.Lock()
        self._next_stream = 0x5000

    # cuda-python functions return (error, value...) tuples
    def cudaGetDeviceCount(self):
        return (_Err.cudaSuccess, self.device_count)

    def cudaGetDevice(self):
        return (_Err.cudaSuccess, 0)

    def cudaGetDeviceProperties(self, device: int):
        return (_Err.cudaSuccess, _Props())

    def cudaStreamCreate(self):
        with self.lock:
            self._next_stream += 16
            self.streams[self._next_stream] = []
            return (_Err.cudaSuccess, self._next_stream)

    def cudaStreamDestroy(self, stream: int):
        with self.lock:
            if self.streams.pop(int(stream), None) is None:
                raise ContractError(f"cudaStreamDestroy of unknown stream {stream}")
        return (_Err.cudaSuccess,)

    def cudaStreamSynchronize(self, stream: int):
        with self.lock:
            work = self.streams.get(int(stream))
            if work is None:
                raise ContractError(f"cudaStreamSynchronize on unknown stream {stream}")
            pending, work[:] = list(work), []
        for op in pending:
            op()
        return (_Err.cudaSuccess,)

    def cudaMalloc(self, nbytes: int):
        with self.lock:
            self.mallocs += 1
            if self.fail_malloc_after is not None and self.mallocs > self.fail_malloc_after:
                return (_Err.cudaErrorMemoryAllocation, 0)
            return (_Err.cudaSuccess, self._alloc(self.device, nbytes))

    def cudaMallocHost(self, nbytes: int):
        with self.lock:
            return (_Err.cudaSuccess, self._alloc(self.host, nbytes))

    def cudaFree(self, ptr: int):
        return self._free(self.device, ptr, "cudaFree")

    def cudaFreeHost(self, ptr: int):
        return self._free(self.host, ptr, "cudaFreeHost")

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind, stream: int):
        kind = cudaMemcpyKind(int(kind))
        want = {cudaMemcpyKind.cudaMemcpyHostToDevice: (self.device, self.host),
                cudaMemcpyKind.cudaMemcpyDeviceToHost: (self.host, self.device)}.get(kind)
        if want is None:
            raise ContractError(f"unexpected copy kind {kind.name}")
        self._check_range(want[0], dst, nbytes, f"{kind.name} destination")
        self._check_range(want[1], src, nbytes, f"{kind.name} source")
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, nbytes))
        return (_Err.cudaSuccess,)

    # helpers for the fake engine
    def enqueue(self, stream: int, op) -> None:
        with self.lock:
            if int(stream) not in self.streams:
                raise ContractError(f"work queued on unknown or destroyed stream {stream}")
            self.streams[int(stream)].append(op)

    def device_array(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self._check_range(self.device, ptr, nbytes, "tensor address")
        buf = (ctypes.c_char * nbytes).from_address(ptr)
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def live(self) -> dict[str, int]:
        return {"device": len(self.device), "host": len(self.host),
                "streams": len(self.streams)}

    def _alloc(self, table: dict, nbytes: int) -> int:
        buf = ctypes.create_string_buffer(max(1, int(nbytes)) + 256)
        ptr = ctypes.addressof(buf)
        ptr += (-ptr) % 256  # CUDA allocations are 256-byte aligned; TensorRT requires it
        table[ptr] = (buf, int(nbytes))
        return ptr

    def _free(self, table: dict, ptr: int, what: str):
        with self.lock:
            entry = table.pop(int(ptr), None)
            if entry is None:
                raise ContractError(f"{what} of a pointer that is not allocated: {ptr:#x}")
            self.freed.append(entry)
        return (_Err.cudaSuccess,)

    @staticmethod
    def _check_range(table: dict, ptr: int, nbytes: int, what: str) -> None:
        for base, (_, size) in table.items():
            if base <= ptr and ptr + nbytes <= base + size:
                return
        raise ContractError(f"{what} {ptr:#x} (+{nbytes} bytes) is outside every allocation "
                            "of the right kind")


# ------------------------------------------------------------------------------ TensorRT


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    INT64 = 8


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 5


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    TF32 = 6
    BF16 = 17


_NP = {DataType.INT64: np.int64, DataType.INT32: np.int32, DataType.FLOAT: np.float32}


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, severity: int = 2) -> None:
        self.severity = severity


class FakeEngine:
    def __init__(self, trt: FakeTensorRT, spec: dict[str, Any], onnx: bytes) -> None:
        import onnxruntime as ort

        self.trt, self.spec = trt, spec
        self.profiles = [{name: (tuple(p["min"]), tuple(p["opt"]), tuple(p["max"]))
                          for name in INPUT_NAMES} for p in spec["profiles"]]
        self.input_dtype = DataType[spec["input_dtype"]]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(onnx, sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.active: dict[int, int] = {}  # profile -> contexts executing it now
        self.peak_sharing = 0  # most contexts that executed one profile at the same time

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    @property
    def num_io_tensors(self) -> int:
        return 3

    def get_tensor_name(self, i: int) -> str:
        return (*INPUT_NAMES, OUTPUT_NAME)[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.OUTPUT if name == OUTPUT_NAME else TensorIOMode.INPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        forced = self.spec.get("tensor_dtypes", {}).get(name)
        if forced:
            return DataType[forced]
        return DataType.FLOAT if name == OUTPUT_NAME else self.input_dtype

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        """Dynamic axes are -1, as TensorRT reports them before shapes are set."""
        if name == OUTPUT_NAME:
            return (-1, int(self.session.get_outputs()[0].shape[1]))
        if name not in INPUT_NAMES:
            raise ContractError(f"get_tensor_shape({name!r}): no such tensor")
        return (-1, -1)

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        if name not in INPUT_NAMES or not 0 <= profile < len(self.profiles):
            raise ContractError(f"get_tensor_profile_shape({name!r}, {profile}) is invalid")
        return [tuple(s) for s in self.profiles[profile][name]]

    def create_execution_context(self) -> FakeContext:
        if self.trt.fail_context_after is not None and \
                self.trt.stats["contexts_created"] >= self.trt.fail_context_after:
            return None  # TensorRT returns None when it cannot allocate a context
        self.trt.stats["contexts_created"] += 1
        return FakeContext(self)  # the context keeps its engine alive, as in TensorRT

    def __del__(self) -> None:
        self.trt.stats["engines_destroyed"] += 1


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.profile = 0  # a new context is assigned profile 0 (TensorRT 10)
        self.profile_stream: int | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self._busy = threading.Lock()

    @property
    def active_optimization_profile(self) -> int:
        return self.profile

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        with self._exclusive("set_optimization_profile_async"):
            if not 0 <= index < self.engine.num_optimization_profiles:
                return False
            self.profile, self.profile_stream = index, int(stream)
            self.shapes.clear()  # switching invalidates the input shapes set before
            self.engine.trt.stats["profile_switches"] += 1
            return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        with self._exclusive("set_input_shape"):
            if name not in INPUT_NAMES:
                return False
            lo, _, hi = self.engine.profiles[self.profile][name]
            shape = tuple(int(s) for s in shape)
            if len(shape) != 2 or not all(a <= s <= b for a, s, b in zip(lo, shape, hi,
                                                                           strict=True)):
                return False
            self.shapes[name] = shape
            return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in (*INPUT_NAMES, OUTPUT_NAME):
            return False
        if int(ptr) % 256:
            raise ContractError(f"{name}: address {int(ptr):#x} is not 256-byte aligned")
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        with self._exclusive("execute_async_v3"):
            return self._enqueue(int(stream_handle))

    def _enqueue(self, stream: int) -> bool:
        eng = self.engine
        if eng.trt.fail_execute:
            return False
        missing = [n for n in (*INPUT_NAMES, OUTPUT_NAME) if n not in self.addresses]
        if missing:
            raise ContractError(f"execute_async_v3 before set_tensor_address for {missing}")
        unset = [n for n in INPUT_NAMES if n not in self.shapes]
        if unset:
            raise ContractError(f"execute_async_v3 before set_input_shape for {unset} "
                                f"(after selecting profile {self.profile})")
        if self.profile_stream not in (None, stream):
            raise ContractError(f"profile {self.profile} was selected on stream "
                                f"{self.profile_stream} but execution runs on {stream}")
        shape = self.shapes["input_ids"]
        if self.shapes["attention_mask"] != shape:
            raise ContractError(f"input shapes differ: {self.shapes}")
        dt = _NP[eng.input_dtype]
        cuda = eng.trt.cuda
        ids = cuda.device_array(self.addresses["input_ids"], shape, dt)
        mask = cuda.device_array(self.addresses["attention_mask"], shape, dt)
        dim = eng.session.get_outputs()[0].shape[1]
        out = cuda.device_array(self.addresses[OUTPUT_NAME], (shape[0], dim), np.float32)
        profile = self.profile

        def run() -> None:
            with eng.trt.lock:
                eng.active[profile] = eng.active.get(profile, 0) + 1
                eng.peak_sharing = max(eng.peak_sharing, eng.active[profile])
            try:
                if eng.trt.exec_delay:
                    time.sleep(eng.trt.exec_delay)  # lets tests see executions overlap
                out[...] = eng.session.run(None, {"input_ids": ids.astype(np.int64),
                                                  "attention_mask": mask.astype(np.int64)})[0]
                if eng.trt.corrupt_output:
                    out[:, ::2] *= -1.0
                if eng.trt.cross_batch_leak:  # each row takes on some of its batch's mean
                    out[...] += eng.trt.cross_batch_leak * out.mean(axis=0)
            finally:
                with eng.trt.lock:
                    eng.active[profile] -= 1

        cuda.enqueue(stream, run)
        eng.trt.stats["executions"] += 1
        return True

    @contextlib.contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        if not self._busy.acquire(blocking=False):
            raise ContractError(f"{what}: two threads use one execution context "
                                "(IExecutionContext is not thread-safe)")
        try:
            yield
        finally:
            self._busy.release()

    def __del__(self) -> None:
        self.engine.trt.stats["contexts_destroyed"] += 1


class Runtime:
    def __init__(self, trt: FakeTensorRT, logger: Logger) -> None:
        if not isinstance(logger, Logger):
            raise ContractError("trt.Runtime needs a trt.Logger")
        self.trt = trt

    def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine | None:
        plan = bytes(plan)
        if not plan.startswith(PLAN_MAGIC):
            return None  # TensorRT logs an error and returns None for a foreign plan
        header_len = int.from_bytes(plan[8:16], "little")
        spec = json.loads(plan[16:16 + header_len])
        if spec["tensorrt_version"] != self.trt.__version__:
            return None
        self.trt.stats["engines_created"] += 1
        return FakeEngine(self.trt, spec, plan[16 + header_len:])


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:
        lo, mid, hi = (tuple(int(v) for v in s) for s in (min, opt, max))
        if not all(a <= b <= c for a, b, c in zip(lo, mid, hi, strict=True)):
            raise ContractError(f"profile for {name}: need min ≤ opt ≤ max, got "
                                f"{lo}, {mid}, {hi}")
        self.shapes[name] = (lo, mid, hi)


class FakeTimingCache:
    """Serialized as `device:entries`; a build adds one entry. TensorRT refuses (False from
    set_timing_cache, ignore_mismatch=False) a cache made on a device with other properties."""

    def __init__(self, data: bytes, device: str) -> None:
        made_on, _, entries = data.decode().rpartition(":") if data else (device, "", "0")
        self.device, self.entries = made_on, int(entries)

    def serialize(self) -> bytes:
        return f"{self.device}:{self.entries + 1}".encode()


class FakeConfig:
    def __init__(self, device: str) -> None:
        self.device = device
        self.profiles: list[FakeProfile] = []
        self.pools: dict[MemoryPoolType, int] = {}
        self.builder_optimization_level = 3
        self.timing_cache: FakeTimingCache | None = None
        self.flags = {BuilderFlag.TF32}  # TensorRT: "TF32 ... Enabled by default"

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(BuilderFlag(flag))

    def clear_flag(self, flag: BuilderFlag) -> None:
        self.flags.discard(BuilderFlag(flag))

    def get_flag(self, flag: BuilderFlag) -> bool:
        return BuilderFlag(flag) in self.flags

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[pool] = int(size)

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(bytes(data), self.device)

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if cache.device != self.device and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx_path: Path | None = None
        self.input_dtype = "INT64"


class OnnxParser:
    def __init__(self, network: FakeNetwork, logger: Logger) -> None:
        self.network = network
        self.errors: list[str] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        import onnx

        try:  # reads external data beside the file, as TensorRT's parser does
            model = onnx.load(path)
        except Exception as exc:
            self.errors.append(f"could not read {path}: {exc}")
            return False
        names = [i.name for i in model.graph.input]
        if names != list(INPUT_NAMES):
            self.errors.append(f"unexpected inputs {names}")
            return False
        elem = model.graph.input[0].type.tensor_type.elem_type
        self.network.input_dtype = "INT32" if elem == onnx.TensorProto.INT32 else "INT64"
        self.network.onnx_path = Path(path)
        return True


class Builder:
    def __init__(self, trt: FakeTensorRT, logger: Logger) -> None:
        self.trt = trt

    def create_network(self, flags: int = 0) -> FakeNetwork:
        return FakeNetwork(flags)

    def create_builder_config(self) -> FakeConfig:
        return FakeConfig(self.trt.device_name)

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes | None:
        import onnx

        trt = self.trt
        strongly = 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if int(trt.__version__.split(".")[0]) < 11 and not network.flags & strongly:
            raise ContractError("TensorRT 10: the network must be created STRONGLY_TYPED so "
                                "precision comes from the graph")
        if network.onnx_path is None:
            raise ContractError("build_serialized_network on a network nothing was parsed into")
        for i, p in enumerate(config.profiles):
            if set(p.shapes) != set(INPUT_NAMES):
                raise ContractError(f"profile {i} sets {sorted(p.shapes)}, not every input")
        trt.builds.append({"flags": network.flags, "profiles": [p.shapes for p in
                                                                 config.profiles],
                           "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
                           "optimization_level": config.builder_optimization_level,
                           "timing_cache_entries": None if config.timing_cache is None
                           else config.timing_cache.entries,
                           "builder_flags": sorted(f.name for f in config.flags),
                           "source": network.onnx_path.name})
        if trt.fail_build:
            return None
        graph = onnx.load(str(network.onnx_path)).SerializeToString()  # weights inlined
        spec = {"tensorrt_version": trt.__version__,
                "input_dtype": trt.force_input_dtype or network.input_dtype,
                "tensor_dtypes": dict(trt.force_tensor_dtypes),
                "profiles": [{"min": p.shapes["input_ids"][0], "opt": p.shapes["input_ids"][1],
                              "max": p.shapes["input_ids"][2]} for p in config.profiles]}
        header = json.dumps(spec).encode()
        return PLAN_MAGIC + len(header).to_bytes(8, "little") + header + graph


class FakeTensorRT(types.ModuleType):
    """The `tensorrt` module: classes bound to this fake's state."""

    def __init__(self, version: str, cuda: FakeCuda) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
        self.cuda = cuda
        self.lock = threading.Lock()
        self.builds: list[dict[str, Any]] = []
        self.fail_build = False
        self.fail_execute = False
        self.fail_context_after: int | None = None
        self.exec_delay = 0.0
        self.corrupt_output = False
        self.cross_batch_leak = 0.0
        self.force_input_dtype: str | None = None  # an engine whose ids are INT32
        self.force_tensor_dtypes: dict[str, str] = {}  # e.g. an engine with a HALF output
        self.device_name = _Props.name.rstrip(b"\x00").decode()  # what builds run on
        self.stats = {"contexts_created": 0, "contexts_destroyed": 0, "executions": 0,
                      "profile_switches": 0, "engines_created": 0, "engines_destroyed": 0}
        self.Logger = Logger
        self.DataType = DataType
        self.TensorIOMode = TensorIOMode
        self.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
        self.MemoryPoolType = MemoryPoolType
        self.BuilderFlag = BuilderFlag
        self.OnnxParser = OnnxParser
        self.Runtime = lambda logger: Runtime(self, logger)
        self.Builder = lambda logger: Builder(self, logger)


def install(monkeypatch, version: str = "10.8.0.43", **cuda_kwargs: Any) -> FakeTensorRT:
    """Put the fakes in sys.modules as `tensorrt` and `cuda.bindings.runtime`."""
    cuda = FakeCuda(**cuda_kwargs)
    runtime = types.ModuleType("cuda.bindings.runtime")
    for name in dir(FakeCuda):
        if name.startswith("cuda"):
            setattr(runtime, name, getattr(cuda, name))
    runtime.cudaMemcpyKind = cudaMemcpyKind
    runtime.cudaError_t = _Err
    modules = {"cuda": types.ModuleType("cuda"), "cuda.bindings": types.ModuleType(
        "cuda.bindings"), "cuda.bindings.runtime": runtime}
    for name, mod in modules.items():
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name !=
                                                      "cuda.bindings.runtime")
        monkeypatch.setitem(sys.modules, name, mod)
    modules["cuda"].bindings = modules["cuda.bindings"]
    modules["cuda.bindings"].runtime = runtime
    trt = FakeTensorRT(version, cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt
