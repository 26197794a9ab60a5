"""The UAE-Large-V1 row: BERT-large width (1,024, 16 heads, 4,096 FFN, 512 positions), cls
pooling, max_length 512, Prompts.C as the named prompt `query` (documents get none), from
the model directory's angle_config.json to an Encoder, fp16 gated. The default suite uses one
layer of it; the slow test the full 24 (benchmarks/large_export.py times it)."""

import json

import numpy as np
import pytest

from angle_rt import Encoder
from angle_rt.prompts import PROMPTS

QUERIES = ["how do I reset my router", "symptoms of a cold"]


def _check(model_dir, bundle, max_length=512):
    from angle_torch.model import AngleModel

    m = json.loads((bundle / "angle_rt.json").read_text())
    assert m["pooling"] == "cls" and m["max_length"] == max_length
    assert m["embedding_dim"] == 1024
    assert m["prompts"] == {"query": PROMPTS["C"]} and m["default_prompt"] is None
    fp16 = next(a for a in m["artifacts"] if a["precision"] == "fp16")
    assert fp16["parity"]["passed"] and fp16["parity"]["min_cosine"] >= 0.999
    torch_model = AngleModel.from_pretrained(model_dir, max_length=max_length)
    enc = Encoder(bundle, precision="fp16", backend="cpu")
    q = enc.encode(QUERIES, prompt="query")
    ref = torch_model.encode(QUERIES, prompt="C")
    cos = (q * ref).sum(1) / np.linalg.norm(q, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999
    assert not np.allclose(q, enc.encode(QUERIES), atol=1e-3)  # documents: no prompt


def test_uae_large_width_one_layer(tmp_path):
    """Settings as saved (cls, 512, Prompts.C named `query`); exported at max_length 64 to
    keep the default suite quick (the slow test exports at 512)."""
    from angle_torch.model import AngleModel
    from exporters import export
    from tests.tiny_models import build_random_bert_large

    model_dir = build_random_bert_large(tmp_path / "uae", num_layers=1)
    s = AngleModel.from_pretrained(model_dir).settings
    assert (s.pooling, s.max_length, s.prompts) == ("cls", 512, {"query": PROMPTS["C"]})
    bundle = export(model_dir, tmp_path / "bundle", fp16=True, verify_size=16, max_length=64)
    _check(model_dir, bundle, max_length=64)


@pytest.mark.slow
def test_uae_large_full_size_fp16(tmp_path):
    from exporters import export
    from tests.tiny_models import build_random_bert_large

    model_dir = build_random_bert_large(tmp_path / "uae")
    bundle = export(model_dir, tmp_path / "bundle", fp16=True)
    _check(model_dir, bundle)
