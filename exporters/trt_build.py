"""ONNX → TensorRT engine: a strongly typed network (precision comes from the graph),
optimization profiles per sequence bucket and a timing cache. The engine's parity gate and
its registration in the manifest are in exporters/engines.py.

TensorRT is imported lazily; the profiles themselves live in angle_rt.profiles. CPU tests
run this module against a contract-checking fake of tensorrt (tests/fake_tensorrt.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from angle_rt._imports import lazy_import
from angle_rt.errors import AngleRTError
from angle_rt.manifest import ENGINE_FILES, INPUT_NAMES, ONNX_FILES
from angle_rt.profiles import DEFAULT_BUCKETS, ShapeProfile, sequence_profiles

log = logging.getLogger("angle_rt.export")
# the ONNX graph each engine precision is built from (dynamic INT8 is an ONNX Runtime format)
SOURCE_FILES = {p: ONNX_FILES[p] for p in ENGINE_FILES}


class EngineBuildError(AngleRTError, RuntimeError):
    """TensorRT could not parse the graph or build the engine; the message says why."""


@dataclass(frozen=True)
class BuildOptions:
    """Engine build knobs (the CLI's --min/--opt/--max-batch, --buckets, ...)."""

    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 128
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    workspace_gb: float = 4.0
    optimization_level: int = 3
    timing_cache: str | Path | None = None

    def __post_init__(self) -> None:
        if not self.workspace_gb > 0:
            raise ValueError(f"workspace_gb must be > 0, got {self.workspace_gb}")
        self.profiles(1)  # bad batch bounds fail with the options, not after an export

    def profiles(self, max_length: int) -> list[ShapeProfile]:
        return sequence_profiles(max_length, self.min_batch, self.opt_batch, self.max_batch,
                                 self.buckets)


def network_flags(trt: Any) -> int:
    """STRONGLY_TYPED on TensorRT 10 (11 is always strongly typed and ignores the flag)."""
    major = int(trt.__version__.split(".")[0])
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if major >= 11 or flag is None else 1 << int(flag)


def build_engine(onnx_path: Path, plan_path: Path, max_length: int,
                 opts: BuildOptions) -> dict[str, Any]:
    """Build and write the plan; return its manifest entry (version, GPU, profiles)."""
    trt = lazy_import("tensorrt")
    from angle_rt.session.cuda_mem import gpu_info

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # the path resolves external weights
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}:\n" +
                               "\n".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gb * 2**30))
    config.builder_optimization_level = opts.optimization_level
    # TF32 is on by default: FP32 products would round their inputs to 10-bit mantissas on
    # Ampere and later. Precision comes from the graph, so the fp32 parts stay fp32.
    config.clear_flag(trt.BuilderFlag.TF32)
    profiles = opts.profiles(max_length)
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name in INPUT_NAMES:
            profile.set_shape(name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
    cache = _timing_cache(config, opts.timing_cache)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT failed to build {plan_path.name} (see its log "
                               "above); try a smaller --max-batch or a larger workspace")
    plan_path.write_bytes(bytes(plan))
    if opts.timing_cache:
        Path(opts.timing_cache).write_bytes(bytes(cache.serialize()))
    seconds = time.perf_counter() - start
    log.info("built %s in %.0f s (%d profiles)", plan_path.name, seconds, len(profiles))
    return {"tensorrt_version": trt.__version__, **gpu_info(),
            "profiles": [p.to_dict() for p in profiles], "built_from": onnx_path.name,
            "build_seconds": round(seconds, 1), "strongly_typed": True, "tf32": False}


def _timing_cache(config: Any, path: str | Path | None) -> Any:
    """Read a timing cache (or start an empty one) and attach it to `config`. TensorRT
    refuses one made on a GPU with other properties: start afresh, so the file written back
    is this GPU's rather than the foreign cache unchanged."""
    data = Path(path).read_bytes() if path and Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s was made on another GPU (or TensorRT): not used; "
                    "starting a new one in its place", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache
