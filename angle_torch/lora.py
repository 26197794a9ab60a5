"""LoRA adapters for the reference model: find an adapter's base, load it onto the headless
backbone whatever model class it was saved from, fold it into the weights, save it the way
angle_emb and peft load it.

peft names an adapter's tensors after the module tree it was trained on:
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` for a CAUSAL_LM adapter
saved from `AutoModelForCausalLM` (angle_emb's LLM layout), `base_model.model.layers.0...`
for one saved from the bare `AutoModel`. Loaded onto the other tree, peft finds none of its
keys, only warns, and merging leaves the weights unchanged. Here every saved tensor is
matched to a LoRA parameter of the backbone (the layout is detected, not assumed) and any
mismatch is an error that counts what matched.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# top-level modules of task models that the headless backbone does not have; adapter
# tensors there cannot change the hidden states, so they are dropped (with a warning)
HEAD_MODULES = frozenset({"lm_head", "embed_out", "score", "classifier", "qa_outputs", "cls"})

log = logging.getLogger("angle_rt.lora")


class AdapterMismatchError(ValueError):
    """The adapter's tensors do not fit the base model (a different model, or a layout
    that cannot be mapped); merging it would silently leave the base weights."""


@dataclass(frozen=True)
class AdapterReport:
    """What was loaded: recorded in the bundle manifest (`source.lora`)."""

    path: str
    base_model: str | None
    task_type: str | None
    peft_type: str
    r: int
    matched_tensors: int
    dropped_head_tensors: int
    key_prefix_removed: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def adapter_config(path: str | Path) -> dict[str, Any] | None:
    cfg = Path(path) / ADAPTER_CONFIG
    return json.loads(cfg.read_text()) if cfg.is_file() else None


def adapter_base(path: str | Path) -> str | None:
    """The base model an adapter directory was trained on, or None if `path` is no adapter."""
    cfg = adapter_config(path)
    if cfg is None or (Path(path) / "config.json").is_file():
        return None
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{Path(path) / ADAPTER_CONFIG} does not name its base model "
                         "(base_model_name_or_path)")
    return base


def load_adapter(backbone: nn.Module, adapter: str | Path,
                 trainable: bool = False) -> tuple[nn.Module, AdapterReport]:
    """Wrap `backbone` (a headless transformers model) in a peft model holding the saved
    adapter's weights, whatever task type and module tree it was saved with.

    AdapterMismatchError unless every LoRA tensor the adapter's config creates on this
    backbone is in the file with the right shape, and every tensor of the file (but those of
    a task head) lands on one of them.
    """
    from peft import PeftConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    path = Path(adapter)
    if not (path / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{path} is not a peft adapter directory (no {ADAPTER_CONFIG})")
    saved_cfg = PeftConfig.from_pretrained(str(path))
    peft_type = str(getattr(saved_cfg.peft_type, "value", saved_cfg.peft_type))
    if peft_type != "LORA":
        raise AdapterMismatchError(f"{path}: a {peft_type} adapter; only LoRA adapters are "
                                   "merged into the weights")
    task_type = saved_cfg.task_type
    task_type = str(getattr(task_type, "value", task_type)) if task_type else None
    cfg = copy.deepcopy(saved_cfg)
    cfg.task_type = None  # a plain PeftModel around the headless backbone
    cfg.inference_mode = not trainable
    try:
        model = get_peft_model(backbone, cfg)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise AdapterMismatchError(f"{path} does not fit {type(backbone).__name__}: {exc}") \
            from None
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    saved = load_peft_weights(str(path), device="cpu")
    mapped, prefix, dropped = _map_keys(saved, expected, backbone)
    _check_fit(path, saved, mapped, expected, prefix)
    if dropped:
        log.warning("%s: %d tensors of a task head (%s) do not affect the hidden states and "
                    "are not loaded", path, len(dropped), ", ".join(sorted(dropped)[:3]))
    result = set_peft_model_state_dict(model, mapped)
    lost = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if lost:
        raise AdapterMismatchError(f"{path}: peft did not load {len(lost)} tensors "
                                   f"({', '.join(lost[:3])})")
    if all(float(v.abs().max()) == 0.0 for k, v in mapped.items() if "lora_B" in k):
        log.warning("%s: every lora_B is zero, so the adapter changes nothing (was it "
                    "trained?)", path)
    if trainable:
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    report = AdapterReport(
        path=str(path), base_model=getattr(saved_cfg, "base_model_name_or_path", None),
        task_type=task_type, peft_type=peft_type, r=int(getattr(saved_cfg, "r", 0)),
        matched_tensors=len(mapped), dropped_head_tensors=len(dropped),
        key_prefix_removed=prefix)
    return model, report


def merge_lora(backbone: nn.Module, adapter: str | Path) -> tuple[nn.Module, AdapterReport]:
    """Load an adapter onto `backbone` (see load_adapter) and fold it into the weights."""
    model, report = load_adapter(backbone, adapter)
    return model.merge_and_unload(), report


def save_adapter(model: nn.Module, out: str | Path, causal_lm: bool,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save the adapter of a peft-wrapped headless backbone as angle_emb saves its own: for
    an LLM (`causal_lm`) as a CAUSAL_LM adapter of `AutoModelForCausalLM` (tensor keys under
    the causal LM's inner model, e.g. base_model.model.model.layers...), so that
    `AnglE.from_pretrained(base, pretrained_lora_path=out, is_llm=True)` and
    `PeftModel.from_pretrained(AutoModelForCausalLM...)` apply it; for an encoder as a
    FEATURE_EXTRACTION adapter of `AutoModel`."""
    from safetensors.torch import load_file, save_file

    out = Path(out)
    # state_dict: the whole model's weights (e.g. gathered from FSDP shards), of which peft
    # saves the adapter's; None: the model's own
    model.save_pretrained(str(out), state_dict=state_dict)
    cfg_path = out / ADAPTER_CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg["task_type"] = "CAUSAL_LM" if causal_lm else "FEATURE_EXTRACTION"
    if causal_lm:
        inner = type(model.get_base_model()).base_model_prefix  # "model" for Llama
        head = "base_model.model."
        weights = load_file(str(out / ADAPTER_WEIGHTS))
        save_file({head + inner + "." + k[len(head):]: v.contiguous()
                   for k, v in weights.items()}, str(out / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _map_keys(saved: dict[str, Any], expected: dict[str, tuple[int, ...]], backbone: nn.Module
              ) -> tuple[dict[str, Any], str | None, list[str]]:
    """Rename the saved tensors onto the backbone's LoRA keys: as saved, or with one leading
    module name after `base_model.model.` removed (the causal LM's `model.`, BERT task
    models' `bert.`), whichever matches more. Head tensors are set apart."""
    head = "base_model.model."
    children = {name for name, _ in backbone.named_children()}
    firsts = {k[len(head):].split(".", 1)[0] for k in saved if k.startswith(head)}
    candidates: list[str | None] = [None]
    candidates += sorted(f for f in firsts | {getattr(backbone, "base_model_prefix", "")}
                         if f and f not in children and f not in HEAD_MODULES)

    def rename(key: str, prefix: str | None) -> str:
        if prefix and key.startswith(f"{head}{prefix}."):
            return head + key[len(head) + len(prefix) + 1:]
        return key

    best = max(candidates, key=lambda p: sum(rename(k, p) in expected for k in saved))
    mapped, dropped = {}, []
    for key, value in saved.items():
        new = rename(key, best)
        first = new[len(head):].split(".", 1)[0] if new.startswith(head) else ""
        if new not in expected and first in HEAD_MODULES:
            dropped.append(key)
        else:
            mapped[new] = value
    return mapped, best, dropped


def _check_fit(path: Path, saved: dict[str, Any], mapped: dict[str, Any],
               expected: dict[str, tuple[int, ...]], prefix: str | None) -> None:
    unmatched = sorted(k for k in mapped if k not in expected)
    missing = sorted(k for k in expected if k not in mapped)
    shapes = sorted(f"{k} {tuple(mapped[k].shape)} vs {expected[k]}" for k in mapped
                    if k in expected and tuple(mapped[k].shape) != expected[k])
    if not (unmatched or missing or shapes):
        return
    n_ok = len(mapped) - len(unmatched) - len(shapes)
    layout = f" (after removing '{prefix}.')" if prefix else ""
    lines = [f"LoRA adapter {path} does not fit the base model: {n_ok} of {len(saved)} "
             f"saved tensors matched{layout}; {len(unmatched)} have no place in the base, "
             f"{len(missing)} of the base's adapter tensors are missing from the file, "
             f"{len(shapes)} have the wrong shape. Was it trained on another model?"]
    for what, keys in (("unmatched", unmatched), ("missing", missing), ("shape", shapes)):
        if keys:
            lines.append(f"  {what}: " + ", ".join(keys[:4]) + (" …" if len(keys) > 4 else ""))
    raise AdapterMismatchError("\n".join(lines))
