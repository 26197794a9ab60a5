"""LoRA through peft for training: add or reload a trainable adapter, merge a copy."""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

from angle_torch.lora import load_adapter
from angle_torch.model import AngleModel

log = logging.getLogger("angle_rt.fit")


def linear_module_names(model: nn.Module) -> list[str]:
    """Names (last component) of every nn.Linear, the LM head excepted — angle_emb's default."""
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def add_lora(backbone: nn.Module, cfg: Any) -> nn.Module:
    """Wrap `backbone` with a trainable adapter: a saved one (cfg.lora_path) or a new one."""
    from peft import LoraConfig, TaskType, get_peft_model

    if cfg.lora_path:  # trainable: angle_emb #21 ("does not require grad")
        model, report = load_adapter(backbone, cfg.lora_path, trainable=True)
        log.info("continuing adapter %s (%d tensors, saved as %s)", cfg.lora_path,
                 report.matched_tensors, report.task_type)
        return model
    targets = ([t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
               if cfg.lora_target_modules else linear_module_names(backbone))
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, bias="none",
                        task_type=TaskType.FEATURE_EXTRACTION)
    return get_peft_model(backbone, config)


def merged_copy(model: AngleModel) -> AngleModel:
    """An AngleModel whose backbone has the (trained) adapter folded in; `model` is untouched."""
    merged = copy.deepcopy(model.backbone).merge_and_unload()
    return AngleModel(merged.eval(), model.hf_tokenizer, copy.deepcopy(model.settings),
                      model.name)
