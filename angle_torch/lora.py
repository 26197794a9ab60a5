"""LoRA adapters for the reference model: find an adapter's base, fold it into the weights."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

ADAPTER_CONFIG = "adapter_config.json"


def merge_lora(backbone: nn.Module, adapter: str | Path) -> nn.Module:
    """Load an adapter onto `backbone` and fold it into the weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(backbone, str(adapter)).merge_and_unload()


def adapter_base(path: str | Path) -> str | None:
    """The base model an adapter directory was trained on, or None if `path` is no adapter."""
    cfg = Path(path) / ADAPTER_CONFIG
    if not cfg.is_file() or (Path(path) / "config.json").is_file():
        return None
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{cfg} does not name its base model (base_model_name_or_path)")
    return base
