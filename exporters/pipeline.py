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

from angle_rt.manifest import (
    INPUT_NAMES,
    MANIFEST_FILE,
    TOKENIZER_FILE,
    Artifact,
    Manifest,
    artifact_file,
    sha256_file,
    write_manifest,
)
from angle_torch.model import AngleModel
from exporters.bundle import build_manifest, consolidate_external_data, onnx_artifact, staged_dir
from exporters.depth import depth_model, score_variants
from exporters.gates import Gate, sts_pairs
from exporters.onnx_export import DEFAULT_OPSET, check_opset, export_onnx
from exporters.precision import FP16_CANDIDATE_OPS, convert_float16
from exporters.quantize import (
    METHODS,
    PAIR_MAX,
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
# what each INT8 artifact's graph does (recorded in the manifest)
QUANTIZATION = {
    "int8": {"activations": "static", "weights": "per-channel", "weight_pair_max": PAIR_MAX,
             "format": "Q/DQ"},
    "int8-dynamic": {"activations": "per-token", "weights": "per-channel",
                     "weight_pair_max": PAIR_MAX, "format": "MatMulIntegerToFloat (ONNX Runtime)"},
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
    int8_dynamic_exclude: tuple[str, ...] | None = None  # the same for int8-dynamic (None:
    # int8_exclude)

    def check(self) -> None:
        """Refuse settings that would fail late or do nothing (before the model loads)."""
        if self.int8_method not in METHODS:
            raise ValueError(f"int8_method must be one of {METHODS}, got {self.int8_method!r}")
        if self.calib_size < 1:
            raise ValueError(f"calib_size must be ≥ 1, got {self.calib_size}")
        unknown = [op for op in self.fp16_exclude if not onnx.defs.has(op)]
        if unknown:  # a typo kept nothing in FP32, silently
            raise ValueError(f"fp16_exclude names no ONNX operator: {', '.join(unknown)} "
                             "(op types are case-sensitive, e.g. LayerNormalization)")

    def wanted(self) -> list[str]:
        flags = {"fp16": self.fp16, "bf16": self.bf16, "int8": self.int8,
                 "int8-dynamic": self.int8_dynamic}
        return [p for p, on in flags.items() if on]


def _pad_right(angle: AngleModel, asked: str | None) -> None:
    """A bundle pads right unless asked otherwise: each text then keeps columns 0..n-1 in any
    batch, so its positions and every softmax and product sum see its values in the same
    places, and its vector is bit-for-bit its vector alone. Under a decoder's usual left
    padding they shift with the longest neighbour: last-bit float differences, which an INT8
    requantization can flip (a random 6-layer Llama: 0.99982 alone vs batched in static INT8,
    1.0 padded right). The text's tokens and vector are the same either way."""
    if asked is None and angle.settings.padding_side == "left":
        log.info("the bundle pads right (the model's tokenizer pads left): a vector does not "
                 "depend on its batch; --padding-side left keeps left")
        angle.settings.padding_side = "right"


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
    billm_start: int | None = None,
    revision: str | None = None,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    verify: bool = True,
    verify_data: str | Path | None = None,
    verify_size: int | None = None,
    sts_data: str | Path | None = None,
    trust_remote_code: bool = False,
    progress: bool = False,
    layers: tuple[int, ...] = (),
    dims: tuple[int, ...] = (),
    distilled: bool = True,
    **precision: Any,
) -> Path:
    """Export `model` (hub id or local directory) to a bundle at `output_dir`.

    Settings saved with the model (angle_config.json, sentence-transformers pooling and
    Normalize) apply unless given here. `precision` takes PrecisionPlan's fields
    (fp16=True, int8=True, calib=..., ...). With `verify`, every artifact is encoded by
    angle_rt and compared with torch fp32 on ≥ 1,000 real sentences (plus worst-case
    inputs; `verify_size` texts of them, stratified by length, where given, and by default
    for models over 1B parameters); a failed gate raises ParityError and nothing is written.
    `layers` adds depth variants (the backbone cut after k layers, same precisions, each
    gated against the torch model cut the same way; a student that training.depth distilled
    into MODEL/layers-k replaces the cut unless `distilled` is False, gated against itself);
    with `layers` or `dims`, every artifact also records its STS-B dev Spearman at each
    width in `dims` and its sentences/s.
    """
    plan = PrecisionPlan(**precision)
    check_opset(opset)  # before the model loads
    if verify_size is not None and verify_size < 1:
        raise ValueError(f"verify_size must be ≥ 1, got {verify_size}")
    plan.check()
    angle = AngleModel.from_pretrained(
        model, pooling=pooling, max_length=max_length, padding_side=padding_side,
        prompt=prompt, lora=lora, revision=revision, attn_implementation="eager",
        trust_remote_code=trust_remote_code, billm_start=billm_start)
    wrong = [d for d in dims if not 1 <= d <= angle.embedding_dim]
    if wrong:  # 0 was scored as NaN (not JSON), -5 as dim − 5, past dim dropped silently
        raise ValueError(f"dims must be widths 1…{angle.embedding_dim} (this model's), "
                         f"got {wrong}")
    normalize = angle.settings.normalize if normalize is None else normalize
    _pad_right(angle, padding_side)
    with staged_dir(Path(output_dir), force) as tmp:
        angle.tokenizer.backend.save(str(tmp / TOKENIZER_FILE))
        builders = {None: ArtifactBuilder(angle, tmp, plan)}
        for k in layers:
            # training saves students beside what it trained: the adapter under --lora
            student, source = depth_model(angle, lora or model, k, distilled)
            builders[k] = ArtifactBuilder(student, tmp, plan, layers=k, depth_source=source)
        artifacts = [a for b in builders.values() for a in _trace_and_build(b, normalize, opset)]
        manifest = build_manifest(angle, artifacts, sha256_file(tmp / TOKENIZER_FILE),
                                  normalize, parity={})
        write_manifest(tmp, manifest)
        if verify:
            sts = sts_pairs(sts_data) if plan.int8 or plan.int8_dynamic else None
            gates = {k: Gate(b.angle, tmp, normalize, verify_data, sts, progress, verify_size)
                     for k, b in builders.items()}
            manifest = _verified_by_depth(manifest, gates, builders)
            write_manifest(tmp, manifest)
        if layers or dims:
            manifest = score_variants(manifest, tmp, sts_pairs(sts_data), dims)
            write_manifest(tmp, manifest)
    return Path(output_dir)


def _trace_and_build(builder: ArtifactBuilder, normalize: bool, opset: int) -> list[Artifact]:
    """The fp32 graph of `builder`'s model (full or cut), then each precision from it."""
    log.info("tracing %s to ONNX (opset %d)", builder.src.name, opset)
    export_onnx(builder.angle, builder.src, normalize=normalize, opset=opset)
    consolidate_external_data(builder.src)
    arts = [builder.artifact_of(builder.bundle, builder.src.name, "fp32")]
    for precision in builder.plan.wanted():
        path = builder.build(precision, builder.default_exclude(precision))
        log.info("built %s", path.name)
        arts.append(builder.artifact_of(builder.bundle, path.name, precision))
    return arts


def _verified_by_depth(manifest: Manifest, gates: dict[int | None, Gate],
                       builders: dict[int | None, ArtifactBuilder]) -> Manifest:
    """Each depth's artifacts through its own gate (the torch model cut the same way); the
    full model's gate summary is the bundle's parity, the others go under parity.depths."""
    arts: list[Artifact] = []
    parity: dict[str, Any] = {}
    whole = manifest
    for k, builder in builders.items():
        done = verified(whole.at_depth(k), gates[k], builder, builder.artifact_of)
        arts += done.artifacts
        if k is None:
            parity = {**done.parity, **parity}
        else:
            parity.setdefault("depths", {})[str(k)] = done.parity
        # a refined artifact rewrote the manifest on disk with this depth's alone; the next
        # depth's gate opens the bundle by it, so it lists every depth's artifacts again
        whole = dataclasses.replace(whole, artifacts=(
            *(a for a in whole.artifacts if a.layers != k), *done.artifacts))
        write_manifest(builder.bundle, whole)
    return dataclasses.replace(manifest, artifacts=tuple(arts), parity=parity)


class ArtifactBuilder:
    """Builds precision artifacts from the fp32 graph of a model (full, or cut after
    `layers` layers); INT8 calibration is computed once."""

    def __init__(self, angle: AngleModel, bundle: Path, plan: PrecisionPlan,
                 layers: int | None = None, depth_source: dict[str, Any] | None = None) -> None:
        self.angle, self.bundle, self.plan, self.layers = angle, bundle, plan, layers
        self.depth_source = depth_source
        self.src = bundle / artifact_file("fp32", layers)
        self._feeds: list[dict[str, np.ndarray]] | None = None
        self._calibration: Calibration | None = None

    def build(self, precision: str, exclude: tuple[str, ...] = (),
              folder: Path | None = None) -> Path:
        dst = (folder or self.bundle) / artifact_file(precision, self.layers)
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

    def artifact_of(self, bundle: Path, file: str, precision: str) -> Artifact:
        """The manifest entry of one of this builder's files (checksums, depth)."""
        return dataclasses.replace(onnx_artifact(bundle, file, precision), layers=self.layers,
                                   depth_source=self.depth_source,
                                   quantization=QUANTIZATION.get(precision))

    def default_exclude(self, precision: str) -> tuple[str, ...]:
        if precision in ("fp16", "bf16"):
            return tuple(self.plan.fp16_exclude)
        if precision == "int8-dynamic" and self.plan.int8_dynamic_exclude is not None:
            return tuple(self.plan.int8_dynamic_exclude)
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
