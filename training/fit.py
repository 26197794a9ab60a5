"""`python -m training.fit`: fine-tune an AnglE model (full or LoRA), with evaluation.

    python -m training.fit --model DIR_OR_ID --train-data pairs.jsonl --output-dir ckpts/x \
        [--valid-data stsb-dev.jsonl] [--lora] [--merge] [--teacher DIR] ...

Writes a normal Hugging Face directory plus angle_config.json (pooling, prompts,
max_length, padding side), which `angle-export --model OUTPUT_DIR` reads unprompted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from angle_torch.lora import adapter_base
from angle_torch.model import AngleModel
from angle_torch.sts import sts_spearman
from training.config import TrainConfig, build_parser, get_lr, seed_everything, valid_pairs
from training.data import (
    AngleCollator,
    Batch,
    StreamingData,
    check_records,
    detect_format,
    load_records,
)
from training.depth import depth_layers, distill_depths, init_layers
from training.distributed import (
    World,
    average_gradients,
    from_rank0,
    full_optimizer_state,
    full_state_dict,
    gather_objects,
    gather_rows,
    load_full_states,
    mean_over_ranks,
    setup,
    shard,
    teardown,
)
from training.ese import matryoshka_loss
from training.lora import add_lora, merged_copy
from training.losses import distillation_loss

log = logging.getLogger("angle_rt.fit")
CHECKPOINT = "checkpoint.pt"
BEST = "best-checkpoint"
TRAIN_LOG = "train_log.jsonl"  # the training loss every --logging-steps


@dataclass
class FitResult:
    output_dir: Path
    steps: int
    best_spearman: float | None
    history: list[dict[str, float]]


def fit(cfg: TrainConfig, *, train: Any = None, valid: Any = None) -> FitResult:
    """Train as `cfg` says; returns where the model went and the evaluation history.
    `train` / `valid`: in-memory data (a `datasets.Dataset`, `DatasetDict` or list of
    dicts) in place of `cfg.train_data` / `cfg.valid_data`."""
    _check(cfg)
    cfg = _master_weights(cfg)
    seed_everything(cfg.seed)  # the same on every rank: identical LoRA init, data order
    world, device = setup(cfg.torch_device())
    if not world.main:
        logging.getLogger().setLevel(logging.WARNING)  # one process logs
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use --precision bf16 on CPU")
    load: dict[str, Any] = {}
    if cfg.load_kbit:
        load = {"quantization_config": kbit_config(cfg.load_kbit, device),
                "device_map": {"": str(device)}}
    model = AngleModel.from_pretrained(cfg.model, pooling=cfg.pooling,
                                       max_length=cfg.max_length, padding_side=cfg.padding_side,
                                       dtype=DTYPES[cfg.dtype], billm_start=cfg.billm_start,
                                       load_kwargs=load)
    checkpointing = (model.settings.is_decoder if cfg.gradient_checkpointing is None
                     else cfg.gradient_checkpointing)
    if cfg.load_kbit:
        from peft import prepare_model_for_kbit_training

        model.backbone = prepare_model_for_kbit_training(
            model.backbone, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    _save_prompts(cfg, model)
    if cfg.lora or cfg.lora_path:
        model.backbone = add_lora(model.backbone, cfg)
    if checkpointing:
        _enable_checkpointing(model)
    if cfg.fsdp:  # each device receives only its shard
        _shard(cfg, model, world, device)
    elif not cfg.load_kbit:  # a quantized model was placed by device_map
        model.to(device)
    model.train()
    if cfg.streaming:
        if train is not None:
            raise ValueError("--streaming reads --train-data from its file, not in-memory data")
        records: Any = StreamingData(cfg.train_data, cfg.column_rename, cfg.shuffle_buffer)
    else:
        records = load_records(cfg.train_data if train is None else train,
                               cfg.column_rename, cfg.train_split)
    if not len(records):
        raise ValueError(f"{cfg.train_data} has no rows")
    fmt = detect_format((records.first() if cfg.streaming else records[0]).keys())
    if not cfg.streaming:  # a bad row fails now, named, not when its batch comes
        check_records(records, fmt)
    log.info("train data: %d rows, format %s", len(records), fmt)
    valid = valid_pairs(cfg, valid)
    teacher = _teacher(cfg, model, device)
    collate = AngleCollator(model.tokenizer, fmt, model.pad_token_id, model.settings.padding_side,
                            *cfg.prompt_templates(model), cfg.filter_duplicate, cfg.seed)
    result = _Trainer(cfg, model, teacher, collate, records, valid, device, world).run()
    layers = depth_layers(cfg.distill_layers)
    teardown(world)
    if layers and world.main:  # students of the model angle-export reads from output_dir
        merged = cfg.lora or cfg.lora_path
        teacher = result.output_dir / "merged" if merged else result.output_dir
        distill_depths(cfg, teacher, layers, result.output_dir)
    return result


class _Trainer:
    """The loop: micro-batches, accumulation, schedule, evaluation, checkpoints."""

    def __init__(self, cfg, model, teacher, collate, records, valid, device,
                 world: World | None = None) -> None:
        self.cfg, self.model, self.teacher, self.collate = cfg, model, teacher, collate
        self.records, self.valid, self.device = records, valid, device
        self.world = world or World()
        self.sharded = cfg.fsdp and self.world.active  # fit's _shard made it so
        self.out = Path(cfg.output_dir)
        self.loss_fn = cfg.loss()
        self.ese, self.dims = cfg.ese_loss(), cfg.dims()
        # micro-batches of the epoch's order; rank r takes r, r + W, r + 2W, … (a tail
        # that not every rank would get is dropped, as DistributedSampler(drop_last))
        self.global_per_epoch = math.ceil(len(records) / cfg.batch_size)
        self.per_epoch = self.global_per_epoch // self.world.size
        if self.per_epoch < 1:
            raise ValueError(f"{len(records)} rows make {self.global_per_epoch} micro-batches "
                             f"of {cfg.batch_size}: fewer than the {self.world.size} processes")
        self.streaming = isinstance(records, StreamingData)
        self.lengths = np.array([_chars(r) for r in records]) if cfg.group_by_length else None
        steps_per_epoch = math.ceil(self.per_epoch / cfg.gradient_accumulation_steps)
        self.total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
        self.opt = _optimizer(model, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.step, self.epoch, self.micro, self.best = 0, 0, 0, -math.inf
        self.history: list[dict[str, float]] = []
        self._losses: list[float] = []  # micro-batch losses since the last log line
        self._resumed_at: int | None = None  # the checkpoint's step, once resumed
        self._board: Any = None  # a tensorboard SummaryWriter (False: not installed)

    def run(self) -> FitResult:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.cfg.resume:
            self._load_checkpoint()
            self._cut_log()
        else:  # a fresh run's log starts empty; a resumed one goes on
            (self.out / TRAIN_LOG).unlink(missing_ok=True)
        from tqdm.auto import tqdm

        with tqdm(total=self.total, initial=self.step, desc="train", unit="step",
                  disable=not self.world.main) as bar:
            while self.step < self.total:
                self._epoch(bar)
        if not self.history or self.history[-1]["step"] != self.step:
            self._evaluate()  # stopped by max_steps between evaluations
        return self._finish()

    def _epoch(self, bar) -> None:
        """The rest of the current epoch (all of it unless resumed mid-way)."""
        accum = self.cfg.gradient_accumulation_steps
        for i, rows in self._micro_batches():
            loss = self._micro_step(self.collate(rows))
            self._losses.append(loss)
            self.micro = i + 1
            if self.micro % accum and self.micro < self.per_epoch:
                continue
            lr = self._optimizer_step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            self._log_loss(lr)
            self._periodic()
            if self.step >= self.total:
                return
        self.epoch, self.micro = self.epoch + 1, 0
        self._evaluate()
        self._save_checkpoint()

    def _cut_log(self) -> None:
        """A resumed run's loss log goes on from the checkpoint's step: the lines written
        after it (by the run that stopped) are dropped, as the steps are taken again."""
        log_path = self.out / TRAIN_LOG
        if not self.world.main or not log_path.is_file():
            return
        lines = log_path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [x for x in lines if _logged_step(x) <= self.step]
        if len(kept) != len(lines):
            tmp = log_path.with_name(log_path.name + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, log_path)

    def _micro_batches(self) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """(i, rows) of this rank's micro-batches i of the epoch, from self.micro on (a
        resumed run skips those done: not collated, so the collator RNG stays restored).
        Rank r takes the epoch's micro-batches r, r + W, r + 2W, …"""
        size, w = self.cfg.batch_size, self.world
        if self.streaming:
            for g, rows in enumerate(self.records.batches(self.epoch, size, self.cfg.seed)):
                i, owner = divmod(g, w.size)
                if i >= self.per_epoch:
                    return
                if owner == w.rank and i >= self.micro:
                    yield i, rows
            return
        order = self._order(self.epoch)
        for i in range(self.micro, self.per_epoch):
            g = i * w.size + w.rank
            yield i, [self.records[j] for j in order[g * size:(g + 1) * size]]

    def _order(self, epoch: int) -> np.ndarray:
        """The sample order of `epoch`: a function of (seed, epoch, the data, batch_size,
        group_by_length) only, from its own np.random.default_rng(seed + epoch)."""
        rng = np.random.default_rng(self.cfg.seed + epoch)
        order = rng.permutation(len(self.records))
        if self.cfg.group_by_length:
            order = group_by_length(order, self.lengths, self.cfg.batch_size, rng)
        return order

    def _order_digest(self, epoch: int) -> str:
        if self.streaming:  # the order is a function of these (and of the file's rows)
            key = f"{len(self.records)}:{self.cfg.shuffle_buffer}:{self.cfg.seed + epoch}"
            return hashlib.sha256(key.encode()).hexdigest()
        return hashlib.sha256(self._order(epoch).astype(np.int64).tobytes()).hexdigest()

    def _micro_step(self, batch: Batch) -> float:
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        labels = batch.labels.to(self.device) if batch.labels is not None else None
        def objective(vectors: torch.Tensor) -> torch.Tensor:
            return self.loss_fn(vectors.float(), labels, batch.fmt)

        with _autocast(self.cfg.precision, self.device):
            if self.ese is None:
                emb = self.model(ids, mask)
            else:  # every layer's states: the ESE terms pool each of them
                hidden = self.model.hidden_states(ids, mask)
                emb = self.model.pool(hidden[-1], mask)
        gather = self.cfg.gather_negatives and self.world.active
        if gather:
            emb = gather_rows(emb, self.world)  # every rank's vectors: a W× larger pool
            if labels is not None:
                labels = gather_rows(labels, self.world)
        if self.ese is None:
            loss = objective(emb)
        else:
            loss = self.ese(hidden, lambda h: self.model.pool(h, mask), objective)
        if self.dims:
            loss = loss + matryoshka_loss(emb.float(), self.dims, objective)
        if self.teacher is not None:
            with torch.no_grad(), _autocast(self.cfg.precision, self.device):
                target = self.teacher(ids, mask)
                if gather:  # the targets of the gathered vectors, in their order
                    target = gather_rows(target, self.world)
            loss = loss + self.cfg.teacher_weight * distillation_loss(
                emb.float(), target.float(), self.cfg.teacher_temperature)
        scaled = loss / self.cfg.gradient_accumulation_steps
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return float(loss.detach())

    def _optimizer_step(self) -> float:
        lr = get_lr(self.step, self.cfg.learning_rate, self.cfg.warmup_steps, self.total)
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.unscale_(self.opt)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if not self.sharded:  # FSDP already averaged them (reduce-scatter in backward)
            average_gradients(params, self.world)
        torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return lr

    def _log_loss(self, lr: float) -> None:
        """Every --logging-steps optimizer steps: the mean training loss since the last
        line, appended to OUTPUT_DIR/train_log.jsonl (and tensorboard where installed)."""
        every = self.cfg.logging_steps
        if not every or self.step % every or not self._losses:
            return
        loss = mean_over_ranks(float(np.mean(self._losses)), self.world)
        rec = {"step": self.step, "epoch": self.epoch, "loss": loss, "learning_rate": lr}
        self._losses = []
        if not self.world.main:
            return
        with open(self.out / TRAIN_LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        log.info("step %d: loss %.4f (lr %.2e)", self.step, rec["loss"], lr)
        if self._board is None:  # resumed: events past the checkpoint's step are dropped
            self._board = _tensorboard(self.out, self._resumed_at)
        if self._board:
            self._board.add_scalar("train/loss", rec["loss"], self.step)
            self._board.add_scalar("train/learning_rate", lr, self.step)

    def _periodic(self) -> None:
        if self.cfg.eval_steps and self.step % self.cfg.eval_steps == 0:
            self._evaluate()
        if self.cfg.save_steps and self.step % self.cfg.save_steps == 0:
            self._save_checkpoint()

    def _evaluate(self) -> None:
        # rank 0 evaluates and keeps the best, the others go on; sharded, every rank runs the
        # same forwards (each gathers every block from all ranks) and takes rank 0's score
        if not (self.world.main or self.sharded):
            return
        if self.valid is None or (self.history and self.history[-1]["step"] == self.step):
            return
        emb = self.model.encode(self.valid.sentences, batch_size=64, prompt=self.cfg.text_prompt)
        self.model.train()
        n = len(self.valid.text1)
        score = sts_spearman(emb[:n], emb[n:], self.valid.scores)
        if self.sharded:
            score = from_rank0(score, self.world)
        self.history.append({"step": self.step, "epoch": self.epoch, "spearman": score})
        log.info("step %d: valid Spearman %.2f", self.step, score)
        if score > self.best:
            self.best = score
            self._save_model(self.out / BEST)

    def _save_model(self, where: Path) -> None:
        """Rank 0 writes; sharded, every rank joins the gather of the whole weights."""
        state = full_state_dict(self.model) if self.sharded else None
        if not self.world.main:
            return
        self.model.save_pretrained(where, state_dict=state)
        (where / "training_args.json").write_text(
            json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n")

    def _save_checkpoint(self) -> None:
        """Write output_dir/checkpoint.pt (via a temporary file, so a crash while writing
        leaves the previous one whole) with what `_load_checkpoint` restores. Called only
        after an optimizer step, so no half-accumulated gradient is ever lost."""
        if self.sharded:  # every rank joins the gather onto rank 0 (optimizer state by name)
            weights = full_state_dict(self.model)
            optim = full_optimizer_state(self.model, self.opt)
        else:  # the ranks hold the same weights
            weights, optim = self.model.state_dict(), self.opt.state_dict()
        # what differs between ranks: RNG states (dropout, the collator's picks) and the
        # micro-batch losses not yet logged (the next line's mean over ranks needs them)
        ranks = gather_objects({"rng": _rng_states(self.collate),
                                "losses": list(self._losses)}, self.world)
        if not self.world.main:  # rank 0 writes them
            return
        trainable = {k for k, p in self.model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in weights.items() if k in trainable}
        path = self.out / CHECKPOINT
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"model": state, "optimizer": optim, "fsdp": self.sharded,
                    "scaler": self.scaler.state_dict() if self.scaler else None,
                    "step": self.step, "epoch": self.epoch, "micro": self.micro,
                    "data_order": self._order_digest(self.epoch), "best": self.best,
                    "history": self.history, "rng": ranks[0]["rng"], "ranks": ranks,
                    "world_size": self.world.size,
                    "config": dataclasses.asdict(self.cfg)}, tmp)
        os.replace(tmp, path)

    def _load_checkpoint(self) -> None:
        """`--resume`: continue from output_dir/checkpoint.pt as if never stopped.

        Restored: the trainable weights (the frozen rest is reloaded from `model`, as at
        the start); the AdamW state (moments, step counts, param groups); the GradScaler
        (loss scale, growth tracker) with fp16; the optimizer step, epoch and micro-batch
        position in the epoch; the best validation score and the evaluation history; the
        loss log (lines past the checkpoint's step are dropped, the losses not yet logged
        restored); and each rank's own RNG states: Python `random`, numpy's global RNG,
        torch on the CPU (dropout), every CUDA device (torch.cuda.set_rng_state_all, when
        CUDA is available) and the collator (which picks one element of list-valued text
        fields). A checkpoint resumes only with the process count and, mid-epoch, the
        --batch-size that wrote it (ValueError otherwise).

        Not stored, because they are functions of what is: the learning rate (`get_lr` of
        the step and the total) and the data order. Each epoch's order comes from its own
        np.random.default_rng(seed + epoch) (shuffle, then group_by_length bucketing), so
        it is recomputed and its first `micro` micro-batches are skipped (not collated:
        the restored collator RNG already accounts for them); the checkpoint holds a
        SHA-256 of that order (sample indices) and resuming refuses (ValueError) if it
        differs, i.e. the seed, batch_size, group_by_length or the number of train rows
        (or, grouped, their lengths) changed; rows edited in place are not detected.
        Other config changes are allowed and logged as a warning (max_steps, epochs or
        warmup_steps change the LR schedule, so the continuation is then another run).

        With the same config this is exact: on the CPU the final weights equal, bit for
        bit, those of an uninterrupted run (tests/training/test_fit.py). On CUDA, kernels
        that are nondeterministic by themselves (atomics) can still make any two runs,
        resumed or not, differ slightly.
        """
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"--resume: {path} does not exist")
        ck = torch.load(path, map_location="cpu", weights_only=False)
        saved_world = ck.get("world_size", 1)
        if saved_world != self.world.size:  # the micro-batch position is per rank
            raise ValueError(f"--resume: {path} was written by {saved_world} process(es); "
                             f"resume it with {saved_world} (now {self.world.size}): the "
                             "position in the epoch and the data shards depend on it")
        changed = sorted(k for k, v in ck.get("config", {}).items()
                         if k != "resume" and getattr(self.cfg, k, v) != v)
        if changed:
            log.warning("--resume: config differs from the checkpoint's in %s; the "
                        "continuation is not the same run", ", ".join(changed))
        saved_batch = ck.get("config", {}).get("batch_size", self.cfg.batch_size)
        if saved_batch != self.cfg.batch_size and ck["micro"]:
            raise ValueError(f"--resume: {path} was written with --batch-size {saved_batch}; "
                             f"resume it with that (now {self.cfg.batch_size}): the "
                             f"{ck['micro']} micro-batches done in this epoch count rows in "
                             "its batches, so other rows would be trained twice or skipped")
        if ck.get("fsdp", False) != self.sharded:  # the optimizer state's layout differs
            raise ValueError(f"--resume: {path} was written "
                             f"{'with' if ck.get('fsdp') else 'without'} --fsdp; resume it so")
        if self.sharded:
            unexpected = load_full_states(self.model, self.opt, ck["model"], ck["optimizer"])
        else:
            unexpected = self.model.load_state_dict(ck["model"], strict=False).unexpected_keys
            self.opt.load_state_dict(ck["optimizer"])
        if unexpected:
            raise ValueError(f"{path} does not fit this model: {unexpected[:3]}")
        if self.scaler is not None:
            if ck.get("scaler"):
                self.scaler.load_state_dict(ck["scaler"])
            else:
                log.warning("--resume: %s has no GradScaler state; the fp16 loss scale "
                            "starts afresh", path)
        self.step, self.epoch, self.micro = ck["step"], ck["epoch"], ck["micro"]
        if "data_order" in ck and ck["data_order"] != self._order_digest(self.epoch):
            raise ValueError(
                f"--resume: the data order of epoch {self.epoch} differs from {path}'s "
                "(seed, batch_size, group_by_length or the train rows changed), so skipping the "
                f"{self.micro} micro-batches already done would skip other samples")
        self.best, self.history = ck["best"], ck["history"]
        self._resumed_at = self.step
        if "ranks" in ck:  # this rank's own RNG states and unlogged losses
            mine = ck["ranks"][self.world.rank]
            _set_rng_states(mine["rng"], self.collate)
            self._losses = list(mine["losses"])
        elif "rng" in ck:  # written before each rank's state was kept: rank 0's for all
            _set_rng_states(ck["rng"], self.collate)
            if self.world.active:
                log.warning("--resume: %s holds rank 0's RNG states only; the other ranks "
                            "draw other dropout masks than a run never stopped", path)
        else:  # written before the other RNG states were kept
            torch.set_rng_state(ck["torch_rng"])
            log.warning("--resume: %s holds only the torch CPU RNG state; Python, numpy, "
                        "CUDA and collator RNGs start afresh", path)
        log.info("resumed at step %d (epoch %d, micro-batch %d)", self.step, self.epoch,
                 self.micro)

    def _finish(self) -> FitResult:
        if self._board:
            self._board.close()
        self._save_model(self.out)  # rank 0 writes the model, once
        if not self.world.main:
            return FitResult(self.out, self.step, None, [])
        if self.cfg.merge and (self.cfg.lora or self.cfg.lora_path):
            # never merge into quantized weights (the fp32 base + adapter) nor sharded ones
            if self.cfg.load_kbit or self.sharded:
                merged = AngleModel.from_pretrained(self.out)
                merged.name = self.cfg.model
            else:
                merged = merged_copy(self.model)
            merged.save_pretrained(self.out / "merged")
        best = self.best if self.history else None
        if best is not None:
            log.info("best valid Spearman %.2f → %s", best, self.out / BEST)
        return FitResult(self.out, self.step, best, self.history)


def group_by_length(order: np.ndarray, lengths: np.ndarray, batch_size: int,
                    rng: np.random.Generator, window: int = 50) -> np.ndarray:
    """Reorder a shuffled `order` so each batch holds similar lengths: sort within windows
    of `window` batches, cut into batches, shuffle the batches."""
    span = window * batch_size
    chunks = [order[i:i + span] for i in range(0, len(order), span)]
    ordered = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    full = len(ordered) // batch_size
    batches = [ordered[i * batch_size:(i + 1) * batch_size] for i in range(full)]
    # the short batch stays last: anywhere else, every micro-batch after it (cut every
    # batch_size rows) would straddle two groups
    return np.concatenate([*(batches[i] for i in rng.permutation(full)),
                           ordered[full * batch_size:]])


def _logged_step(line: str) -> float:
    """The step of a train_log.jsonl line; inf for one cut short by a crash (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _chars(record: dict[str, Any]) -> int:
    """A cheap length proxy: characters over the record's text fields."""
    return sum(len(v) if isinstance(v, str) else 0 for v in record.values())


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def kbit_config(bits: int, device: torch.device) -> Any:
    """angle_emb's BitsAndBytesConfig (nf4, double quantization, fp32 compute; 8-bit with
    threshold 6), after checking that bitsandbytes is installed and quantizes on `device`
    (ValueError naming what is missing otherwise)."""
    if bits not in (4, 8):
        raise ValueError(f"--load-kbit takes 4 or 8, got {bits}")
    need = ("--load-kbit needs bitsandbytes ≥ 0.49 (pip install 'angle-rt[kbit]') with a "
            "backend for this device: a CUDA GPU, or its CPU backend on Linux x86-64")
    try:
        import bitsandbytes.functional as bnbf
    except Exception as exc:  # ImportError, or a build that fails to load its library
        raise ValueError(f"{need}; importing it failed: {exc}") from None
    try:
        probe = torch.randn(64, 64, device=device)
        if bits == 4:
            packed, state = bnbf.quantize_4bit(probe, quant_type="nf4")
            bnbf.dequantize_4bit(packed, state)
        else:
            bnbf.int8_vectorwise_quant(probe.half())
    except Exception as exc:
        raise ValueError(f"{need}; bitsandbytes {getattr(bnbf, '__version__', '')} cannot "
                         f"quantize on {device} here: {type(exc).__name__}: {exc}") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8,
                              llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False,
                              bnb_4bit_compute_dtype=torch.float32,
                              bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4")


def _save_prompts(cfg: TrainConfig, model: AngleModel) -> None:
    """The prompts the model is trained with become its saved prompts, so evaluation and
    `angle-export` apply them unprompted: one prompt for every text (format A's
    text_prompt, or query = doc) is the default; otherwise `query` and `document` names."""
    s = model.settings
    text, query, doc = cfg.prompt_templates(model)
    if text or (query and query == doc):
        s.default_prompt = text or query
    else:
        s.prompts.update({k: v for k, v in (("query", query), ("document", doc)) if v})


def _tensorboard(out: Path, resumed_at: int | None = None) -> Any:
    """A SummaryWriter under OUTPUT_DIR/runs when tensorboard is installed, else False;
    resumed at step k, it purges the events past k (the steps are taken again)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return False
    purge = None if resumed_at is None else resumed_at + 1
    return SummaryWriter(str(out / "runs"), purge_step=purge)


def _master_weights(cfg: TrainConfig) -> TrainConfig:
    """Full fine-tuning keeps fp32 weights: AdamW's updates (lr × ~1) are far below bf16's
    resolution on weights of magnitude ~0.05 (tiny BERT, 4 steps at 1e-5: 0.1% of bf16
    weights moved). `--dtype bf16` without LoRA therefore means fp32 master weights and bf16
    compute (autocast); LoRA keeps bf16 base weights (they are frozen)."""
    if cfg.dtype != "bf16" or cfg.lora or cfg.lora_path:
        return cfg
    log.info("--dtype bf16 without LoRA: training fp32 master weights under bf16 autocast "
             "(--precision bf16); bf16 weights would not take AdamW's small updates")
    return dataclasses.replace(cfg, dtype="fp32", precision="bf16")


def _shard(cfg: TrainConfig, model: AngleModel, world: World, device: torch.device) -> None:
    """--fsdp: shard the backbone across the processes (training.distributed.shard)."""
    if not world.active:
        raise ValueError("--fsdp shards the model across processes: launch with torchrun "
                         "--nproc_per_node N (or accelerate launch --num_processes N)")
    if cfg.load_kbit:
        raise ValueError("--fsdp does not shard bitsandbytes-quantized weights; run QLoRA "
                         "(--load-kbit) as data parallel, without --fsdp")
    if cfg.precision == "fp16":
        raise ValueError("--fsdp trains with --precision bf16 or fp32: fp16's GradScaler "
                         "does not unscale sharded gradients")
    held, total = shard(model.backbone, world, device)
    log.info("FSDP over %d processes: rank 0 holds %d of the %d parameter values",
             world.size, held, total)


def _check(cfg: TrainConfig) -> None:
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {cfg.precision!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be fp32, bf16 or fp16, got {cfg.dtype!r}")
    lora = cfg.lora or cfg.lora_path
    if cfg.dtype == "fp16" and not lora:
        raise ValueError("--dtype fp16 trains only with --lora: AdamW on fp16 weights loses "
                         "small updates; use --dtype bf16 or fp32 for full fine-tuning")
    if cfg.load_kbit is not None and not lora:
        raise ValueError("--load-kbit quantizes the base weights, which cannot be trained: "
                         "add --lora (QLoRA)")
    if cfg.load_kbit is not None and cfg.load_kbit not in (4, 8):
        raise ValueError(f"--load-kbit takes 4 or 8, got {cfg.load_kbit}")
    if cfg.batch_size < 1 or cfg.gradient_accumulation_steps < 1:
        raise ValueError("batch_size and gradient_accumulation_steps must be ≥ 1")
    if cfg.epochs < 1 and cfg.max_steps <= 0:
        raise ValueError("set epochs ≥ 1 or max_steps > 0")
    depth_layers(cfg.distill_layers)  # a bad list fails before training, not after
    init_layers(cfg.distill_init, 1, 2)  # and a bad --distill-init, by the same check
    if cfg.distill_layers and (cfg.lora or cfg.lora_path) and not cfg.merge:
        raise ValueError("--distill-layers with LoRA needs --merge: the students are full "
                         "models distilled from the merged weights")
    if cfg.streaming and cfg.group_by_length:
        raise ValueError("--group-by-length sorts the whole data; with --streaming batches "
                         "come from the shuffle buffer (drop one of them)")
    if cfg.gather_negatives and cfg.ese:
        raise ValueError("--gather-negatives does not combine with --ese (its layer terms "
                         "pool each rank's own hidden states)")
    if cfg.merge and not (cfg.lora or cfg.lora_path):
        raise ValueError("--merge needs --lora (or --lora-path): there is no adapter to merge")
    base = adapter_base(cfg.model) if lora else None
    if base is not None:  # its adapter is merged in memory; the new one would name `base`
        raise ValueError(
            f"--model {cfg.model} is a LoRA adapter (of {base}): a new adapter trained on it "
            "would be saved against that base alone, losing this one. Continue it with "
            f"--model {base} --lora-path {cfg.model}, or train on its merged copy "
            "(the merged/ directory --merge writes)")


def _rng_states(collate: AngleCollator) -> dict[str, Any]:
    """Every RNG the training loop can draw from, for the checkpoint."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "cuda": cuda, "collator": collate.rng_state()}


def _set_rng_states(states: dict[str, Any], collate: AngleCollator) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    collate.set_rng_state(states["collator"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            log.warning("--resume: the checkpoint has CUDA RNG states for %d devices, this "
                        "machine %d; restoring the first %d", len(cuda),
                        torch.cuda.device_count(), min(len(cuda), torch.cuda.device_count()))
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    elif cuda:
        log.warning("--resume: the checkpoint holds CUDA RNG states but CUDA is unavailable")


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _optimizer(model: AngleModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate)


def _enable_checkpointing(model: AngleModel) -> None:
    backbone = model.backbone
    backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(backbone, "enable_input_require_grads"):
        backbone.enable_input_require_grads()  # LoRA: frozen embeddings still pass gradients


def _teacher(cfg: TrainConfig, student: AngleModel, device: torch.device) -> AngleModel | None:
    if not cfg.teacher:
        return None
    teacher = AngleModel.from_pretrained(cfg.teacher, pooling=cfg.teacher_pooling,
                                         max_length=student.settings.max_length,
                                         padding_side=student.settings.padding_side)
    if teacher.hf_tokenizer.get_vocab() != student.hf_tokenizer.get_vocab():
        raise ValueError(f"teacher {cfg.teacher} has a different tokenizer from {cfg.model}; "
                         "distillation needs the same token ids")
    if teacher.embedding_dim != student.embedding_dim:
        raise ValueError(f"teacher dim {teacher.embedding_dim} ≠ student dim "
                         f"{student.embedding_dim}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()


def train_model(model: str | Path, train: Any, valid: Any = None, **settings: Any) -> Path:
    """The Python API, also as `training.fit(...)`: fine-tune `model` (a hub id or a local
    directory) on `train` — a `datasets.Dataset` / `DatasetDict`, a list of dicts, or a
    path `--train-data` takes — evaluating on `valid` likewise; `settings` are TrainConfig
    fields (output_dir, batch_size, learning_rate, lora, …). Returns the output directory.

    Example (docs/training.md)::

        import training
        out = training.fit("all-MiniLM-L6-v2", train=ds, output_dir="out", epochs=1,
                           column_rename="sentence1:text1,sentence2:text2,score:label")
    """
    on_disk = (str, Path)
    cfg = TrainConfig(model=str(model),
                      train_data=str(train) if isinstance(train, on_disk) else "<in memory>",
                      valid_data=str(valid) if isinstance(valid, on_disk) else
                      ("<in memory>" if valid is not None else None), **settings)
    result = fit(cfg, train=None if isinstance(train, on_disk) else train,
                 valid=None if valid is None or isinstance(valid, on_disk) else valid)
    return result.output_dir


class _CallableModule(types.ModuleType):
    """`training.fit(model, train=..., ...)` calls `train_model`; the module stays the
    module (`python -m training.fit`, `from training.fit import fit, TrainConfig`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        return train_model(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.description = __doc__
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="training.fit: %(message)s")
    try:
        result = fit(TrainConfig(**args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"training.fit: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one result line
        print(json.dumps({"output_dir": str(result.output_dir), "steps": result.steps,
                          "best_spearman": result.best_spearman,
                          "processes": int(os.environ.get("WORLD_SIZE", "1"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
