"""`angle-export build-engine BUNDLE`: TensorRT engines from a bundle's ONNX graphs, on the
machine (GPU type, TensorRT version) that will run them, each checked against its ONNX."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from angle_rt import Encoder
from angle_rt.errors import BackendUnavailableError, ParityError
from angle_rt.manifest import Artifact, read_manifest, sha256_file, write_manifest
from exporters.trt_build import ENGINE_FILES, SOURCE_FILES, BuildOptions, build_engine
from exporters.verify import THRESHOLDS, compare, explain, stress_texts, verification_texts

log = logging.getLogger("angle_rt.export")


def engine_targets(bundle: Path, precisions: list[str] | None) -> list[str]:
    """Precisions to build: those asked for, else every ONNX precision TensorRT can take
    (dynamic INT8 is an ONNX Runtime format, not an engine source)."""
    manifest = read_manifest(bundle)
    have = [a.precision for a in manifest.artifacts if a.format == "onnx"]
    wanted = precisions or [p for p in have if p in SOURCE_FILES and p != "fp32"] or ["fp32"]
    missing = [p for p in wanted if p not in have or p not in SOURCE_FILES]
    if missing:
        raise ValueError(f"cannot build {missing}: the bundle has ONNX for {have} "
                         f"(TensorRT engines come from {sorted(SOURCE_FILES)}); re-export with "
                         "--fp16 / --int8 / --bf16 first")
    return wanted


def build_engines(bundle: str | Path, precisions: list[str] | None = None,
                  opts: BuildOptions | None = None, verify: bool = True) -> list[Artifact]:
    """Build, verify and register engines in the bundle's manifest; returns their entries."""
    from angle_rt.session.trt import tensorrt_available

    bundle, opts = Path(bundle), opts or BuildOptions()
    reason = tensorrt_available()
    if reason is not None:
        raise BackendUnavailableError(f"cannot build TensorRT engines here: {reason}")
    built = []
    for precision in engine_targets(bundle, precisions):
        manifest = read_manifest(bundle)
        plan = bundle / ENGINE_FILES[precision]
        staging = plan.with_suffix(".plan.tmp")
        info = build_engine(bundle / SOURCE_FILES[precision], staging, manifest.max_length,
                            opts)
        os.replace(staging, plan)
        art = Artifact(file=plan.name, format="tensorrt", precision=precision,
                       sha256=sha256_file(plan), size_bytes=plan.stat().st_size, engine=info)
        others = tuple(a for a in manifest.artifacts if a.file != plan.name)
        write_manifest(bundle, dataclasses.replace(manifest, artifacts=(*others, art)))
        if verify:
            try:
                art = dataclasses.replace(art, parity=engine_gate(bundle, art))
            except ParityError:  # leave the bundle as it was, minus the failed engine
                write_manifest(bundle, dataclasses.replace(manifest, artifacts=others))
                plan.unlink()
                raise
            write_manifest(bundle, dataclasses.replace(manifest, artifacts=(*others, art)))
        built.append(art)
    return built


def engine_gate(bundle: Path, art: Artifact) -> dict:
    """The engine against the fp32 ONNX graph on real sentences and worst-case inputs."""
    manifest = read_manifest(bundle)
    texts = verification_texts(None) + stress_texts(manifest.max_length)
    ref = Encoder(bundle, precision="fp32", backend="cuda" if _ort_cuda() else "cpu")
    engine = Encoder(bundle / art.file, backend="tensorrt")
    report = compare(ref.encode(texts), engine.encode(texts), THRESHOLDS[art.precision])
    if not report.passed:
        raise ParityError(explain(report, texts, art.file) + "\nthe engine was removed")
    log.info("%s: min cos %.6f vs fp32 ONNX", art.file, report.min_cosine)
    return {**report.to_dict(), "reference": "fp32 ONNX graph", "runtime": "tensorrt"}


def _ort_cuda() -> bool:
    from angle_rt.session import ort_cuda_available

    return ort_cuda_available()
