"""`export()`: Hugging Face model → verified angle_rt bundle (fp32 + precision artifacts)."""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from angle_rt.errors import ParityError
from angle_rt.manifest import Artifact, Manifest, sha256_file, write_manifest
from exporters.bundle import build_manifest, consolidate_external_data, onnx_artifact, staged_dir
from exporters.gates import Gate, advice
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
from exporters.verify import calibration_texts
from training.model import AngleModel

log = logging.getLogger("angle_rt.export")

# artifact file per precision; fp32 is always written (the reference graph)
ARTIFACT_FILES = {
    "fp32": "model.onnx",
    "fp16": "model.fp16.onnx",
    "bf16": "model.bf16.onnx",
    "int8": "model.int8.onnx",
    "int8-dynamic": "model.int8-dynamic.onnx",
}


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
        angle.tokenizer.backend.save(str(tmp / "tokenizer.json"))
        builder = ArtifactBuilder(angle, tmp, plan)
        artifacts = [onnx_artifact(tmp, "model.onnx", "fp32")]
        for precision in plan.wanted():
            log.info("building %s", ARTIFACT_FILES[precision])
            builder.build(precision, builder.default_exclude(precision))
            artifacts.append(onnx_artifact(tmp, ARTIFACT_FILES[precision], precision))
        manifest = build_manifest(angle, artifacts, sha256_file(tmp / "tokenizer.json"),
                                  normalize, parity={})
        write_manifest(tmp, manifest)
        if verify:
            gate = Gate(angle, tmp, normalize, verify_data, sts_data, builder, progress)
            manifest = _verified(manifest, gate, builder)
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
        dst = (folder or self.bundle) / ARTIFACT_FILES[precision]
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
            for name in ("angle_rt.json", "tokenizer.json"):
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
        feeds.append({"input_ids": input_ids, "attention_mask": mask})
    return feeds


def _verified(manifest: Manifest, gate: Gate, builder: ArtifactBuilder) -> Manifest:
    """Gate every artifact. An INT8 artifact that fails keeps its most sensitive layer
    types in float, one at a time (at most half of them), until it passes; then as many
    of those layers as the gate allows are quantized again (see _requantized)."""
    for i, art in enumerate(manifest.artifacts):
        base = exclude = builder.default_exclude(art.precision)
        auto: list[str] = []
        while True:
            try:
                info = gate.check(art)
                break
            except ParityError as err:
                ranked = gate.rank(art.precision, exclude) if art.precision != "fp32" else []
                limit = len(builder.candidates(art.precision)) // 2
                if not art.precision.startswith("int8") or not ranked or len(auto) >= limit:
                    raise ParityError(f"{err}\n{advice(art.precision, ranked)}") from None
                auto.append(ranked[0].name)
                exclude = (*exclude, ranked[0].exclude)
                log.warning("%s failed its gate; keeping %s in float and retrying", art.file,
                            ranked[0].name)
                manifest, art = _rebuilt(builder, manifest, i, art, exclude)
        if auto:
            manifest, art, info, kept = _requantized(gate, builder, manifest, i, art, base,
                                                     exclude[len(base):], info)
            info["kept_in_float"] = kept
        manifest = _with_artifact(manifest, i, dataclasses.replace(art, parity=info))
    return dataclasses.replace(manifest, parity=gate.summary())


def _rebuilt(builder: ArtifactBuilder, manifest: Manifest, i: int, art: Artifact,
             exclude: tuple[str, ...]) -> tuple[Manifest, Artifact]:
    """Rebuild artifact i with `exclude` kept in float; the manifest on disk follows (the
    gate opens the bundle with checksums)."""
    builder.build(art.precision, exclude)
    art = onnx_artifact(builder.bundle, art.file, art.precision)
    manifest = _with_artifact(manifest, i, art)
    write_manifest(builder.bundle, manifest)
    return manifest, art


def _requantized(gate: Gate, builder: ArtifactBuilder, manifest: Manifest, i: int,
                 art: Artifact, base: tuple[str, ...], groups: tuple[str, ...],
                 info: dict[str, Any]) -> tuple[Manifest, Artifact, dict[str, Any], list[str]]:
    """Whole layer types were kept in float; usually a few of their layers cause the
    damage. Order those layers by activation outliers (fewest first) and find, by binary
    search with the full gate deciding each step, the longest prefix that can be
    quantized again. Returns the passing artifact and the nodes left in float."""
    nodes = builder.outlier_order(groups)

    def trial(k: int) -> tuple[Manifest, Artifact]:
        keep = tuple("^" + re.escape(n) + "$" for n in nodes[k:])
        return _rebuilt(builder, manifest, i, art, (*base, *keep))

    lo, hi, on_disk, best = 0, len(nodes), 0, (manifest, art, info)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        m, a = trial(mid)
        on_disk = mid
        try:
            best, lo = (m, a, gate.check(a)), mid
        except ParityError:
            hi = mid - 1
    if on_disk != lo:  # the file on disk is a failed trial: rebuild the chosen one
        m, a = trial(lo)
        best = (m, a, gate.check(a))
    log.info("%s: %d of the %d layers kept in float by type quantized again", art.file, lo,
             len(nodes))
    return (*best, list(nodes[lo:]))


def _with_artifact(manifest: Manifest, i: int, art: Artifact) -> Manifest:
    arts = list(manifest.artifacts)
    arts[i] = art
    return dataclasses.replace(manifest, artifacts=tuple(arts))
