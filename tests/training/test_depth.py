"""Depth distillation (training.depth): a k-layer student of its own, trained towards the full
model's vectors, saved beside the model, exported in place of the plain cut and gated
against itself."""

import json
import math

import numpy as np
import pytest
import torch

from angle_rt import Encoder
from angle_rt.manifest import read_manifest
from angle_torch.model import AngleModel
from exporters import export
from exporters.depth import cut_model, depth_model
from exporters.verify import compare
from training.depth import (
    depth_layers,
    init_layers,
    main,
    read_texts,
    similarity_loss,
    token_loss,
    vector_loss,
)
from training.fit import TrainConfig, fit

STS_RENAME = "sentence1:text1,sentence2:text2,score:label"


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory):
    """300 STS-B train pairs, 200 dev pairs, and 400 NLI texts as a .txt file."""
    out = tmp_path_factory.mktemp("depth-data")
    for name, n in (("stsb-train", 300), ("stsb-dev", 200)):
        lines = (shared_data / "sts" / f"{name}.jsonl").read_text().splitlines()[:n]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    triples = [json.loads(x) for x in
               (shared_data / "nli" / "triples.jsonl").read_text().splitlines()[:200]]
    (out / "extra.txt").write_text("\n".join(t for r in triples
                                             for t in (r["text"], r["positive"])) + "\n")
    return out


@pytest.fixture(scope="module")
def distilled(tiny_bert_dir, data, tmp_path_factory):
    """The tiny BERT fine-tuned for a few steps, then distilled into depth 1 in the same run."""
    out = tmp_path_factory.mktemp("depth-run") / "model"
    cfg = TrainConfig(model=str(tiny_bert_dir), train_data=str(data / "stsb-train.jsonl"),
                      column_rename=STS_RENAME, valid_data=str(data / "stsb-dev.jsonl"),
                      output_dir=str(out), batch_size=16, max_steps=6, warmup_steps=1,
                      learning_rate=5e-4, pooling="mean", max_length=64,
                      distill_layers="1", distill_texts=str(data / "extra.txt"),
                      distill_epochs=3, distill_learning_rate=2e-3)
    fit(cfg)
    return out


def _texts(stsb_test):
    return stsb_test.sentences[:300]


def test_vector_loss_is_mse_plus_mean_cosine_distance():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    mse = ((1 + 4) + (1 + 1)) / 4
    cos = ((1 - 0.0) + (1 - 1.0)) / 2
    assert vector_loss(s, t).item() == pytest.approx(mse + cos)
    assert vector_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_token_loss_is_the_masked_relative_error_at_mapped_layers():
    mask = torch.tensor([[1, 1, 0]])
    t = [torch.full((1, 3, 2), float(v)) for v in range(5)]  # embeddings + 4 teacher layers
    s = [torch.full((1, 3, 2), 1.0), torch.full((1, 3, 2), 4.0)]  # 2 student layers
    s[0][0, 2] = 99.0  # a padded position: masked out
    # student layer 1 ↔ teacher layer 2 (states 2), layer 2 ↔ teacher layer 4 (states 4)
    want = ((1 - 2) ** 2 / 2 ** 2 + (4 - 4) ** 2 / 4 ** 2) / 2
    assert token_loss(s, t, mask).item() == pytest.approx(want)
    assert token_loss([t[2], t[4]], t, mask).item() == 0.0


def test_similarity_loss_is_the_kl_of_neighbour_distributions():
    t = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # 1 ~ 2, 3 apart
    s = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 0.0]])  # 1 ~ 3, 2 apart
    e = math.e
    p, u = (e / (e + 1), 1 / (e + 1)), (0.5, 0.5)  # softmax(1, 0) and softmax(0, 0)

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True))

    # per row, the other two texts: 1 → (2, 3), 2 → (1, 3), 3 → (1, 2), at temperature 1
    want = (kl(p, p[::-1]) + kl(p, u) + kl(u, p)) / 3
    assert similarity_loss(s, t, temperature=1.0).item() == pytest.approx(want, rel=1e-5)
    assert similarity_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_student_init_layers():
    assert init_layers("first", 3, 6) == [0, 1, 2]
    assert init_layers("spread", 3, 6) == [1, 3, 5]  # outputs = the teacher's layers 2, 4, 6
    assert init_layers("spread", 2, 12) == [5, 11] and init_layers("spread", 1, 2) == [1]
    with pytest.raises(ValueError, match="'first' or 'spread'"):
        init_layers("every", 3, 6)


def test_a_cut_can_pick_its_layers(tiny_bert_dir):
    full = AngleModel.from_pretrained(tiny_bert_dir)
    picked = cut_model(full, 1, [1])
    assert picked.backbone.encoder.layer[0] is full.backbone.encoder.layer[1]
    assert cut_model(full, 1).backbone.encoder.layer[0] is full.backbone.encoder.layer[0]
    with pytest.raises(ValueError, match=r"1 ascending layer indices in 0\.\.1"):
        cut_model(full, 1, [2])


def test_student_is_saved_beside_the_model_and_nearer_the_teacher(distilled, stsb_test):
    student_dir = distilled / "layers-1"
    info = json.loads((student_dir / "angle_config.json").read_text())["depth_distilled"]
    assert info["layers"] == 1 and info["of_layers"] == 2 and info["teacher"] == str(distilled)
    assert [h["epoch"] for h in info["history"]] == [0, 1, 2]
    assert info["best_valid_spearman"] == max(h["spearman"] for h in info["history"])
    recipe = info["recipe"]  # the defaults, and what this run set
    assert (recipe["init"], recipe["token_weight"], recipe["similarity_weight"]) == (
        "spread", 1.0, 1.0)
    assert recipe["epochs"] == 3 and recipe["texts"].endswith("extra.txt")
    teacher = AngleModel.from_pretrained(distilled)
    student = AngleModel.from_pretrained(student_dir)
    assert student.backbone.config.num_hidden_layers == 1
    assert student.settings.pooling == teacher.settings.pooling == "mean"
    texts = _texts(stsb_test)  # none of them was trained on
    target = teacher.encode(texts)
    plain = cut_model(teacher, 1).encode(texts)

    def mean_cos(x):
        return float(np.mean(np.sum(x * target, 1) / np.linalg.norm(x, axis=1)
                             / np.linalg.norm(target, axis=1)))

    near = mean_cos(student.encode(texts))  # measured: 0.95 against the plain cut's 0.30
    assert near > 0.8 and near > mean_cos(plain) + 0.3


def test_export_takes_the_student_and_gates_it(distilled, stsb_test, tmp_path):
    bundle = export(distilled, tmp_path / "b", layers=(1,), fp16=True)
    arts = {a.file: a for a in read_manifest(bundle).artifacts}
    assert arts["model.L1.onnx"].depth_source["kind"] == "distilled"
    assert arts["model.L1.fp16.onnx"].depth_source["model"] == "layers-1"
    assert arts["model.onnx"].depth_source is None
    assert arts["model.L1.onnx"].parity["passed"]
    texts = _texts(stsb_test)
    ref = AngleModel.from_pretrained(distilled / "layers-1").encode(texts)
    with Encoder(bundle, layers=1, precision="fp32") as enc:
        assert compare(ref, enc.encode(texts), 0.99999).passed
        weights = {(r["layers"], r["precision"]): r["weights"] for r in enc.variants()}
    assert weights == {(1, "fp32"): "distilled", (1, "fp16"): "distilled",
                       (None, "fp32"): "shared", (None, "fp16"): "shared"}
    plain = export(distilled, tmp_path / "plain", layers=(1,), distilled=False)
    assert read_manifest(plain).artifact("model.L1.onnx").depth_source is None
    cut = cut_model(AngleModel.from_pretrained(distilled), 1).encode(texts)
    with Encoder(plain, layers=1) as enc:
        assert compare(cut, enc.encode(texts), 0.99999).passed


def test_a_student_of_the_wrong_depth_is_refused(distilled, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(distilled, model)
    shutil.copytree(model / "layers-1", model / "layers-2")  # claims depth 2, has 1 layer
    angle = AngleModel.from_pretrained(model)
    with pytest.raises(ValueError, match="has 1 layers of width 32; depth 2"):
        depth_model(angle, model, 2)
    cut, source = depth_model(angle, model, 1, distilled=False)
    assert source is None and cut.backbone.config.num_hidden_layers == 1


def test_depth_cli_on_a_trained_model_and_bad_settings(distilled, data, tmp_path, capsys):
    out = tmp_path / "students"
    args = ["--model", str(distilled), "--train-data", str(data / "stsb-train.jsonl"),
            "--column-rename", STS_RENAME, "--distill-layers", "1", "--distill-epochs", "1",
            "--distill-task-weight", "0", "--batch-size", "16", "--output-dir", str(out)]
    assert main(args) == 0
    assert (out / "layers-1" / "model.safetensors").is_file()
    assert str(out / "layers-1") in capsys.readouterr().out
    # the vector loss alone, from the first layer (no teacher run per step)
    first = tmp_path / "first"
    assert main([*args[:-2], "--distill-token-weight", "0", "--distill-similarity-weight", "0",
                 "--distill-init", "first", "--output-dir", str(first)]) == 0
    info = json.loads((first / "layers-1" / "angle_config.json").read_text())
    assert info["depth_distilled"]["recipe"]["init"] == "first"
    with pytest.raises(ValueError, match=r"depths in 1\.\.1 for this 2-layer model, got \[2\]"):
        main([*args[:-2], "--distill-layers", "2", "--output-dir", str(out)])
    with pytest.raises(ValueError, match="comma-separated ints"):
        depth_layers("3,x")
    assert depth_layers(" 3, 2,3") == [2, 3] and depth_layers(None) == []
    with pytest.raises(ValueError, match="--distill-init takes 'first' or 'spread'"):
        fit(TrainConfig(model=str(distilled), train_data=str(data / "stsb-train.jsonl"),
                        distill_layers="1", distill_init="every"))
    with pytest.raises(ValueError, match="needs --merge"):
        fit(TrainConfig(model=str(distilled), train_data=str(data / "stsb-train.jsonl"),
                        lora=True, distill_layers="1"))


def test_read_texts_takes_txt_lines_and_every_string_column(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n two \n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"q": "x", "docs": ["y", "z"], "n": 3})
                                      + "\n")
    assert read_texts(tmp_path / "a.txt") == ["one", " two "]
    assert read_texts(tmp_path / "b.jsonl") == ["x", "y", "z"]


def test_a_llama_student_distils_and_exports(data, stsb_test, tmp_path):
    """The decoder path: `layers` (not `encoder.layer`), left padding, last-token pooling."""
    from tests.tiny_models import build_tiny_llama

    model = build_tiny_llama(tmp_path / "llama", num_layers=4)
    assert main(["--model", str(model), "--train-data", str(data / "stsb-train.jsonl"),
                 "--column-rename", STS_RENAME, "--distill-layers", "2",
                 "--distill-epochs", "1", "--batch-size", "16"]) == 0
    info = json.loads((model / "layers-2" / "angle_config.json").read_text())
    assert info["depth_distilled"]["of_layers"] == 4
    assert info["depth_distilled"]["recipe"]["init"] == "spread"
    bundle = export(model, tmp_path / "b", layers=(2,), max_length=64)
    art = read_manifest(bundle).artifact("model.L2.onnx")
    assert art.depth_source["kind"] == "distilled" and art.parity["passed"]
    texts = _texts(stsb_test)[:64]
    ref = AngleModel.from_pretrained(model / "layers-2", max_length=64).encode(texts)
    with Encoder(bundle, layers=2) as enc:
        assert compare(ref, enc.encode(texts), 0.99999).passed


@pytest.mark.parametrize(("start", "pick", "want"), [(1, [1, 3], 0), (2, [1, 3], 1),
                                                     (2, [0, 1], None), (3, [0, 2], None)])
def test_a_billm_cut_is_saved_with_the_start_its_layers_have(tmp_path, start, pick, want):
    """The picked layers keep their bidirectional hooks, so the cut's start is the first
    picked layer at or past the model's (layers [1, 3] of a start-1 model are both
    bidirectional: start 0); saved and reloaded, it computes what it computed in memory
    (a start-1 student reloaded as start 1 made its layer 0 causal: 0.31 cosine), and a
    start past its depth (none bidirectional) no longer fails to load."""
    from tests.tiny_models import build_tiny_llama

    base = build_tiny_llama(tmp_path / "llama", num_layers=4)
    model = AngleModel.from_pretrained(base, billm_start=start, pooling="avg")
    cut = cut_model(model, 2, pick)
    assert cut.settings.billm_start == want
    texts = ["a cat sat on the mat", "x", "two dogs run in the snow", "the market fell today"]
    again = AngleModel.from_pretrained(cut.save_pretrained(tmp_path / "cut"))
    assert again.settings.billm_start == want
    assert np.allclose(again.encode(texts), cut.encode(texts), atol=1e-6)
    assert model.settings.billm_start == start  # the full model is untouched


def test_export_keeps_a_students_own_billm_start(tmp_path):
    """depth_model copies the full model's pooling and prompts onto its student, not which
    of the student's layers attend both ways."""
    from tests.tiny_models import build_tiny_llama

    base = build_tiny_llama(tmp_path / "llama", num_layers=4)
    full = AngleModel.from_pretrained(base, billm_start=1, pooling="avg")
    full.save_pretrained(tmp_path / "m")
    student_dir = cut_model(full, 2, [1, 3]).save_pretrained(tmp_path / "m" / "layers-2")
    cfg = json.loads((student_dir / "angle_config.json").read_text())
    cfg["depth_distilled"] = {"layers": 2, "of_layers": 4}
    (student_dir / "angle_config.json").write_text(json.dumps(cfg))
    student, source = depth_model(AngleModel.from_pretrained(tmp_path / "m"), tmp_path / "m", 2)
    assert source["kind"] == "distilled" and student.settings.billm_start == 0
    texts = ["a cat sat on the mat", "x", "two dogs run in the snow"]
    want = cut_model(full, 2, [1, 3]).encode(texts)
    assert np.allclose(student.encode(texts), want, atol=1e-6)
    bundle = export(tmp_path / "m", tmp_path / "b", layers=(2,), verify=False)
    with Encoder(bundle, layers=2) as enc:
        assert compare(want, enc.encode(texts), 0.99999).passed
