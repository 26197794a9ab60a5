"""Depth distillation: give the backbone cut after k layers weights of its own, trained to
reproduce the full model's vectors, so a depth variant keeps most of the full model's quality.

ESE trains one set of weights for every depth at once; on MiniLM / STS-B its depth-3 cut
stays 11 points below the full model (docs/training.md has the distilled figures). Here the
student starts from k of the full model's layers spread up to the last (`--distill-init
spread`: layers 2, 4, 6 of 6, so its layer j is the teacher's layer j·n/k, whose output
the token-state loss matches; `first` takes the first k, the ESE cut) and trains on its
own, each step on
- a batch of the text pool (every text of the train data plus `--distill-texts`): MSE and
  1 − cosine to the full model's vectors of the same texts (computed once up front, or in
  the full model's run on the batch that the token-state loss needs), the
  KL of each text's similarity distribution over the batch (`--distill-similarity-weight`),
  and the relative error of its layers' token states to the teacher's layers j·n/k
  (`--distill-token-weight`; the teacher runs on the batch), and
- a batch of the labeled train data with the run's AnglE objective × `--distill-task-weight`.
The student is saved as `<output>/layers-<k>/`, a normal k-layer model directory whose
angle_config.json names its teacher; `angle-export --layers k` exports it in place of the
plain cut (gated against it), and the manifest marks the artifact as distilled.

    python -m training.fit ... --distill-layers 3             # after training, in one run
    python -m training.depth --model ckpts/angle --distill-layers 3 --train-data ...
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from angle_torch.depth import cut_model
from angle_torch.model import AngleModel
from angle_torch.settings import ANGLE_CONFIG_FILE, DEPTH_DIR, DEPTH_KEY
from angle_torch.sts import StsPairs, sts_spearman
from training.config import (
    TrainConfig,
    build_parser,
    get_lr,
    int_list,
    seed_everything,
    valid_pairs,
)
from training.data import FORMATS, AngleCollator, detect_format, load_records

log = logging.getLogger("angle_rt.train")


def depth_layers(spec: str | None) -> list[int]:
    """--distill-layers "2,3" → [2, 3] ([] when unset)."""
    return sorted(set(int_list(spec, "--distill-layers")))


def read_texts(path: str | Path) -> list[str]:
    """Unlabeled texts: a .txt file (one per line) or any data file load_records reads
    (every string column, list elements included)."""
    p = Path(path)
    if p.suffix == ".txt":
        return [t for t in p.read_text(encoding="utf-8").splitlines() if t.strip()]
    return [t for r in load_records(p) for v in r.values() for t in _strings(v)]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v.strip()]
    return []


class TextPool:
    """Unique (text, prompt) pairs as token ids; `targets`, the teacher's vectors of each,
    only where no step runs the teacher anyway (no token-state loss)."""

    def __init__(self, teacher: AngleModel, groups: dict[str | None, list[str]],
                 device: torch.device, with_targets: bool) -> None:
        self.ids: list[list[int]] = []
        for template, texts in groups.items():
            unique = list(dict.fromkeys(texts))
            self.ids += teacher.tokenizer.encode(unique, template)
        if not self.ids:
            raise ValueError("depth distillation has no texts: give --train-data rows or "
                             "--distill-texts")
        self.targets = (teacher.encode_ids(self.ids, 64, device, True, "teacher vectors")
                        if with_targets else None)

    def batches(self, batch_size: int, rng: random.Random) -> list[np.ndarray]:
        """Length-sorted batches (little padding) in a shuffled order."""
        order = np.argsort([len(r) for r in self.ids], kind="stable")
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(chunks)
        return chunks


def distill_depths(cfg: TrainConfig, teacher_dir: str | Path, layers: Sequence[int],
                   output_dir: str | Path | None = None) -> list[Path]:
    """Distil the model at `teacher_dir` into one k-layer student per k in `layers`, as
    `cfg` says; returns the student directories."""
    device = cfg.torch_device()
    teacher = AngleModel.from_pretrained(str(teacher_dir)).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    n = int(teacher.backbone.config.num_hidden_layers)
    bad = [k for k in layers if not 1 <= k < n]
    if bad:
        raise ValueError(f"--distill-layers takes depths in 1..{n - 1} for this {n}-layer "
                         f"model, got {bad}")
    records, collate = _task_data(cfg, teacher)
    pool = TextPool(teacher, _pool_groups(cfg, teacher, records), device,
                    with_targets=cfg.distill_token_weight <= 0)
    valid = valid_pairs(cfg)
    out = Path(output_dir or teacher_dir)
    done = []
    for k in layers:
        seed_everything(cfg.seed)
        student = copy.deepcopy(cut_model(teacher, k, init_layers(cfg.distill_init, k, n)))
        student.to(device)
        for p in student.parameters():
            p.requires_grad_(True)
        history = _train(cfg, student, teacher, pool, records, collate, valid, device)
        done.append(_save(student, out / DEPTH_DIR.format(k=k), teacher_dir, k, n, history,
                          recipe(cfg)))
    return done


def init_layers(init: str, k: int, n: int) -> list[int]:
    """The teacher layers a k-layer student starts from: the first k (the ESE cut), or k
    spread evenly up to the last (DistilBERT's every-other-layer start: layer j starts as
    the teacher's layer j·n/k, whose output the token-state loss maps it to)."""
    if init == "first":
        return list(range(k))
    if init == "spread":
        return [(j + 1) * n // k - 1 for j in range(k)]
    raise ValueError(f"--distill-init takes 'first' or 'spread', got {init!r}")


def _task_data(cfg: TrainConfig, teacher: AngleModel) -> tuple[list[dict], AngleCollator | None]:
    """The train rows (their texts join the pool) and, with a task weight, their collator."""
    records = load_records(cfg.train_data, cfg.column_rename, cfg.train_split)
    if cfg.distill_task_weight <= 0:
        return records, None
    fmt = detect_format(records[0].keys()) if records else "A"
    collate = AngleCollator(teacher.tokenizer, fmt, teacher.pad_token_id,
                            teacher.settings.padding_side, *cfg.prompt_templates(teacher),
                            cfg.filter_duplicate, cfg.seed)
    return records, collate


def _pool_groups(cfg: TrainConfig, teacher: AngleModel, records: list[dict]) -> dict[str | None,
                                                                              list[str]]:
    """Texts by the prompt they are embedded with: the train data's columns with their
    prompts (as the collator applies them), `--distill-texts` with the text prompt."""
    text, query, doc = cfg.prompt_templates(teacher)
    groups: dict[str | None, list[str]] = {}
    if records:
        fmt = detect_format(records[0].keys())
        for i, col in enumerate(FORMATS[fmt][:2] if fmt == "A" else FORMATS[fmt]):
            prompt = text if fmt == "A" else (query if i == 0 else doc)
            groups.setdefault(prompt, []).extend(t for r in records for t in _strings(r[col]))
    for path in (cfg.distill_texts or "").split(","):
        if path.strip():
            groups.setdefault(text, []).extend(read_texts(path.strip()))
    return groups


def _train(cfg: TrainConfig, student: AngleModel, teacher: AngleModel, pool: TextPool,
           records: list[dict], collate: AngleCollator | None, valid: StsPairs | None,
           device: torch.device) -> list[dict[str, float]]:
    from tqdm.auto import tqdm

    k = int(student.backbone.config.num_hidden_layers)
    rng = random.Random(cfg.seed)
    bs = cfg.batch_size * 2  # texts per pool batch: as many as a batch of pairs has rows
    per_epoch = math.ceil(len(pool.ids) / bs)
    total = cfg.distill_epochs * per_epoch
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad],
                            lr=cfg.distill_learning_rate, weight_decay=cfg.weight_decay)
    task = _TaskBatches(records, collate, cfg.batch_size, rng) if collate else None
    loss_fn = cfg.loss()
    history: list[dict[str, float]] = []
    best: tuple[float, dict] | None = None
    step = 0
    with tqdm(total=total, desc=f"distil depth {k}", unit="step") as bar:
        for epoch in range(cfg.distill_epochs):
            student.train()
            for rows in pool.batches(bs, rng):
                for g in opt.param_groups:
                    g["lr"] = get_lr(step, cfg.distill_learning_rate, cfg.warmup_steps, total)
                loss = _step_loss(cfg, student, teacher, pool, rows, task, loss_fn, device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
                opt.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            history.append(_evaluate(student, valid, epoch, step, k))
            score = history[-1].get("spearman")
            if score is not None and (best is None or score > best[0]):
                best = (score, copy.deepcopy(student.state_dict()))
    if best is not None:  # the epoch with the best validation score, as fit's best-checkpoint
        student.load_state_dict(best[1])
    return history


def _step_loss(cfg: TrainConfig, student: AngleModel, teacher: AngleModel, pool: TextPool,
               rows: np.ndarray, task: _TaskBatches | None, loss_fn: Any,
               device: torch.device) -> torch.Tensor:
    """The vector loss on a pool batch (+ the weighted token-state loss), plus the weighted
    task loss on a labeled batch."""
    x, m = student.pad([pool.ids[i] for i in rows], device)
    if cfg.distill_token_weight > 0:  # the teacher runs on the batch: its vectors come along
        states = student.hidden_states(x, m)
        with torch.no_grad():
            teacher_states = teacher.hidden_states(x, m)
            target = teacher.pool(teacher_states[-1], m).float()
        vec = student.pool(states[-1], m).float()
        loss = cfg.distill_token_weight * token_loss(states[1:], teacher_states, m)
    else:
        vec, target = student(x, m).float(), pool.targets[rows].to(device)
        loss = 0.0
    loss = loss + vector_loss(vec, target)
    if cfg.distill_similarity_weight > 0:
        loss = loss + cfg.distill_similarity_weight * similarity_loss(vec, target)
    if task is not None:
        batch = task.next()
        emb = student(batch.input_ids.to(device), batch.attention_mask.to(device))
        labels = batch.labels.to(device) if batch.labels is not None else None
        loss = loss + cfg.distill_task_weight * loss_fn(emb.float(), labels, batch.fmt)
    return loss


def vector_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE (the vectors themselves) + mean(1 − cosine) (their directions, which similarity
    search reads) between student and teacher vectors, [B, D] each → scalar."""
    return F.mse_loss(student, teacher) + (1 - F.cosine_similarity(student, teacher)).mean()


def similarity_loss(student: torch.Tensor, teacher: torch.Tensor,
                    temperature: float = 0.05) -> torch.Tensor:
    """KL divergence of each text's similarity distribution over the rest of the batch, the
    student's from the teacher's (softmax of cosine / temperature): the ranking of neighbours
    that STS and retrieval read, beyond each vector on its own."""
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    eye = torch.eye(len(s), dtype=torch.bool, device=s.device)
    log_s = (s @ s.T / temperature).masked_fill(eye, -1e4).log_softmax(-1)
    log_t = (t @ t.T / temperature).masked_fill(eye, -1e4).log_softmax(-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def token_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
               mask: torch.Tensor) -> torch.Tensor:
    """Mean over the student's k layers of the relative squared error of its token states
    [B, L, D] to the teacher's layer j·n/k (n = len(teacher) − 1: `teacher` starts with the
    embedding output), padding masked out. Relative (÷ the teacher's mean square), so layers
    whose states differ in scale weigh alike."""
    k, n = len(student), len(teacher) - 1
    w = mask.unsqueeze(-1).float()
    total = student[0].new_zeros(())
    for j, s in enumerate(student, start=1):
        t = teacher[j * n // k].float()
        total = total + ((s.float() - t) ** 2 * w).sum() / ((t ** 2) * w).sum().clamp_min(1e-12)
    return total / k


class _TaskBatches:
    """Endless labeled batches: the train rows in a fresh shuffled order each pass."""

    def __init__(self, records: list[dict], collate: AngleCollator, size: int,
                 rng: random.Random) -> None:
        self.records, self.collate, self.size, self.rng = records, collate, size, rng
        self.order: list[int] = []

    def next(self) -> Any:
        if len(self.order) < self.size:
            fresh = list(range(len(self.records)))
            self.rng.shuffle(fresh)
            self.order += fresh
        take, self.order = self.order[:self.size], self.order[self.size:]
        return self.collate([self.records[i] for i in take])


def _evaluate(student: AngleModel, valid: StsPairs | None, epoch: int, step: int,
              k: int) -> dict[str, float]:
    row: dict[str, float] = {"epoch": epoch, "step": step}
    if valid is not None:
        emb = student.encode(valid.sentences, batch_size=64)
        n = len(valid.text1)
        row["spearman"] = sts_spearman(emb[:n], emb[n:], valid.scores)
        log.info("depth %d, epoch %d: valid Spearman %.2f", k, epoch, row["spearman"])
    return row


def recipe(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a student was distilled with (saved with it: what made it, and what a
    rerun compares to reuse it)."""
    return {"epochs": cfg.distill_epochs, "learning_rate": cfg.distill_learning_rate,
            "task_weight": cfg.distill_task_weight, "token_weight": cfg.distill_token_weight,
            "similarity_weight": cfg.distill_similarity_weight,
            "init": cfg.distill_init, "texts": cfg.distill_texts, "seed": cfg.seed}


def _save(student: AngleModel, out: Path, teacher_dir: str | Path, k: int, n: int,
          history: list[dict[str, float]], settings: dict[str, Any]) -> Path:
    student.save_pretrained(out)
    cfg_path = out / ANGLE_CONFIG_FILE
    angle_cfg = json.loads(cfg_path.read_text())
    scores = [h["spearman"] for h in history if "spearman" in h]
    angle_cfg[DEPTH_KEY] = {"layers": k, "of_layers": n, "teacher": str(teacher_dir),
                            "best_valid_spearman": max(scores) if scores else None,
                            "history": history, "recipe": settings}
    cfg_path.write_text(json.dumps(angle_cfg, indent=2) + "\n")
    log.info("distilled depth %d → %s", k, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m training.depth --model TRAINED --distill-layers 3 [fit's flags]`: only the
    depth distillation, for a model trained before."""
    parser = build_parser()
    parser.prog, parser.description = "python -m training.depth", __doc__
    parser.set_defaults(output_dir=None)  # unset: the students go into the model directory
    args = vars(parser.parse_args(argv))
    out = args.pop("output_dir")
    cfg = TrainConfig(**args, output_dir=out or args["model"])
    layers = depth_layers(cfg.distill_layers)
    if not layers:
        raise SystemExit("give --distill-layers K[,K2]: the depths to distil")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for path in distill_depths(cfg, cfg.model, layers, cfg.output_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
