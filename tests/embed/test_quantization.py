"""angle_rt.quantization equals sentence-transformers' quantize_embeddings on real vectors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from angle_rt.quantization import (
    PRECISIONS,
    calibration_ranges,
    quantize_embeddings,
    quantized_dtype,
    quantized_width,
)

ST_PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


@pytest.fixture(scope="module")
def real_vectors(minilm_bundle, sentences) -> np.ndarray:
    """MiniLM vectors of 400 STS-B sentences: raw model output (normalized in the graph)
    and the same scaled ×3 (a wider range, as unnormalized models give)."""
    from angle_rt import Encoder

    with Encoder(minilm_bundle) as enc:
        raw = enc.encode(sentences[:200])
        unit = 3 * enc.encode(sentences[200:400])
    return np.vstack([raw, unit])


@pytest.mark.parametrize("precision", ST_PRECISIONS)
def test_equals_sentence_transformers(real_vectors, precision):
    from sentence_transformers.util import quantize_embeddings as st_quantize

    calib = real_vectors[::4]
    for kwargs in ({}, {"calibration_embeddings": calib},
                   {"ranges": calibration_ranges(calib)}):
        ours = quantize_embeddings(real_vectors, precision, **kwargs)
        ref = st_quantize(real_vectors, precision, **kwargs)
        assert ours.dtype == ref.dtype == quantized_dtype(precision), kwargs
        assert ours.shape == ref.shape == (len(real_vectors),
                                           quantized_width(real_vectors.shape[1], precision))
        np.testing.assert_array_equal(ours, ref, err_msg=str(kwargs))
    one = quantize_embeddings(real_vectors[0], precision, ranges=calibration_ranges(calib))
    np.testing.assert_array_equal(
        one, st_quantize(real_vectors[:1], precision, ranges=calibration_ranges(calib))[0])


def test_float16_and_bad_arguments(real_vectors):
    assert quantize_embeddings(real_vectors, "float16").dtype == np.float16
    np.testing.assert_array_equal(quantize_embeddings(real_vectors, "float16"),
                                  real_vectors.astype(np.float16))
    assert set(PRECISIONS) == {"float32", "float16", *ST_PRECISIONS}
    with pytest.raises(ValueError, match="precision must be one of"):
        quantize_embeddings(real_vectors, "int4")
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        quantize_embeddings(real_vectors[:1], "int8")
    with pytest.raises(ValueError, match=r"ranges must have shape \(2, 384\)"):
        quantize_embeddings(real_vectors, "uint8", ranges=np.zeros((2, 10)))
    with pytest.raises(TypeError, match="must be float"):
        quantize_embeddings(quantize_embeddings(real_vectors, "int8"), "binary")


BLOCKED = ("torch", "transformers", "sentence_transformers", "pyarrow", "ray", "tqdm",
           "pandas", "scipy")

ISOLATION = r"""
import sys
BLOCKED = tuple(sys.argv[1].split(","))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
import angle_rt, angle_rt.quantization, angle_rt.embed, angle_rt.embed.cli
heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not heavy, heavy
# the base install embeds JSONL into .npy: pyarrow is for Parquet only
from angle_rt.embed import embed_file
r = embed_file(sys.argv[2], sys.argv[3], sys.argv[4], id_column="id")
assert r.rows > 0
try:
    embed_file(sys.argv[2], sys.argv[3], sys.argv[4] + ".parquet")
except angle_rt.BackendUnavailableError as exc:
    assert "angle-rt[embed]" in str(exc), exc
else:
    raise AssertionError("Parquet output without pyarrow")
print("ok")
"""


def test_runtime_import_stays_slim(tiny_bert_bundle, tmp_path, sentences):
    """`import angle_rt` (and the embed modules) pull none of pyarrow, ray, torch, tqdm; the
    base install runs JSONL → .npy, and Parquet asks for the [embed] extra."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(f'{{"id": {i}, "text": "{t}"}}\n'
                           for i, t in enumerate(["one", "two", "three"])))
    out = subprocess.run([sys.executable, "-c", ISOLATION, ",".join(BLOCKED),
                          str(tiny_bert_bundle), str(src), str(tmp_path / "out.npy")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
