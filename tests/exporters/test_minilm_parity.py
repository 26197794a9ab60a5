"""all-MiniLM-L6-v2 (real weights) through the whole chain, on all STS-B test sentences."""

import numpy as np
import pytest

from angle_rt import Encoder
from angle_torch.model import AngleModel
from angle_torch.sts import sts_spearman
from exporters.verify import compare


@pytest.fixture(scope="module")
def sentences(stsb_test):
    return stsb_test.sentences  # 2 × 1,379 = 2,758


@pytest.fixture(scope="module")
def mean_vectors(minilm_bundle, sentences):
    return Encoder(minilm_bundle).encode(sentences)


@pytest.fixture(scope="module")
def torch_mean_vectors(minilm_model, sentences):
    return minilm_model.encode(sentences, normalize=True)


def test_mean_bundle_matches_torch(mean_vectors, torch_mean_vectors, sentences):
    assert len(sentences) == 2758
    report = compare(torch_mean_vectors, mean_vectors, 0.99999)
    assert report.passed, report
    assert report.non_finite == 0


def test_mean_bundle_matches_sentence_transformers(minilm_dir, mean_vectors, sentences):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_dir), device="cpu")
    ref = st.encode(sentences, batch_size=64, convert_to_numpy=True)
    report = compare(ref, mean_vectors, 0.99999)
    assert report.passed, report


def test_cls_bundle_matches_torch(minilm_dir, minilm_cls_fp32_bundle, sentences):
    torch_cls = AngleModel.from_pretrained(minilm_dir, pooling="cls")
    ref = torch_cls.encode(sentences)
    got = Encoder(minilm_cls_fp32_bundle, precision="fp32").encode(sentences)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)  # unnormalized, as exported
    report = compare(ref, got, 0.99999)
    assert report.passed, report


def test_stsb_spearman_equals_torch(stsb_test, mean_vectors, torch_mean_vectors):
    n = len(stsb_test.text1)
    ours = sts_spearman(mean_vectors[:n], mean_vectors[n:], stsb_test.scores)
    ref = sts_spearman(torch_mean_vectors[:n], torch_mean_vectors[n:], stsb_test.scores)
    assert abs(ours - ref) <= 0.01
    assert 81.0 < ours < 83.0  # all-MiniLM-L6-v2 scores ≈ 82.0 on STS-B test


def test_manifest_describes_the_model(minilm_bundle):
    m = Encoder(minilm_bundle).manifest
    assert (m.model_type, m.pooling, m.embedding_dim, m.max_length) == ("bert", "mean", 384, 256)
    assert m.normalized is True  # the ST Normalize module, read from modules.json
    assert "model.safetensors" in m.source["weights_sha256"]
    assert m.parity["results"]["model.onnx"]["min_cosine"] >= 0.99999
