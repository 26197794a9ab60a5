"""training.fit end to end on tiny and real models (few steps), LoRA and its merge."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import training.fit as fit_mod
from angle_torch.model import AngleModel
from exporters import export
from exporters.texts import builtin_sentences
from exporters.verify import compare
from training.fit import TrainConfig, fit, get_lr

STS_RENAME = "sentence1:text1,sentence2:text2,score:label"


@pytest.fixture(scope="module")
def small_sts(shared_data, tmp_path_factory):
    """150 STS-B train pairs and 200 dev pairs, as jsonl files."""
    out = tmp_path_factory.mktemp("data")
    for name, n in (("stsb-train", 150), ("stsb-dev", 200)):
        lines = (shared_data / "sts" / f"{name}.jsonl").read_text().splitlines()[:n]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def _cfg(model, data, out, **kw):
    base = dict(model=str(model), train_data=str(data / "stsb-train.jsonl"),
                column_rename=STS_RENAME, output_dir=str(out), batch_size=8, max_steps=4,
                warmup_steps=1, learning_rate=5e-4, cosine_w=1.0, logging_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule():
    lrs = [get_lr(s, 1.0, 2, 6) for s in range(6)]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert get_lr(0, 1.0, 0, 4) == 1.0


def test_cli_runs_and_its_output_exports(tiny_bert_dir, small_sts, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.fit", "--model", str(tiny_bert_dir),
           "--train-data", str(small_sts / "stsb-train.jsonl"),
           "--valid-data", str(small_sts / "stsb-dev.jsonl"), "--column-rename", STS_RENAME,
           "--output-dir", str(out), "--max-steps", "3", "--batch-size", "8",
           "--pooling", "cls_avg", "--max-length", "48", "--cosine-w", "1",
           "--no-filter-duplicate"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 3 and isinstance(result["best_spearman"], float)
    assert (out / "best-checkpoint" / "model.safetensors").is_file()
    args = json.loads((out / "training_args.json").read_text())
    assert args["filter_duplicate"] is False and args["pooling"] == "cls_avg"
    bundle = export(out, tmp_path / "bundle")  # settings read from angle_config.json
    manifest = json.loads((bundle / "angle_rt.json").read_text())
    assert (manifest["pooling"], manifest["max_length"]) == ("cls_avg", 48)


def test_cli_errors_are_clear(tiny_bert_dir, small_sts, tmp_path):
    cmd = [sys.executable, "-m", "training.fit", "--model", str(tiny_bert_dir),
           "--train-data", str(small_sts / "stsb-train.jsonl"), "--output-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "sentence1:text1,sentence2:text2,score:label" in proc.stderr


def test_resume_continues_exactly(tiny_bert_dir, shared_data, tmp_path, monkeypatch):
    """Stop mid-epoch at step 4 of 8, resume: bit-identical weights and history to a straight
    run. Dropout is on (torch RNG), text1 is a list the collator samples from (its RNG),
    batches are grouped by length (data order) and steps accumulate two micro-batches."""
    rows = [json.loads(line) for line in
            (shared_data / "sts" / "stsb-train.jsonl").read_text().splitlines()[:40]]
    with (tmp_path / "train.jsonl").open("w") as f:
        for r in rows:  # two phrasings of text1: the collator picks one at random
            variants = [r["sentence1"], " ".join(r["sentence1"].split()[:4])]
            f.write(json.dumps({"text1": variants, "text2": r["sentence2"],
                                "label": r["score"]}) + "\n")
    dev = (shared_data / "sts" / "stsb-dev.jsonl").read_text().splitlines()[:40]
    (tmp_path / "dev.jsonl").write_text("\n".join(dev) + "\n")

    def cfg(out, **kw):  # 40 rows / 8 = 5 micro-batches = 3 steps an epoch; 8 steps in all
        return _cfg(tiny_bert_dir, tmp_path, out, train_data=str(tmp_path / "train.jsonl"),
                    valid_data=str(tmp_path / "dev.jsonl"), column_rename=STS_RENAME,
                    max_steps=8, gradient_accumulation_steps=2, group_by_length=True,
                    filter_duplicate=False, logging_steps=5, **kw)

    straight = fit(cfg(tmp_path / "a"))
    real_step = fit_mod._Trainer._optimizer_step

    def crash_at_six(self):
        # one step past the checkpoint at 4, that work lost; step 5's loss line was
        # written, and steps 1-4's losses were waiting for it when the checkpoint was taken
        if self.step == 5:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self)

    monkeypatch.setattr(fit_mod._Trainer, "_optimizer_step", crash_at_six)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg(tmp_path / "b", save_steps=4))
    monkeypatch.setattr(fit_mod._Trainer, "_optimizer_step", real_step)
    ck = torch.load(tmp_path / "b" / fit_mod.CHECKPOINT, weights_only=False)
    assert (ck["step"], ck["epoch"], ck["micro"]) == (4, 1, 2)  # stopped mid-epoch
    resumed = fit(cfg(tmp_path / "b", save_steps=4, resume=True))
    assert resumed.steps == straight.steps == 8
    assert resumed.history == straight.history
    # the loss log: step 5 once, not twice, and the same mean (steps 1-4's losses kept)
    logged = [(tmp_path / d / fit_mod.TRAIN_LOG).read_text() for d in ("a", "b")]
    assert logged[1] == logged[0] and len(logged[0].splitlines()) == 1
    ref = AngleModel.from_pretrained(straight.output_dir).backbone
    got = AngleModel.from_pretrained(resumed.output_dir).backbone
    assert ref.config.hidden_dropout_prob > 0  # dropout was active
    got_params = dict(got.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.equal(p, got_params[name]), name
    # another seed would make other batches of epoch 2 the ones already done: refused
    with pytest.raises(ValueError, match="data order of epoch 2 differs"):
        fit(cfg(tmp_path / "b", save_steps=4, resume=True, seed=43))
    # another batch size would count the micro-batches done in other rows: refused
    with pytest.raises(ValueError, match="--batch-size 8; resume it with that"):
        fit(cfg(tmp_path / "b", save_steps=4, resume=True, batch_size=4))


def test_precision_checkpointing_and_teacher_options(tiny_bert_dir, tiny_llama_dir, small_sts,
                                                     tmp_path):
    res = fit(_cfg(tiny_bert_dir, small_sts, tmp_path / "bf16", precision="bf16", max_steps=1,
                   gradient_checkpointing=True, teacher=str(tiny_bert_dir),
                   teacher_temperature=2.0))
    assert res.steps == 1
    with pytest.raises(ValueError, match="fp16 autocast needs a CUDA device"):
        fit(_cfg(tiny_bert_dir, small_sts, tmp_path / "fp16", precision="fp16", max_steps=1,
                 device="cpu"))
    with pytest.raises(ValueError, match="different tokenizer"):
        fit(_cfg(tiny_bert_dir, small_sts, tmp_path / "t", teacher=str(tiny_llama_dir)))
    with pytest.raises(ValueError, match="--merge needs --lora"):
        fit(_cfg(tiny_bert_dir, small_sts, tmp_path / "m", merge=True))


def test_triples_train(tiny_bert_dir, shared_data, tmp_path):
    lines = (shared_data / "nli" / "triples.jsonl").read_text().splitlines()[:64]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    cfg = TrainConfig(model=str(tiny_bert_dir), train_data=str(tmp_path / "t.jsonl"),
                      output_dir=str(tmp_path / "out"), batch_size=16, max_steps=2,
                      query_prompt="query: {text}")
    assert fit(cfg).steps == 2


def test_lora_merge_matches_adapter_and_exports(minilm_dir, small_sts, tmp_path):
    from peft import PeftModel

    out = tmp_path / "lora"
    cfg = _cfg(minilm_dir, small_sts, out, lora=True, lora_r=8, lora_alpha=16, merge=True,
               max_steps=3, learning_rate=1e-3)
    fit(cfg)
    assert (out / "adapter_config.json").is_file() and (out / "merged" / "config.json").is_file()
    texts = builtin_sentences()[:200]
    unmerged = AngleModel.from_pretrained(minilm_dir)
    unmerged.backbone = PeftModel.from_pretrained(unmerged.backbone, str(out)).eval()
    adapter_vecs = unmerged.encode(texts)
    merged_vecs = AngleModel.from_pretrained(out / "merged").encode(texts)
    assert compare(adapter_vecs, merged_vecs, 0.99999).passed
    base_vecs = AngleModel.from_pretrained(minilm_dir).encode(texts)
    assert compare(base_vecs, merged_vecs, 0.0).min_cosine < 0.9999  # training changed it
    # the adapter directory itself loads (base + merge) and matches the merged model
    assert np.allclose(AngleModel.from_pretrained(out).encode(texts[:20]), merged_vecs[:20],
                       atol=1e-5)
    # the parity gate passes (on a stratified 300 of its texts: the merge is what is tested)
    bundle = export(out / "merged", tmp_path / "bundle", verify_size=300)
    assert json.loads((bundle / "angle_rt.json").read_text())["parity"]["n_texts"] == 300
    # a saved adapter trains further (angle_emb #21: "does not require grad")
    again = fit(_cfg(minilm_dir, small_sts, tmp_path / "more", lora_path=str(out), max_steps=1))
    assert again.steps == 1
    more = AngleModel.from_pretrained(tmp_path / "more").encode(texts[:20])
    assert not np.allclose(more, merged_vecs[:20], atol=1e-6)


def test_group_by_length_is_a_permutation_of_similar_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=1000)
    order = rng.permutation(1000)
    grouped = fit_mod.group_by_length(order, lengths, 10, np.random.default_rng(1), window=5)
    assert sorted(grouped.tolist()) == list(range(1000))
    spread = [np.ptp(lengths[grouped[i:i + 10]]) for i in range(0, 1000, 10)]
    random_spread = [np.ptp(lengths[order[i:i + 10]]) for i in range(0, 1000, 10)]
    assert np.mean(spread) < np.mean(random_spread) / 3


def test_group_by_length_keeps_every_micro_batch_one_group():
    """Micro-batches are cut every batch_size rows: the short group goes last, else every
    cut after it would straddle two groups (4× the padding on STS-B, 5,749 rows)."""
    lengths = np.random.default_rng(0).permutation(1003)  # distinct: one sorted order
    grouped = fit_mod.group_by_length(np.arange(1003), lengths, 10,
                                      np.random.default_rng(1), window=1000)
    ranks = 1002 - lengths[grouped]  # place in the longest-first order
    for i in range(0, 1000, 10):
        assert ranks[i] % 10 == 0 and sorted(ranks[i:i + 10]) == list(range(ranks[i],
                                                                           ranks[i] + 10))
    assert sorted(ranks[1000:]) == [1000, 1001, 1002]


def test_evaluate_cli_scores_bundles_and_torch_models_alike(tiny_bert_dir, tiny_bert_bundle,
                                                            small_sts):
    data = str(small_sts / "stsb-dev.jsonl")
    scores = {}
    for name, model in (("bundle", tiny_bert_bundle), ("artifact",
                                                       tiny_bert_bundle / "model.onnx")):
        proc = subprocess.run([sys.executable, "-m", "training.evaluate", "--model", str(model),
                               "--data", data], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-1500:]
        scores[name] = json.loads(proc.stdout)["spearman"]
    from training.evaluate import evaluate

    torch_score = evaluate(tiny_bert_dir, data)  # saved settings: cls pooling, 128 tokens
    bundle_score = evaluate(tiny_bert_bundle, data)  # exported with mean, 64 tokens
    assert scores["bundle"] == scores["artifact"] == pytest.approx(bundle_score, abs=1e-3)
    mean_torch = AngleModel.from_pretrained(tiny_bert_dir, pooling="mean", max_length=64)
    from angle_torch.sts import load_sts, sts_spearman

    pairs = load_sts(data)
    emb = mean_torch.encode(pairs.sentences)
    n = len(pairs.text1)
    assert bundle_score == pytest.approx(sts_spearman(emb[:n], emb[n:], pairs.scores), abs=0.01)
    assert torch_score != pytest.approx(bundle_score, abs=1e-6)  # different settings differ
    proc = subprocess.run([sys.executable, "-m", "training.evaluate", "--model",
                           str(tiny_bert_dir), "--data", data, "--precision", "int8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--precision applies to bundles" in proc.stderr


def test_bf16_full_fine_tuning_moves_the_weights_and_the_loss_is_logged(tiny_bert_dir,
                                                                       small_sts, tmp_path):
    """--dtype bf16 without LoRA trains fp32 master weights under bf16 autocast (bf16
    weights took 0.1% of AdamW's updates at lr 1e-5); the loss lands in train_log.jsonl
    every --logging-steps."""
    import torch
    from transformers import AutoModel

    cfg = _cfg(tiny_bert_dir, small_sts, tmp_path / "bf16", dtype="bf16", learning_rate=1e-5,
               max_steps=4, logging_steps=2)
    fit(cfg)
    before = AutoModel.from_pretrained(tiny_bert_dir).state_dict()
    after = AutoModel.from_pretrained(tmp_path / "bf16").state_dict()
    moved = sum(int((after[k].float() != before[k].float()).sum()) for k in before
                if before[k].is_floating_point())
    total = sum(before[k].numel() for k in before if before[k].is_floating_point())
    assert moved / total > 0.9
    assert after["pooler.dense.weight"].dtype == torch.float32
    lines = [json.loads(x) for x in (tmp_path / "bf16" / "train_log.jsonl").read_text()
             .splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert all(np.isfinite(r["loss"]) and r["learning_rate"] > 0 for r in lines)


def test_python_api_takes_a_datasets_dataset(tiny_bert_dir, shared_data, tmp_path):
    """`training.fit(model, train=Dataset, valid=Dataset, **settings)` returns the output
    directory; the module stays importable and runnable as before."""
    import datasets

    import training
    from training.fit import TrainConfig as Cfg

    rows = [json.loads(x) for x in
            (shared_data / "sts" / "stsb-train.jsonl").read_text().splitlines()[:48]]
    dev = [json.loads(x) for x in
           (shared_data / "sts" / "stsb-dev.jsonl").read_text().splitlines()[:40]]
    out = training.fit(tiny_bert_dir, train=datasets.Dataset.from_list(rows),
                       valid=datasets.Dataset.from_list(dev), column_rename=STS_RENAME,
                       output_dir=str(tmp_path / "api"), batch_size=8, max_steps=2,
                       warmup_steps=1)
    assert out == tmp_path / "api" and (out / "angle_config.json").is_file()
    assert (out / "best-checkpoint").is_dir()  # evaluated on the in-memory dev set
    args = json.loads((out / "training_args.json").read_text())
    assert args["train_data"] == "<in memory>" and Cfg is TrainConfig
