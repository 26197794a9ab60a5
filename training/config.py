"""The knobs of a training run (`TrainConfig`, the `python -m training.fit` flags) and the
helpers the fit loop and depth distillation share: the LR schedule, seeding, validation
pairs."""

from __future__ import annotations

import argparse
import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from angle_torch.sts import StsPairs
from training.data import load_records
from training.ese import EseLoss
from training.losses import AngleLoss


@dataclass
class TrainConfig:
    """Every knob of a run; the CLI flags are these names with dashes."""

    model: str  # hub id or local directory to start from
    train_data: str  # .jsonl/.csv/.parquet, a save_to_disk folder, or a hub dataset
    output_dir: str = "ckpts/angle"  # final model (+ best-checkpoint/, checkpoint.pt)
    valid_data: str | None = None  # format-A data: Spearman, best-checkpoint selection
    column_rename: str | None = None  # "old:new,..." for train and valid data
    train_split: str = "train"  # split of a hub dataset or DatasetDict
    valid_split: str = "validation"
    pooling: str | None = None  # default: what the model was saved with
    max_length: int | None = None  # tokens per text, prompt included
    padding_side: str | None = None
    text_prompt: str | None = None  # format A texts
    query_prompt: str | None = None  # text/query of formats B and C
    doc_prompt: str | None = None  # positive/negative of formats B and C
    filter_duplicate: bool = True  # drop samples repeating a text already in the batch
    group_by_length: bool = False  # batches of similar length (less padding, faster on CPU)
    epochs: int = 1
    max_steps: int = -1  # > 0: stop after this many optimizer steps
    batch_size: int = 32  # samples per micro-batch (pairs or triples)
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5  # angle_emb's default
    weight_decay: float = 0.01
    warmup_steps: int = 100  # linear warmup, then linear decay to 0
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 needs CUDA)
    dtype: str = "fp32"  # weights as loaded: fp32 | bf16 | fp16 (fp16 with LoRA only)
    load_kbit: int | None = None  # 4 | 8: base weights through bitsandbytes (LoRA only)
    # default: on for decoder LLMs (activation memory), off for encoders
    gradient_checkpointing: bool | None = None
    billm_start: int | None = None  # BiLLM/BeLLM: decoder layers ≥ this bidirectional
    seed: int = 42
    device: str | None = None  # default: cuda when available, else cpu
    eval_steps: int = 0  # also evaluate every N steps (always after each epoch)
    save_steps: int = 0  # also write checkpoint.pt every N steps (always after each epoch)
    logging_steps: int = 10
    # under torchrun / accelerate: every rank's vectors join each micro-batch's loss as
    # in-batch negatives (all_gather with gradients), so the pool grows with the devices
    gather_negatives: bool = False
    # under torchrun / accelerate: shard weights, gradients and AdamW state across the
    # processes (PyTorch FSDP2), for models that do not fit one device; see training.distributed
    fsdp: bool = False
    # read --train-data (.jsonl/.parquet/.csv) as training goes, through a shuffle buffer of
    # this many rows, instead of loading it whole (bounded memory for NLI-scale data)
    streaming: bool = False
    shuffle_buffer: int = 10_000
    # continue exactly from output_dir/checkpoint.pt: trainable weights, AdamW state, GradScaler,
    # step/epoch/micro-batch position (same data order, checked), best score and history, and
    # the Python, numpy, torch CPU, CUDA and collator RNGs; see _Trainer._load_checkpoint
    resume: bool = False
    cosine_w: float = 0.0  # loss weights and temperatures: see training.losses.AngleLoss
    ibn_w: float = 1.0
    cln_w: float = 1.0
    angle_w: float = 0.02
    cosine_tau: float = 20.0
    ibn_tau: float = 20.0
    angle_tau: float = 20.0
    lora: bool = False  # train a LoRA adapter instead of every weight
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: str | None = None  # comma list; default every linear layer
    lora_path: str | None = None  # continue training this saved adapter
    merge: bool = False  # with LoRA: also write the merged full model to output_dir/merged
    teacher: str | None = None  # distil from this model (same tokenizer required)
    teacher_temperature: float = 1.0
    teacher_weight: float = 1.0
    teacher_pooling: str | None = None
    ese: bool = False  # Espresso: shallower layers and leading dims trained too (training.ese)
    ese_compression_size: int = 128  # k, the leading dims every layer is trained to fill
    ese_kl_temperature: float = 1.0
    ese_layers: str = "angle_emb"  # angle_emb (its choice of layers) | transformer
    ese_layer_weight: float = 1.0  # × the layer terms (1: angle_emb's weighting)
    matryoshka_dims: str | None = None  # "64,128,256": each leading slice trained as well
    # after training, distil the model into k-layer students, output_dir/layers-k, that
    # angle-export --layers k exports in place of the plain cut (training.depth)
    distill_layers: str | None = None  # "3" or "2,3"
    distill_texts: str | None = None  # comma list of files of extra unlabeled texts
    distill_epochs: int = 4
    distill_learning_rate: float = 1e-4
    distill_task_weight: float = 1.0  # × the AnglE objective on the train data per step
    distill_token_weight: float = 1.0  # × the token-state loss (student layer j ↔ teacher j·n/k)
    distill_similarity_weight: float = 1.0  # × the in-batch similarity-distribution loss
    distill_init: str = "spread"  # the student's layers: k spread up to the last, or "first" k
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes saved with the run

    def loss(self) -> AngleLoss:
        return AngleLoss(cosine_w=self.cosine_w, ibn_w=self.ibn_w, cln_w=self.cln_w,
                         angle_w=self.angle_w, cosine_tau=self.cosine_tau,
                         ibn_tau=self.ibn_tau, angle_tau=self.angle_tau)

    def ese_loss(self) -> EseLoss | None:
        if not self.ese:
            return None
        return EseLoss(self.ese_compression_size, self.ese_kl_temperature,
                       layers=self.ese_layers, layer_weight=self.ese_layer_weight)

    def torch_device(self) -> torch.device:
        """--device, or cuda when available, else cpu."""
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def prompt_templates(self, model: Any) -> tuple[str | None, str | None, str | None]:
        """(text, query, doc) templates of --text/--query/--doc-prompt as `model` resolves
        them (a name or a literal template); None where unset."""
        return tuple(model.prompt_template(p) if p else None  # type: ignore[return-value]
                     for p in (self.text_prompt, self.query_prompt, self.doc_prompt))

    def dims(self) -> list[int]:
        """--matryoshka-dims as ints ([] when unset)."""
        return int_list(self.matryoshka_dims, "--matryoshka-dims")


def int_list(spec: str | None, flag: str) -> list[int]:
    """"64,128" → [64, 128] ([] when unset); ValueError naming `flag` otherwise."""
    try:
        return [int(d) for d in (spec or "").split(",") if d.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated ints, got {spec!r}") from None


def get_lr(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warmup to `base` over `warmup` steps, then linear decay to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    remaining = max(total - warmup, 1)
    return base * max(0.0, (total - step) / remaining)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def valid_pairs(cfg: TrainConfig, data: Any = None) -> StsPairs | None:
    """The format-A evaluation pairs of --valid-data (or of `data`, in memory)."""
    if data is None and not cfg.valid_data:
        return None
    rows = load_records(cfg.valid_data if data is None else data, cfg.column_rename,
                        cfg.valid_split)
    for cols in (("text1", "text2", "label"), ("sentence1", "sentence2", "score")):
        if set(cols) <= rows[0].keys():
            a, b, y = cols
            return StsPairs([r[a] for r in rows], [r[b] for r in rows],
                            np.asarray([float(r[y]) for r in rows]))
    raise ValueError(f"--valid-data needs text1, text2, label (or sentence1, sentence2, score) "
                     f"columns; {cfg.valid_data} has {sorted(rows[0])}")


def build_parser() -> argparse.ArgumentParser:
    """Flags from TrainConfig: `--snake-case` names; booleans as --x / --no-x."""
    p = argparse.ArgumentParser(prog="python -m training.fit",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        required = f.default is dataclasses.MISSING
        if kind.split(" ")[0] == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            conv = {"int": int, "float": float}.get(kind.split(" ")[0], str)
            p.add_argument(flag, type=conv, required=required,
                           default=None if required else f.default)
    return p
