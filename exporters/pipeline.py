"""`export()`: Hugging Face model → verified angle_rt bundle."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from angle_rt import Encoder
from angle_rt.errors import ParityError
from angle_rt.manifest import Manifest, sha256_file, write_manifest
from exporters.bundle import (
    build_manifest,
    consolidate_external_data,
    onnx_artifact,
    staged_dir,
)
from exporters.onnx_export import DEFAULT_OPSET, export_onnx
from exporters.verify import THRESHOLDS, compare, explain, verification_texts
from training.model import AngleModel

log = logging.getLogger("angle_rt.export")


def export(
    model: str | Path,
    output_dir: str | Path,
    *,
    pooling: str | int | None = None,
    max_length: int | None = None,
    prompt: str | None = None,
    normalize: bool | None = None,
    padding_side: str | None = None,
    lora: str | Path | None = None,
    revision: str | None = None,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    verify: bool = True,
    verify_data: str | Path | None = None,
    trust_remote_code: bool = False,
    progress: bool = False,
) -> Path:
    """Export `model` (hub id or local directory) to a bundle at `output_dir`.

    Settings saved with the model (angle_config.json, sentence-transformers pooling and
    Normalize) apply unless given here. With `verify`, the bundle is encoded by angle_rt
    and by torch on ≥ 1,000 real sentences; a cosine under the fp32 threshold or any
    NaN raises ParityError and nothing is written.
    """
    angle = AngleModel.from_pretrained(
        model, pooling=pooling, max_length=max_length, padding_side=padding_side,
        prompt=prompt, lora=lora, revision=revision, attn_implementation="eager",
        trust_remote_code=trust_remote_code)
    normalize = angle.settings.normalize if normalize is None else normalize
    out = Path(output_dir)
    with staged_dir(out, force) as tmp:
        log.info("tracing %s to ONNX (opset %d)", angle.name, opset)
        export_onnx(angle, tmp / "model.onnx", normalize=normalize, opset=opset)
        consolidate_external_data(tmp / "model.onnx")
        angle.tokenizer.backend.save(str(tmp / "tokenizer.json"))
        artifact = onnx_artifact(tmp, "model.onnx", "fp32")
        manifest = build_manifest(angle, [artifact], sha256_file(tmp / "tokenizer.json"),
                                  normalize, parity={})
        write_manifest(tmp, manifest)
        if verify:
            manifest = _gate(angle, tmp, manifest, normalize, verify_data, progress)
            write_manifest(tmp, manifest)
    return out


def _gate(angle: AngleModel, bundle: Path, manifest: Manifest, normalize: bool,
          verify_data: str | Path | None, progress: bool) -> Manifest:
    """Encode the verification texts with torch and the bundle; fail on divergence."""
    texts = verification_texts(verify_data)
    log.info("parity gate: %d texts, torch vs angle_rt", len(texts))
    ref = angle.encode(texts, normalize=normalize, show_progress=progress)
    artifacts, results = [], {}
    for art in manifest.artifacts:
        enc = Encoder(bundle / art.file, backend="cpu")
        got = enc.encode(texts, show_progress_bar=progress)
        report = compare(ref, got, THRESHOLDS[art.precision])
        if not report.passed:
            raise ParityError(explain(report, texts, f"{art.file} ({art.precision})"))
        results[art.file] = report.to_dict()
        artifacts.append(dataclasses.replace(art, parity=report.to_dict()))
    parity: dict[str, Any] = {
        "reference": "torch fp32 (training.model.AngleModel, CPU)",
        "texts": str(verify_data) if verify_data else "built-in (exporters/data/sentences.txt)",
        "n_texts": len(texts),
        "max_tokens": max(len(r) for r in angle.tokenizer.encode(texts)),
        "results": results,
    }
    return dataclasses.replace(manifest, artifacts=tuple(artifacts), parity=parity)
