"""`angle-export build-engine BUNDLE`: TensorRT engines from a bundle's ONNX graphs, on the
machine (GPU type, TensorRT version) that will run them, each checked against its ONNX."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from angle_rt import Encoder
from angle_rt.errors import BackendUnavailableError, ParityError
from angle_rt.manifest import ENGINE_FILES, Artifact, read_manifest, sha256_file, write_manifest
from exporters.invariance import check_invariance
from exporters.texts import stress_texts, verification_texts
from exporters.trt_build import SOURCE_FILES, BuildOptions, build_engine
from exporters.verify import THRESHOLDS, compare, explain

log = logging.getLogger("angle_rt.export")
# An engine's kernels (tactics) may differ per input shape: alone vs batched, every precision
ENGINE_INVARIANCE = 0.9999


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
    """Build, verify and register engines in the bundle's manifest; returns their entries.

    An engine is built and gated under a staging name and listed in the manifest only after
    its gate passed: any failure (parity, profile, CUDA, TensorRT) leaves the bundle as it was.
    """
    from angle_rt.session.trt import tensorrt_available

    bundle, opts = Path(bundle), opts or BuildOptions()
    reason = tensorrt_available()
    if reason is not None:
        raise BackendUnavailableError(f"cannot build TensorRT engines here: {reason}")
    return [_build_verified(bundle, precision, opts, verify)
            for precision in engine_targets(bundle, precisions)]


def _build_verified(bundle: Path, precision: str, opts: BuildOptions,
                    verify: bool) -> Artifact:
    manifest = read_manifest(bundle)
    plan = bundle / ENGINE_FILES[precision]
    staging = plan.with_name(f".{plan.name}.staging")
    try:
        info = build_engine(bundle / SOURCE_FILES[precision], staging, manifest.max_length,
                            opts)
        parity = engine_gate(bundle, staging, precision) if verify else None
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, plan)
    art = Artifact(file=plan.name, format="tensorrt", precision=precision,
                   sha256=sha256_file(plan), size_bytes=plan.stat().st_size, engine=info,
                   parity=parity)
    others = tuple(a for a in manifest.artifacts if a.file != plan.name)
    write_manifest(bundle, dataclasses.replace(manifest, artifacts=(*others, art)))
    return art


def engine_gate(bundle: Path, plan: Path, precision: str) -> dict:
    """The engine at `plan` against the fp32 ONNX graph on real sentences and worst-case
    inputs, through the Encoder's own tokenize/batch/pad path; closes what it opens."""
    from angle_rt.session.trt import TrtSession

    manifest = read_manifest(bundle)
    texts = verification_texts(None) + stress_texts(manifest.max_length)
    with Encoder(bundle, precision="fp32", backend="cuda" if _ort_cuda() else "cpu") as ref:
        expected = ref.encode(texts)
    with Encoder(bundle, precision="fp32", verify_checksums=False,
                 backend=lambda _: TrtSession(plan, manifest.embedding_dim)) as engine:
        report = compare(expected, engine.encode(texts), THRESHOLDS[precision])
        name = ENGINE_FILES[precision]
        if not report.passed:
            raise ParityError(explain(report, texts, name) + "\nthe engine was not added")
        invariance = check_invariance(engine, texts, precision, threshold=ENGINE_INVARIANCE,
                                      label=name)
    log.info("%s: min cos %.6f vs fp32 ONNX", name, report.min_cosine)
    return {**report.to_dict(), "reference": "fp32 ONNX graph", "runtime": "tensorrt",
            "batch_invariance": invariance}


def _ort_cuda() -> bool:
    from angle_rt.session import ort_cuda_available

    return ort_cuda_available()
