"""Data-parallel training under torchrun: 2 CPU processes (gloo) on the tiny BERT.

Without --gather-negatives, 2 processes of micro-batch b equal 1 process of micro-batch b
with gradient accumulation 2 over the same micro-batches (rank r takes micro-batches
r, r + 2, …); with it, the loss and the update equal 1 process's on the joined batch of 2b.
The model is written once, by rank 0, and one result line is printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STS_RENAME = "sentence1:text1,sentence2:text2,score:label"


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory) -> Path:
    """The tiny BERT without dropout: runs that split micro-batches differently across
    processes draw different dropout masks, which is not what is compared here."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tests.tiny_models import minilm_dir

    out = tmp_path_factory.mktemp("bert-no-dropout")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                     initializer_range=0.2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).eval().save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    return out


def _head(source: Path, rows: int, out: Path) -> Path:
    """The first `rows` lines of a JSONL file, as a file of their own."""
    out.write_text("\n".join(source.read_text().splitlines()[:rows]) + "\n")
    return out


@pytest.fixture(scope="module")
def pairs(shared_data, tmp_path_factory) -> Path:
    return _head(shared_data / "sts" / "stsb-train.jsonl", 64,
                 tmp_path_factory.mktemp("pairs") / "train.jsonl")


@pytest.fixture(scope="module")
def dev(shared_data, tmp_path_factory) -> Path:
    return _head(shared_data / "sts" / "stsb-dev.jsonl", 40,
                 tmp_path_factory.mktemp("dev") / "dev.jsonl")


def _fit(model: Path, data: Path, out: Path, procs: int, *flags: str,
         launcher: str = "torchrun") -> list[str]:
    done = _launch(model, data, out, procs, *flags, launcher=launcher)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if line.startswith("{")]


def _launch(model: Path, data: Path, out: Path, procs: int, *flags: str,
            launcher: str = "torchrun", module: str = "training.fit",
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = ["-m", module, "--model", str(model), "--train-data", str(data),
            "--column-rename", STS_RENAME, "--output-dir", str(out), "--max-steps", "3",
            "--warmup-steps", "1", "--learning-rate", "5e-4", "--seed", "3",
            "--logging-steps", "1", "--no-filter-duplicate", "--device", "cpu", *flags]
    cmd = [sys.executable, *args] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={procs}", *args]
    if launcher == "accelerate":  # --multi_gpu picks its torchrun-style launcher; no GPU needed
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(procs), "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", "0", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_with_gradient_accumulation(no_dropout_bert, pairs, tmp_path):
    lines = _fit(no_dropout_bert, pairs, tmp_path / "ddp", 2, "--batch-size", "4",
                 "--save-steps", "3")
    assert len(lines) == 1 and json.loads(lines[0])["processes"] == 2  # rank 0 prints
    assert json.loads(lines[0])["steps"] == 3
    _fit(no_dropout_bert, pairs, tmp_path / "accum", 1, "--batch-size", "4",
         "--gradient-accumulation-steps", "2")
    before = _weights_of(no_dropout_bert)
    ddp, accum = _weights(tmp_path / "ddp"), _weights(tmp_path / "accum")
    assert _close(ddp, before) > 1e-3  # it trained
    assert _close(ddp, accum) < 1e-5
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "accum"), rel=1e-5)
    # a checkpoint resumes only with the number of processes that wrote it (the position
    # in the epoch is per rank): refused, naming both
    again = subprocess.run(
        [sys.executable, "-m", "training.fit", "--model", str(no_dropout_bert),
         "--train-data", str(pairs), "--column-rename", STS_RENAME, "--output-dir",
         str(tmp_path / "ddp"), "--max-steps", "6", "--batch-size", "4", "--resume",
         "--device", "cpu"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "written by 2 process(es)" in again.stderr


def test_two_processes_resume_exactly(tiny_bert_dir, shared_data, tmp_path):
    """Killed past its checkpoint, a 2-process run resumes to the weights and loss log of a
    run never stopped: each rank restores its own RNG states (its dropout masks, its
    collator's picks among list-valued texts) and its losses not yet logged, and the log
    holds each step once."""
    rows = [json.loads(line) for line in
            (shared_data / "sts" / "stsb-train.jsonl").read_text().splitlines()[:64]]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({
        "text1": [r["sentence1"], " ".join(r["sentence1"].split()[:4])],
        "text2": r["sentence2"], "label": r["score"]}) + "\n" for r in rows))
    # 8 steps an epoch; a checkpoint at step 3 (step 3's loss waits for the line at 4),
    # the line at 4 written, then killed taking step 6
    flags = ("--batch-size", "4", "--max-steps", "6", "--save-steps", "3",
             "--logging-steps", "2")
    _fit(tiny_bert_dir, data, tmp_path / "straight", 2, *flags)
    crash = _launch(tiny_bert_dir, data, tmp_path / "resumed", 2, *flags,
                    module="tests.training._crash_fit", env={"CRASH_AT": "5"})
    assert crash.returncode != 0 and "simulated crash at step 5" in crash.stderr
    _fit(tiny_bert_dir, data, tmp_path / "resumed", 2, *flags, "--resume")
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert _close(straight, _weights_of(tiny_bert_dir)) > 1e-3  # it trained
    logs = [(tmp_path / d / "train_log.jsonl").read_text() for d in ("straight", "resumed")]
    assert logs[1] == logs[0] and len(logs[0].splitlines()) == 3


def test_gathered_negatives_equal_one_process_on_the_joined_batch(no_dropout_bert, pairs,
                                                                  tiny_bert_dir, tmp_path):
    _fit(no_dropout_bert, pairs, tmp_path / "gather", 2, "--batch-size", "4",
         "--gather-negatives", "--ibn-w", "1.0")
    _fit(no_dropout_bert, pairs, tmp_path / "joined", 1, "--batch-size", "8", "--ibn-w", "1.0")
    assert _losses(tmp_path / "gather") == pytest.approx(_losses(tmp_path / "joined"),
                                                         rel=1e-5)
    # the updates agree but for float noise, which AdamW turns into ±lr steps on weights
    # whose gradient is ~0 (sign(g) at the first step): compared as whole update vectors
    before = _weights_of(no_dropout_bert)
    a, b = _update(_weights(tmp_path / "gather"), before), _update(
        _weights(tmp_path / "joined"), before)
    assert float((a - b).norm() / b.norm()) < 0.02
    # without gathering the pool is each rank's own 4 pairs: another loss
    _fit(no_dropout_bert, pairs, tmp_path / "local", 2, "--batch-size", "4", "--ibn-w", "1.0")
    assert _losses(tmp_path / "local")[0] != pytest.approx(_losses(tmp_path / "joined")[0],
                                                           rel=1e-4)
    local = _update(_weights(tmp_path / "local"), before)
    assert float((local - b).norm() / b.norm()) > 0.1  # measured 0.44 (gathered: 0.0065)
    # with a teacher, its targets are gathered with the vectors they distill into
    teach = ("--ibn-w", "1.0", "--teacher", str(tiny_bert_dir))
    _fit(no_dropout_bert, pairs, tmp_path / "gather-t", 2, "--batch-size", "4",
         "--gather-negatives", *teach)
    _fit(no_dropout_bert, pairs, tmp_path / "joined-t", 1, "--batch-size", "8", *teach)
    assert _losses(tmp_path / "gather-t") == pytest.approx(_losses(tmp_path / "joined-t"),
                                                           rel=1e-5)
    assert _losses(tmp_path / "gather-t") != pytest.approx(_losses(tmp_path / "joined"),
                                                           rel=1e-4)  # it distilled


# slow: two 2-process runs; torchrun's own equality stays in the fast suite
@pytest.mark.slow
def test_accelerate_launch_trains_like_torchrun(no_dropout_bert, pairs, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m training.fit ... --device cpu`
    (2 gloo processes from accelerate's launcher) trains exactly as torchrun does."""
    pytest.importorskip("accelerate")
    lines = _fit(no_dropout_bert, pairs, tmp_path / "acc", 2, "--batch-size", "4",
                 launcher="accelerate")
    assert len(lines) == 1 and json.loads(lines[0])["processes"] == 2
    _fit(no_dropout_bert, pairs, tmp_path / "run", 2, "--batch-size", "4")
    assert _close(_weights(tmp_path / "acc"), _weights(tmp_path / "run")) < 1e-6
    assert _close(_weights(tmp_path / "acc"), _weights_of(no_dropout_bert)) > 1e-3


def test_fsdp_shards_the_model_and_trains_like_one_process(no_dropout_bert, pairs, dev,
                                                           tmp_path):
    """--fsdp: each of 2 processes holds half the weights (and their AdamW state), yet the
    run equals 1 process with gradient accumulation 2: losses, weights, evaluation and the
    best checkpoint; rank 0 writes whole HF weights; a checkpoint resumes exactly."""
    flags = ("--batch-size", "4", "--valid-data", str(dev), "--eval-steps", "2",
             "--save-steps", "2")
    run = _launch(no_dropout_bert, pairs, tmp_path / "fsdp", 2, *flags, "--fsdp")
    assert run.returncode == 0, run.stderr[-3000:]
    held, total = map(int, re.search(r"rank 0 holds (\d+) of the (\d+)", run.stderr).groups())
    assert total == sum(t.numel() for t in _weights_of(no_dropout_bert).values())
    assert held <= total // 2 + 64  # its shard: half of each weight, rounded up
    result = json.loads(next(x for x in run.stdout.splitlines() if x.startswith("{")))
    ref = json.loads(_fit(no_dropout_bert, pairs, tmp_path / "accum", 1, *flags,
                          "--gradient-accumulation-steps", "2")[0])
    assert result["steps"] == ref["steps"] == 3
    assert result["best_spearman"] == pytest.approx(ref["best_spearman"], abs=1e-6)
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(tmp_path / "accum"), rel=1e-5)
    fsdp = _weights(tmp_path / "fsdp")
    assert _close(fsdp, _weights_of(no_dropout_bert)) > 1e-3  # it trained
    assert _close(fsdp, _weights(tmp_path / "accum")) < 1e-5
    assert _close(_weights(tmp_path / "fsdp" / "best-checkpoint"),
                  _weights(tmp_path / "accum" / "best-checkpoint")) < 1e-5
    # checkpoint.pt was written at step 2 (max_steps 3 stops inside the epoch): resuming
    # scatters it back into the shards and step 3 lands on the same weights
    _fit(no_dropout_bert, pairs, tmp_path / "fsdp", 2, *flags, "--fsdp", "--resume")
    assert _close(_weights(tmp_path / "fsdp"), fsdp) < 1e-6
    plain = _launch(no_dropout_bert, pairs, tmp_path / "fsdp", 2, *flags, "--resume")
    assert plain.returncode != 0 and "written with --fsdp" in plain.stderr  # torchrun: 1
    alone = _launch(no_dropout_bert, pairs, tmp_path / "one", 1, *flags, "--fsdp")
    assert alone.returncode == 2 and "--fsdp shards the model across processes" in alone.stderr


# slow: FSDP itself stays in the fast suite (test_fsdp_shards_the_model_...)
@pytest.mark.slow
def test_fsdp_trains_a_lora_adapter_like_one_process(no_dropout_bert, pairs, tmp_path):
    """Frozen base and trainable adapter weights share FSDP units; rank 0 writes the adapter
    (angle_emb's layout) and the merged model."""
    from angle_torch.model import AngleModel

    flags = ("--batch-size", "4", "--lora", "--lora-r", "4", "--lora-dropout", "0")
    _fit(no_dropout_bert, pairs, tmp_path / "fsdp", 2, *flags, "--fsdp", "--merge")
    _fit(no_dropout_bert, pairs, tmp_path / "accum", 1, *flags,
         "--gradient-accumulation-steps", "2")
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("fsdp", "accum"))
    assert a.keys() == b.keys() and len(a) > 0
    assert _close(a, b) < 1e-5
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    texts = ["A man is playing a guitar.", "Two dogs run through the snow."]
    merged = AngleModel.from_pretrained(tmp_path / "fsdp" / "merged").encode(texts)
    adapted = AngleModel.from_pretrained(tmp_path / "accum").encode(texts)
    assert float(abs(merged - adapted).max()) < 1e-4


def _weights_of(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def _update(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(after[k].float() - before[k].float()).reshape(-1) for k in sorted(after)])
