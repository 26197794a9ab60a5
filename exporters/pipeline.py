"""`export()`: Hugging Face model → verified angle_rt bundle (fp32 + precision artifacts)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from angle_rt.manifest import (
    INPUT_NAMES,
    MANIFEST_FILE,
    ONNX_FILES,
    TOKENIZER_FILE,
    sha256_file,
    write_manifest,
)
from angle_torch.model import AngleModel
from exporters.bundle import build_manifest, consolidate_external_data, onnx_artifact, staged_dir
from exporters.gates import Gate, sts_pairs
from exporters.onnx_export import DEFAULT_OPSET, export_onnx
from exporters.precision import FP16_CANDIDATE_OPS, convert_float16
from exporters.quantize import (
    METHODS,
    Calibration,
    calibrate,
    group_regex,
    layer_group,
    linear_layers,
    quantize_dynamic_int8,
    quantize_int8,
)
from exporters.refine import verified
from exporters.texts import calibration_texts

log = logging.getLogger("angle_rt.export")



@dataclass(frozen=True)
class PrecisionPlan:
    """Which precision artifacts to build, and how."""

    fp16: bool = False
    bf16: bool = False
    int8: bool = False
    int8_dynamic: bool = False
    calib: str | Path | None = None  # texts for INT8 calibration (default: built-in)
    calib_size: int = 512
    int8_method: str = "mse"
    fp16_exclude: tuple[str, ...] = ()  # extra op types kept in fp32
    int8_exclude: tuple[str, ...] = ()  # regexes of node names kept in float

    def wanted(self) -> list[str]:
        flags = {"fp16": self.fp16, "bf16": self.bf16, "int8": self.int8,
                 "int8-dynamic": self.int8_dynamic}
        return [p for p, on in flags.items() if on]


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
    sts_data: str | Path | None = None,
    trust_remote_code: bool = False,
    progress: bool = False,
    **precision: Any,
) -> Path:
    """Export `model` (hub id or local directory) to a bundle at `output_dir`.

    Settings saved with the model (angle_config.json, sentence-transformers pooling and
    Normalize) apply unless given here. `precision` takes PrecisionPlan's fields
    (fp16=True, int8=True, calib=..., ...). With `verify`, every artifact is encoded by
    angle_rt and compared with torch fp32 on ≥ 1,000 real sentences (plus worst-case
    inputs); a failed gate raises ParityError and nothing is written.
    """
    plan = PrecisionPlan(**precision)
    if plan.int8_method not in METHODS:
        raise ValueError(f"int8_method must be one of {METHODS}, got {plan.int8_method!r}")
    angle = AngleModel.from_pretrained(
        model, pooling=pooling, max_length=max_length, padding_side=padding_side,
        prompt=prompt, lora=lora, revision=revision, attn_implementation="eager",
        trust_remote_code=trust_remote_code)
    normalize = angle.settings.normalize if normalize is None else normalize
    with staged_dir(Path(output_dir), force) as tmp:
        log.info("tracing %s to ONNX (opset %d)", angle.name, opset)
        export_onnx(angle, tmp / "model.onnx", normalize=normalize, opset=opset)
        consolidate_external_data(tmp / "model.onnx")
        angle.tokenizer.backend.save(str(tmp / TOKENIZER_FILE))
        builder = ArtifactBuilder(angle, tmp, plan)
        artifacts = [onnx_artifact(tmp, "model.onnx", "fp32")]
        for precision in plan.wanted():
            log.info("building %s", ONNX_FILES[precision])
            builder.build(precision, builder.default_exclude(precision))
            artifacts.append(onnx_artifact(tmp, ONNX_FILES[precision], precision))
        manifest = build_manifest(angle, artifacts, sha256_file(tmp / TOKENIZER_FILE),
                                  normalize, parity={})
        write_manifest(tmp, manifest)
        if verify:
            sts = sts_pairs(sts_data) if plan.int8 or plan.int8_dynamic else None
            gate = Gate(angle, tmp, normalize, verify_data, sts, progress)
            manifest = verified(manifest, gate, builder, onnx_artifact)
            write_manifest(tmp, manifest)
    return Path(output_dir)


class ArtifactBuilder:
    """Builds precision artifacts from the fp32 graph; INT8 calibration is computed once."""

    def __init__(self, angle: AngleModel, bundle: Path, plan: PrecisionPlan) -> None:
        self.angle, self.bundle, self.plan = angle, bundle, plan
        self.src = bundle / "model.onnx"
        self._feeds: list[dict[str, np.ndarray]] | None = None
        self._calibration: Calibration | None = None

    def build(self, precision: str, exclude: tuple[str, ...] = (),
              folder: Path | None = None) -> Path:
        dst = (folder or self.bundle) / ONNX_FILES[precision]
        if precision in ("fp16", "bf16"):
            convert_float16(self.src, dst, precision, exclude)
        elif precision == "int8":
            quantize_int8(self.src, dst, [], exclude, self.plan.int8_method,
                          calibration=self.calibration())
        elif precision == "int8-dynamic":
            quantize_dynamic_int8(self.src, dst, exclude)
        else:
            raise ValueError(f"unknown precision {precision!r}")
        if folder is not None:  # a trial build: make it an openable bundle
            for name in (MANIFEST_FILE, TOKENIZER_FILE):
                (folder / name).symlink_to((self.bundle / name).resolve())
        return dst

    def default_exclude(self, precision: str) -> tuple[str, ...]:
        if precision in ("fp16", "bf16"):
            return tuple(self.plan.fp16_exclude)
        return tuple(self.plan.int8_exclude)

    def calibration(self) -> Calibration:
        if self._calibration is None:
            layers = linear_layers(onnx.load(str(self.src), load_external_data=False))
            self._calibration = calibrate(self.src, layers, calibration_feeds(self.angle,
                                                                              self.plan))
        return self._calibration

    def outlier_order(self, patterns: tuple[str, ...]) -> list[str]:
        """Linear nodes matching `patterns`, fewest activation outliers (peak over RMS on
        the calibration set) first: the order in which they are worth quantizing."""
        calib = self.calibration()
        regexes = [re.compile(p) for p in patterns]
        score = {}
        for layer in linear_layers(onnx.load(str(self.src), load_external_data=False)):
            if any(r.search(layer.node) for r in regexes):
                rms = float(np.sqrt(np.mean(np.square(calib.samples[layer.activation]))))
                score[layer.node] = calib.maxima[layer.activation] / max(rms, 1e-12)
        return sorted(score, key=score.__getitem__)

    def candidates(self, precision: str) -> list[tuple[str, str]]:
        """(name, exclusion) pairs to try: op types (fp16/bf16) or layer groups (int8)."""
        model = onnx.load(str(self.src), load_external_data=False)
        if precision in ("fp16", "bf16"):
            ops = sorted({n.op_type for n in model.graph.node} & set(FP16_CANDIDATE_OPS))
            return [(op, op) for op in ops]
        groups = sorted({layer_group(layer.node) for layer in linear_layers(model)})
        return [(g, group_regex(g)) for g in groups]


def calibration_feeds(angle: AngleModel, plan: PrecisionPlan) -> list[dict[str, np.ndarray]]:
    """Padded batches of real sentences of mixed lengths for INT8 calibration."""
    from angle_rt.batching import pad_batch, plan_batches

    texts = calibration_texts(plan.calib, plan.calib_size)
    ids = angle.tokenizer.encode(texts, angle.prompt_template(None))
    feeds = []
    for batch in plan_batches([len(r) for r in ids], 16, 16 * 256):
        input_ids, mask = pad_batch([ids[i] for i in batch], angle.pad_token_id,
                                    angle.settings.padding_side)
        feeds.append(dict(zip(INPUT_NAMES, (input_ids, mask), strict=True)))
    return feeds
