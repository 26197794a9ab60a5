"""Real fine-tuning runs on this CPU (run by hand; results go in the README).

    python benchmarks/train_recipes.py [stsb] [lora] [nli] [ddp] [fsdp]

stsb  all-MiniLM-L6-v2, full fine-tune on STS-B train (format A), dev for selection
lora  the same with LoRA, then merged, exported, and the bundle scored through angle_rt
nli   NLI triples (format B) to completion; STS-B test before and after
ddp   the stsb recipe as 1 process (batch 32, 2 threads) and as 2 torchrun processes on the
      same CPU (batch 16 each, 1 thread each: the same global batch), both as command lines
fsdp  as ddp, the 2 processes sharding the model (--fsdp, PyTorch FSDP2)
Each prints STS-B test Spearman×100 and seconds per epoch, and appends to
benchmarks/results/train-<date>.json.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from angle_torch.sts import find_shared_data
from benchmarks.models import minilm
from exporters import export
from training.evaluate import evaluate
from training.fit import TrainConfig, fit

RENAME = "sentence1:text1,sentence2:text2,score:label"
OUT = Path("build/train")


def data(name: str) -> str:
    root = find_shared_data()
    if root is None:
        raise SystemExit("shared data not found: set ANGLE_RT_DATA")
    return str(root / name)


def test_score(model: str | Path) -> float:
    return evaluate(model, data("sts/stsb-test.jsonl"))


def run(cfg: TrainConfig) -> tuple[dict, float]:
    start = time.perf_counter()
    result = fit(cfg)
    seconds = time.perf_counter() - start
    epochs = cfg.epochs if cfg.max_steps <= 0 else result.steps  # steps if capped
    return {"best_dev": result.best_spearman, "history": result.history}, seconds / epochs


def sts_config(name: str, **overrides: object) -> TrainConfig:
    """MiniLM on STS-B train (format A), dev for selection: the shared recipe settings."""
    base = dict(model=str(minilm()), train_data=data("sts/stsb-train.jsonl"),
                valid_data=data("sts/stsb-dev.jsonl"), column_rename=RENAME,
                output_dir=str(OUT / name), epochs=2, batch_size=32, learning_rate=2e-5,
                warmup_steps=36, cosine_w=1.0, ibn_w=0.0, angle_w=0.02, eval_steps=90,
                group_by_length=True)
    return TrainConfig(**{**base, **overrides})


def stsb() -> dict:
    cfg = sts_config("minilm-stsb")
    info, per_epoch = run(cfg)
    best = Path(cfg.output_dir) / "best-checkpoint"
    return {"recipe": "stsb", "config": _args(cfg), "seconds_per_epoch": per_epoch,
            "test_before": test_score(minilm()), "test_after": test_score(best), **info}


def lora() -> dict:
    cfg = sts_config("minilm-stsb-lora", learning_rate=3e-4, lora=True, lora_r=32,
                     lora_alpha=32, lora_dropout=0.1, merge=True)
    info, per_epoch = run(cfg)
    merged = Path(cfg.output_dir) / "merged"
    bundle = export(merged, OUT / "minilm-stsb-lora-bundle", force=True)
    return {"recipe": "lora", "config": _args(cfg), "seconds_per_epoch": per_epoch,
            "test_torch_merged": test_score(merged), "test_bundle": test_score(bundle), **info}


def nli() -> dict:
    cfg = TrainConfig(model=str(minilm()), train_data=data("nli/triples.jsonl"),
                      valid_data=data("sts/stsb-dev.jsonl"), column_rename=RENAME,
                      output_dir=str(OUT / "minilm-nli"), epochs=1, batch_size=32,
                      learning_rate=2e-5, warmup_steps=20, ibn_w=1.0, cln_w=1.0,
                      angle_w=0.02, cosine_w=0.0, group_by_length=True)
    info, per_epoch = run(cfg)
    return {"recipe": "nli", "config": _args(cfg), "seconds_per_epoch": per_epoch,
            "test_before": test_score(minilm()), "test_after": test_score(cfg.output_dir),
            **info}


def ddp() -> dict:
    """The stsb recipe as `python -m training.fit` (1 process, batch 32) and under `torchrun
    --nproc_per_node=2` (batch 16 each): the same global batch and steps."""
    return {"recipe": "ddp", **_one_versus_two("ddp")}


def fsdp() -> dict:
    """As ddp, the 2 processes sharding the model (--fsdp): each holds half the weights,
    gradients and AdamW state; gathered per block for its forward and backward."""
    return {"recipe": "fsdp", **_one_versus_two("fsdp", "--fsdp")}


def _one_versus_two(name: str, *two_flags: str) -> dict:
    runs = {}
    for procs in (1, 2):
        cfg = sts_config(f"minilm-stsb-{name}{procs}", batch_size=32 // procs)
        flags = ["--model", cfg.model, "--train-data", cfg.train_data, "--valid-data",
                 cfg.valid_data, "--column-rename", RENAME, "--output-dir", cfg.output_dir,
                 "--epochs", "2", "--batch-size", str(cfg.batch_size), "--learning-rate",
                 "2e-5", "--warmup-steps", "36", "--cosine-w", "1", "--ibn-w", "0",
                 "--angle-w", "0.02", "--eval-steps", "90", "--group-by-length",
                 "--device", "cpu", *(two_flags if procs == 2 else ())]
        launch = [sys.executable] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node=2"]
        env = {**os.environ, "OMP_NUM_THREADS": str(2 // procs),
               "TOKENIZERS_PARALLELISM": "false"}
        start = time.perf_counter()
        subprocess.run([*launch, "-m", "training.fit", *flags], check=True, env=env)
        seconds = time.perf_counter() - start
        runs[procs] = {"seconds": seconds, "batch_size_per_process": cfg.batch_size,
                       "flags": list(two_flags) if procs == 2 else [],
                       "test_after": test_score(Path(cfg.output_dir) / "best-checkpoint"),
                       "test_final": test_score(cfg.output_dir)}
    return {"runs": runs, "wall_ratio_2_over_1": runs[2]["seconds"] / runs[1]["seconds"],
            "test_difference": runs[2]["test_after"] - runs[1]["test_after"],
            "test_final_difference": runs[2]["test_final"] - runs[1]["test_final"]}


def _args(cfg: TrainConfig) -> dict:
    keep = ("epochs", "batch_size", "learning_rate", "cosine_w", "ibn_w", "cln_w", "angle_w",
            "group_by_length", "lora", "lora_r", "lora_alpha")
    return {k: getattr(cfg, k) for k in keep}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    recipes = {"stsb": stsb, "lora": lora, "nli": nli, "ddp": ddp, "fsdp": fsdp}
    chosen = sys.argv[1:] or ["stsb", "lora", "nli"]
    out = Path(__file__).parent / "results" / f"train-{datetime.now(timezone.utc):%Y-%m-%d}.json"
    results = json.loads(out.read_text()) if out.is_file() else []
    for name in chosen:
        res = recipes[name]()
        res["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        print(json.dumps({k: v for k, v in res.items() if k != "history"}, indent=2))
        results.append(res)
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
