"""Depth variants (ESE / layer truncation): the backbone cut after k layers, exported beside
the full model with the same pooling and precisions, each gated against the torch model cut
the same way; and the STS-B dev Spearman and speed of every artifact at each listed width.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from angle_rt import Encoder
from angle_rt.manifest import Artifact, Manifest, artifact_file
from angle_torch.model import AngleModel
from angle_torch.sts import StsPairs, sts_spearman

log = logging.getLogger("angle_rt.export")


def layer_list(backbone: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the backbone's list of transformer layers: `encoder.layer`
    (BERT, RoBERTa, MPNet, …) or `layers` (Llama, Mistral, Qwen, …)."""
    n = int(getattr(backbone.config, "num_hidden_layers", 0))
    for parent_name, attr in (("encoder", "layer"), ("", "layers"), ("model", "layers")):
        parent = getattr(backbone, parent_name, None) if parent_name else backbone
        layers = getattr(parent, attr, None) if parent is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers) == n:
            return parent, attr
    raise ValueError(f"cannot find the {n} transformer layers of {type(backbone).__name__} "
                     "(looked for encoder.layer and layers); layer cuts support BERT- and "
                     "Llama-style backbones")


def cut_model(angle: AngleModel, layers: int) -> AngleModel:
    """A copy of `angle` whose backbone stops after `layers` layers (weights shared with
    `angle`, which is untouched); pooling and settings as before."""
    n = int(angle.backbone.config.num_hidden_layers)
    if not 1 <= layers < n:
        raise ValueError(f"--layers takes depths in 1..{n - 1} for this {n}-layer model, "
                         f"got {layers}")
    backbone = copy.copy(angle.backbone)  # shallow: parameters stay shared
    backbone.config = copy.deepcopy(angle.backbone.config)
    backbone.config.num_hidden_layers = layers
    backbone._modules = dict(backbone._modules)
    parent, attr = layer_list(angle.backbone)
    if parent is angle.backbone:
        backbone._modules[attr] = nn.ModuleList(list(getattr(parent, attr))[:layers])
    else:
        name = next(k for k, m in angle.backbone._modules.items() if m is parent)
        cut_parent = copy.copy(parent)
        cut_parent._modules = dict(parent._modules)
        cut_parent._modules[attr] = nn.ModuleList(list(getattr(parent, attr))[:layers])
        if hasattr(cut_parent, "config"):
            cut_parent.config = backbone.config
        backbone._modules[name] = cut_parent
    return AngleModel(backbone, angle.hf_tokenizer, copy.deepcopy(angle.settings),
                      angle.name)


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
