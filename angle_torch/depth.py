"""Layer cuts: an AngleModel whose backbone stops after k layers, sharing the full model's
weights (ESE depth variants; the starting point of training.depth's students)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from angle_torch.model import AngleModel


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


def cut_model(angle: AngleModel, layers: int, pick: Sequence[int] | None = None) -> AngleModel:
    """A copy of `angle` whose backbone stops after `layers` layers (weights shared with
    `angle`, which is untouched); pooling and settings as before. `pick` takes those layers
    from other positions (ascending indices, e.g. every other one: a distillation student's
    start); by default the first `layers`."""
    n = int(angle.backbone.config.num_hidden_layers)
    if not 1 <= layers < n:
        raise ValueError(f"--layers takes depths in 1..{n - 1} for this {n}-layer model, "
                         f"got {layers}")
    pick = list(range(layers)) if pick is None else list(pick)
    if len(pick) != layers or pick != sorted(set(pick)) or not 0 <= pick[0] <= pick[-1] < n:
        raise ValueError(f"pick needs {layers} ascending layer indices in 0..{n - 1}, "
                         f"got {pick}")
    backbone = copy.copy(angle.backbone)  # shallow: parameters stay shared
    backbone.config = copy.deepcopy(angle.backbone.config)
    backbone.config.num_hidden_layers = layers
    backbone._modules = dict(backbone._modules)
    parent, attr = layer_list(angle.backbone)
    if parent is angle.backbone:
        backbone._modules[attr] = _picked(getattr(parent, attr), pick)
    else:
        name = next(k for k, m in angle.backbone._modules.items() if m is parent)
        cut_parent = copy.copy(parent)
        cut_parent._modules = dict(parent._modules)
        cut_parent._modules[attr] = _picked(getattr(parent, attr), pick)
        if hasattr(cut_parent, "config"):
            cut_parent.config = backbone.config
        backbone._modules[name] = cut_parent
    settings = copy.deepcopy(angle.settings)
    settings.billm_start = billm_start_of(pick, settings.billm_start)
    return AngleModel(backbone, angle.hf_tokenizer, settings, angle.name)


def billm_start_of(pick: Sequence[int], start: int | None) -> int | None:
    """The BiLLM start of a model made of layers `pick` of one whose layers ≥ `start` are
    bidirectional: the first picked layer at or past `start` (None when none is). The picked
    modules keep their hooks, so this is what the cut computes and what it must be saved as.

    >>> billm_start_of([1, 3], 1), billm_start_of([1, 3], 2), billm_start_of([0, 1], 2)
    (0, 1, None)
    """
    if start is None:
        return None
    below = sum(1 for i in pick if i < start)
    return below if below < len(pick) else None


def _picked(layers: nn.ModuleList, pick: list[int]) -> nn.ModuleList:
    return nn.ModuleList([layers[i] for i in pick])
