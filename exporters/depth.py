"""Depth variants (ESE / layer truncation): the backbone cut after k layers, exported beside
the full model with the same pooling and precisions, each gated against the torch model cut
the same way; and the STS-B dev Spearman and speed of every artifact at each listed width.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from angle_rt import Encoder
from angle_rt.manifest import Artifact, Manifest, artifact_file
from angle_torch.depth import cut_model
from angle_torch.model import AngleModel
from angle_torch.settings import ANGLE_CONFIG_FILE, DEPTH_DIR, DEPTH_KEY
from angle_torch.sts import StsPairs, sts_spearman

log = logging.getLogger("angle_rt.export")


def depth_model(angle: AngleModel, model: str | Path, layers: int,
                distilled: bool = True) -> tuple[AngleModel, dict[str, Any] | None]:
    """The model a depth variant is exported from, and what the manifest records of it: the
    student `training.depth` saved at MODEL/layers-k when there is one (and `distilled`),
    with the full model's settings; otherwise the cut (weights shared with the full model)."""
    student_dir = Path(model) / DEPTH_DIR.format(k=layers)
    if not distilled or not (student_dir / ANGLE_CONFIG_FILE).is_file():
        return cut_model(angle, layers), None
    info = json.loads((student_dir / ANGLE_CONFIG_FILE).read_text()).get(DEPTH_KEY)
    if not info:
        return cut_model(angle, layers), None
    student = AngleModel.from_pretrained(str(student_dir), attn_implementation="eager")
    have = int(student.backbone.config.num_hidden_layers)
    if have != layers or student.embedding_dim != angle.embedding_dim:
        raise ValueError(f"{student_dir} has {have} layers of width {student.embedding_dim}; "
                         f"depth {layers} of this model needs {layers} of width "
                         f"{angle.embedding_dim}: re-run python -m training.depth")
    if student.hf_tokenizer.get_vocab() != angle.hf_tokenizer.get_vocab():
        raise ValueError(f"{student_dir} has another tokenizer than {model}")
    own_start = student.settings.billm_start  # which of its layers attend both ways
    student.settings = copy.deepcopy(angle.settings)  # pooling, prompts as the full model
    student.settings.billm_start = own_start
    student.name = angle.name
    log.info("depth %d: the distilled student in %s (best valid Spearman %s)", layers,
             student_dir, info.get("best_valid_spearman"))
    return student, {"kind": "distilled", "model": student_dir.name,
                     "best_valid_spearman": info.get("best_valid_spearman"),
                     "teacher_layers": info.get("of_layers")}


def with_layers(art: Artifact, layers: int | None) -> Artifact:
    return dataclasses.replace(art, layers=layers)


def variant_files(precisions: list[str], layers: int) -> list[str]:
    """The files a depth variant adds: its fp32 graph, then one per precision."""
    return [artifact_file("fp32", layers)] + [artifact_file(p, layers) for p in precisions]


def score_variants(manifest: Manifest, bundle: Path, sts: StsPairs | None,
                   dims: tuple[int, ...],
                   open_encoder: Callable[..., Encoder] = Encoder) -> Manifest:
    """Every ONNX artifact's STS-B dev Spearman at each width in `dims` (plus the full width)
    and its sentences/s on those sentences (this machine, this run), in its parity entry."""
    if sts is None:
        log.warning("no STS data: depth/width variants are listed without Spearman scores")
        return manifest
    arts = []
    n = len(sts.text1)
    for art in manifest.artifacts:
        if art.format != "onnx":
            arts.append(art)
            continue
        with open_encoder(bundle / art.file, backend="cpu", verify_checksums=False) as enc:
            start = time.perf_counter()
            emb = enc.encode(sts.sentences)
            speed = len(sts.sentences) / (time.perf_counter() - start)
        widths = sorted({*(d for d in dims if d < emb.shape[1]), emb.shape[1]})
        scores = {str(d): round(sts_spearman(emb[:n, :d], emb[n:, :d], sts.scores), 3)
                  for d in widths}
        parity: dict[str, Any] = {**(art.parity or {}), "stsb_dev_by_dim": scores,
                                  "sentences_per_s": round(speed, 1)}
        log.info("%s: STS-B dev %s, %.0f sent/s", art.file, scores, speed)
        arts.append(dataclasses.replace(art, parity=parity))
    return dataclasses.replace(manifest, artifacts=tuple(arts))
