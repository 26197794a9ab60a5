"""BiLLM / BeLLM: decoder layers from a start index on attend bidirectionally.

angle_emb's `apply_billm` loads the `billm` package's model classes, whose layers with
index ≥ BiLLM_START_INDEX (environment variable; unset means 0 = every layer, −1 = off)
get a non-causal mask. Here the same is done to a transformers decoder in place: a forward
pre-hook on each of those layers replaces the causal mask it receives by the key-padding
mask alone (the causal mask's last row: causal order allows every key there, so only
padding is left). The hooks are traced like any other op, so an exported graph carries the
bidirectional mask and the runtime needs nothing.

One deliberate difference: billm gives the bidirectional layers an all-zero mask, so they
also attend to pad tokens and a sentence's vector depends on how much its batch pads it.
Here pads stay masked; for an unpadded text the two are identical.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

from torch import nn

BILLM_ENV = "BiLLM_START_INDEX"


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (`layers`, `h`, `decoder.layers`, ...): the ModuleList with
    config.num_hidden_layers entries."""
    n = getattr(getattr(backbone, "config", None), "num_hidden_layers", None)
    for _, mod in backbone.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise ValueError(f"{type(backbone).__name__}: no list of {n} decoder layers found")


def check_start(start: int, num_layers: int) -> int | None:
    """A BiLLM start layer: None or −1 = off; 0 … num_layers − 1."""
    if start is None or start == -1:
        return None
    if not 0 <= start < num_layers:
        raise ValueError(f"BiLLM start layer {start} is outside 0…{num_layers - 1} for a "
                         f"{num_layers}-layer model (−1 turns BiLLM off)")
    return int(start)


def env_start() -> int:
    """billm's own default: BiLLM_START_INDEX from the environment, 0 when unset."""
    value = os.environ.get(BILLM_ENV, "0")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{BILLM_ENV}={value!r} is not an integer") from None


def apply_billm(backbone: nn.Module, start: int) -> list[int]:
    """Make layers ≥ `start` of a decoder bidirectional (in place); the indices changed."""
    layers = decoder_layers(backbone)
    changed = []
    for i, layer in enumerate(layers):
        if i < start or getattr(layer, "_billm", False):
            continue
        hook = functools.partial(_bidirectional_mask, place=_mask_place(layer))
        layer.register_forward_pre_hook(hook, with_kwargs=True)
        layer._billm = True
        for mod in layer.modules():  # sdpa / flash paths that read the module's flag
            if hasattr(mod, "is_causal"):
                mod.is_causal = False
        changed.append(i)
    return changed


def _bidirectional_mask(module: nn.Module, args: tuple, kwargs: dict[str, Any],
                        place: int | None) -> tuple[tuple, dict[str, Any]]:
    """Replace the layer's 4-D causal mask [B, 1, Q, K] (additive float, or bool = attend)
    by its last query row [B, 1, 1, K], which broadcasts over queries: padding only. The
    mask comes by keyword (Llama, Qwen, Mistral) or in its place in the layer's signature
    (GPT-2 passes it positionally; `place`, read once from the signature)."""
    positional = "attention_mask" not in kwargs and place is not None and len(args) > place
    mask = args[place] if positional else kwargs.get("attention_mask")
    if mask is None:  # no padding and an is_causal fast path: the flag above is enough
        return args, kwargs
    if not hasattr(mask, "ndim") or mask.ndim != 4:
        raise RuntimeError(f"BiLLM needs a 4-D attention mask tensor (eager or sdpa "
                           f"attention), got {type(mask).__name__}")
    if positional:
        return (*args[:place], mask[:, :, -1:, :], *args[place + 1:]), kwargs
    kwargs["attention_mask"] = mask[:, :, -1:, :]
    return args, kwargs


def _mask_place(module: nn.Module) -> int | None:
    """Where `attention_mask` sits among the layer's positional parameters (None: nowhere)."""
    names = [n for n, p in inspect.signature(module.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names.index("attention_mask") if "attention_mask" in names else None
