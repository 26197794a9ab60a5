"""--verify-size: the gate's cost scales with the model, its sample keeps the worst cases."""

import json

import pytest

import exporters.gates as gates
from exporters.gates import stratified_sample
from exporters.texts import stress_texts


def test_stratified_sample_spans_every_length():
    lengths = [(i * 37) % 101 for i in range(500)]
    rows = stratified_sample(lengths, 50)
    assert len(rows) == 50 == len(set(rows)) and rows == sorted(rows)
    picked = sorted(lengths[i] for i in rows)
    assert picked[0] == min(lengths) and picked[-1] == max(lengths)
    # every decile of the length distribution keeps its share
    ranked = sorted(lengths)
    for d in range(10):
        lo, hi = ranked[d * 50], ranked[d * 50 + 49]
        assert sum(lo <= v <= hi for v in picked) >= 4
    assert stratified_sample(lengths, 600) == list(range(500))
    assert stratified_sample([3, 9, 1], 1) == [1]  # the longest one


def _export(model, out, **kw):
    from exporters import export

    return json.loads((export(model, out, **kw) / "angle_rt.json").read_text())


def test_verify_size_samples_and_keeps_worst_cases(tiny_bert_dir, tmp_path, monkeypatch):
    seen = {}
    real = gates.Gate.__init__

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        seen["texts"] = self.texts

    monkeypatch.setattr(gates.Gate, "__init__", spy)
    m = _export(tiny_bert_dir, tmp_path / "b", pooling="mean", max_length=64,
                verify_size=40, fp16=True)
    parity = m["parity"]
    assert parity["n_texts"] == 40 and parity["verify_size"] == 40
    assert parity["n_texts_available"] > 1000 and parity["sampling"].startswith("stratified")
    assert all(a["parity"]["n"] == 40 for a in m["artifacts"])
    stress = stress_texts(64)
    assert seen["texts"][-len(stress):] == stress  # every worst-case input, last
    longest = max(seen["texts"][:-len(stress)], key=len)
    assert len(longest) > 1000  # a joined paragraph that reaches max_length is kept


def test_large_models_default_to_a_sample(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(gates, "LARGE_MODEL_PARAMS", 1000)
    monkeypatch.setattr(gates, "DEFAULT_SAMPLE", 30)
    parity = _export(tiny_bert_dir, tmp_path / "b", pooling="cls", max_length=32)["parity"]
    assert parity["n_texts"] == 30 and parity["verify_size"] is None
    assert parity["model_parameters"] > 1000


def test_small_models_check_every_text(tiny_bert_bundle):
    parity = json.loads((tiny_bert_bundle / "angle_rt.json").read_text())["parity"]
    assert parity["n_texts"] == parity["n_texts_available"] > 1000
    assert parity["sampling"] == "all"


def test_bad_verify_size_is_refused(capsys, tiny_bert_dir, tmp_path):
    from exporters.cli import main

    code = main(["--model", str(tiny_bert_dir), "-o", str(tmp_path / "b"), "-q",
                 "--verify-size", "0"])
    assert code == 2 and "verify_size must be ≥ 1" in capsys.readouterr().err


def test_reference_pass_shows_tokens_and_eta(tiny_bert_dir, capsys):
    from angle_torch.model import AngleModel

    AngleModel.from_pretrained(tiny_bert_dir).encode(["a b c"] * 40, batch_size=8,
                                                     show_progress=True)
    err = capsys.readouterr().err
    assert "torch reference" in err and "tok" in err and "<00:00" in err


@pytest.mark.parametrize("n", [0, 5])
def test_tiny_samples(n):
    assert len(stratified_sample(list(range(10)), n)) == n


def test_sampled_gate_samples_sts_pairs_over_the_score_range():
    import numpy as np

    from angle_torch.sts import StsPairs
    from exporters.gates import sample_pairs

    scores = np.linspace(0, 5, 1500)[::-1].copy()
    sts = StsPairs([f"a{i}" for i in range(1500)], [f"b{i}" for i in range(1500)], scores)
    sub = sample_pairs(sts, 400)
    assert len(sub.text1) == len(sub.text2) == len(sub.scores) == 400
    assert sub.scores.min() == 0 and sub.scores.max() == 5
    assert all(sts.text1.index(a) == sts.text2.index(b) for a, b in zip(sub.text1, sub.text2,
                                                                       strict=True))
    assert sample_pairs(sts, 2000) is sts
