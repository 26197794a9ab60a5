"""A saved AngleModel loads right in sentence-transformers: modules.json and the Pooling
config make `SentenceTransformer(dir)` give AngleModel's vectors (without them ST silently
mean-pooled: cosine 0.68–0.91 to the intended cls vectors)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from angle_torch.model import AngleModel

TEXTS = ["A man is playing a guitar.", "Someone plays music on a stage tonight.",
         "The cat sleeps.", "Two dogs run across a wide green field near the river."]


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_sentence_transformers_loads_the_saved_model_with_its_pooling(tiny_bert_dir,
                                                                      tmp_path, pooling):
    st = pytest.importorskip("sentence_transformers")
    model = AngleModel.from_pretrained(tiny_bert_dir, pooling=pooling)
    out = model.save_pretrained(tmp_path / pooling)
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling"]
    want = model.encode(TEXTS)
    got = st.SentenceTransformer(str(out), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(got, want, atol=2e-5)
    if pooling != "mean":  # what loading without the files gave: another vector
        bare = model.encode(TEXTS)
        mean = AngleModel.from_pretrained(tiny_bert_dir, pooling="mean").encode(TEXTS)
        cos = (bare * mean).sum(1) / np.linalg.norm(bare, axis=1) / np.linalg.norm(mean, axis=1)
        assert cos.min() < 0.999


def test_a_pooling_sentence_transformers_cannot_express_writes_no_modules(tiny_bert_dir,
                                                                          tmp_path):
    out = AngleModel.from_pretrained(tiny_bert_dir, pooling="cls_avg").save_pretrained(
        tmp_path / "m")
    assert not (out / "modules.json").exists()
    assert (out / "angle_config.json").exists()
