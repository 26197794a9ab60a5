"""LoRA through peft: add or reload an adapter for training, merge it for export."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from training.model import AngleModel

ADAPTER_CONFIG = "adapter_config.json"


def linear_module_names(model: nn.Module) -> list[str]:
    """Names (last component) of every nn.Linear, the LM head excepted — angle_emb's default."""
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def add_lora(backbone: nn.Module, cfg: Any) -> nn.Module:
    """Wrap `backbone` with a trainable adapter: a saved one (cfg.lora_path) or a new one."""
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    if cfg.lora_path:  # is_trainable: angle_emb #21 ("does not require grad")
        return PeftModel.from_pretrained(backbone, str(cfg.lora_path), is_trainable=True)
    targets = ([t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
               if cfg.lora_target_modules else linear_module_names(backbone))
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, bias="none",
                        task_type=TaskType.FEATURE_EXTRACTION)
    return get_peft_model(backbone, config)


def merge_lora(backbone: nn.Module, adapter: str | Path) -> nn.Module:
    """Load an adapter onto `backbone` and fold it into the weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(backbone, str(adapter)).merge_and_unload()


def merged_copy(model: AngleModel) -> AngleModel:
    """An AngleModel whose backbone has the (trained) adapter folded in; `model` is untouched."""
    from training.model import AngleModel

    merged = copy.deepcopy(model.backbone).merge_and_unload()
    return AngleModel(merged.eval(), model.hf_tokenizer, copy.deepcopy(model.settings),
                      model.name)


def adapter_base(path: str | Path) -> str | None:
    """The base model an adapter directory was trained on, or None if `path` is no adapter."""
    cfg = Path(path) / ADAPTER_CONFIG
    if not cfg.is_file() or (Path(path) / "config.json").is_file():
        return None
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{cfg} does not name its base model (base_model_name_or_path)")
    return base
