"""One text, one vector: every artifact gives a text the same vector alone and in any batch;
the export gate measures it, records it and refuses an artifact that fails it."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import warnings

import numpy as np
import pytest

import exporters.verify as verify_mod
from angle_rt import Encoder
from angle_rt.manifest import read_manifest, sha256_file, write_manifest
from angle_torch.model import AngleModel
from exporters import export
from exporters.invariance import InvarianceError, check_invariance, layouts, run_all
from exporters.texts import stress_texts
from exporters.verify import compare

PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")
BOUND = {"fp32": 0.99999, "int8": 0.99999, "int8-dynamic": 0.99999, "fp16": 0.9999}


@pytest.fixture(scope="module")
def held_out(stsb_test) -> list[str]:
    """STS-B test sentences (never used for calibration or the gate) and paragraphs that
    reach max_length, so batches have max_length neighbours."""
    return stsb_test.sentences[::23][:120] + stress_texts(256)[:8]


def alone_vs_batched(enc: Encoder, texts: list[str]) -> tuple[float, int]:
    """Worst per-text cosine between `encode` of the text alone and the same text inside
    `encode` calls of 7 and 64 texts (sorted and shuffled) and hand-made mixed batches
    (random order, a max_length text in each) run as they come; and how many of those
    batched vectors differ from the text's alone in any bit."""
    alone = np.stack([enc.encode(t) for t in texts])
    worst, differ = 1.0, 0
    rng = np.random.default_rng(0)
    for bs in (7, 64):
        for order in (np.argsort([len(t) for t in texts]), rng.permutation(len(texts))):
            got = np.empty_like(alone)
            for i in range(0, len(texts), bs):
                rows = order[i:i + bs]
                got[rows] = enc.encode([texts[j] for j in rows], batch_size=bs)
            worst = min(worst, compare(alone, got, 0).min_cosine)
            differ += int((got != alone).any(axis=1).sum())
    ids = enc.tokenize(texts, enc.template())
    plans = list(layouts([len(r) for r in ids]).values())
    runs = run_all(enc, [[[ids[j] for j in rows] for rows in batches] for batches in plans])
    for batches, outs in zip(plans, runs, strict=True):
        got = np.empty_like(alone)
        for rows, out in zip(batches, outs, strict=True):
            got[rows] = out
        worst = min(worst, compare(alone, got, 0).min_cosine)
        differ += int((got != alone).any(axis=1).sum())
    return worst, differ


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_artifact_gives_a_text_one_vector(minilm_precisions, held_out, precision):
    enc = Encoder(minilm_precisions, precision=precision)
    worst, differ = alone_vs_batched(enc, held_out)
    print(f"{precision}: alone vs batched min cos {worst:.7f}, {differ} vectors differ")
    assert worst >= BOUND[precision]
    # mean pooling sums in token order (angle_torch.pooling.masked_mean): on ONNX Runtime CPU
    # every artifact gives a text the same bits in any batch (ReduceSum's order moved them)
    assert differ == 0
    art = next(a for a in read_manifest(minilm_precisions).artifacts
               if a.precision == precision)
    record = art.parity["batch_invariance"]  # the gate measured and recorded it
    assert record["passed"] and record["min_cosine"] >= BOUND[precision]
    assert record["n_texts"] == 128 and record["batch_sizes"] == [7, 64]
    assert art.batch_invariant


def test_default_cpu_artifact_is_per_token_int8(minilm_precisions):
    enc = Encoder(minilm_precisions)
    assert enc.artifact.precision == "int8-dynamic"
    assert enc.artifact.quantization["activations"] == "per-token"


@pytest.fixture(scope="module")
def per_batch_bundle(minilm_precisions, tmp_path_factory):
    """The bundle with the int8-dynamic artifact of earlier releases: ONNX Runtime's own
    dynamic quantization, one activation scale per tensor (= per batch), as a bundle written
    before invariance was recorded lists it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    bundle = tmp_path_factory.mktemp("legacy") / "b"
    shutil.copytree(minilm_precisions, bundle)
    dst = bundle / "model.int8-dynamic.onnx"
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # quantize_dynamic's warnings; restored for later tests
    try:
        quantize_dynamic(str(bundle / "model.onnx"), str(dst), op_types_to_quantize=["MatMul"],
                         per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)
    manifest = read_manifest(bundle)
    arts = tuple(dataclasses.replace(a, sha256=sha256_file(dst), size_bytes=dst.stat().st_size,
                                     quantization=None, parity={"min_cosine": 0.98})
                 if a.precision == "int8-dynamic" else a for a in manifest.artifacts)
    write_manifest(bundle, dataclasses.replace(manifest, artifacts=arts))
    return bundle


def test_per_batch_scales_fail_the_same_check(per_batch_bundle, held_out):
    """The check above fails on the artifact earlier releases shipped by default."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        enc = Encoder(per_batch_bundle, precision="int8-dynamic")
    worst, _ = alone_vs_batched(enc, held_out)
    print(f"per-batch dynamic int8: alone vs batched min cos {worst:.5f}")
    assert worst < 0.999
    with pytest.raises(InvarianceError, match="not batch-invariant"):
        check_invariance(enc, held_out, "int8-dynamic")


def test_a_per_batch_artifact_is_never_the_default(per_batch_bundle):
    assert Encoder(per_batch_bundle).artifact.precision == "int8"  # next invariant one
    with pytest.warns(RuntimeWarning, match="not batch-invariant"):
        Encoder(per_batch_bundle, precision="int8-dynamic")
    with pytest.warns(RuntimeWarning, match="not batch-invariant"):  # opened by its file too
        Encoder(per_batch_bundle / "model.int8-dynamic.onnx")


def test_export_refuses_a_batch_dependent_artifact(tiny_bert_dir, tmp_path, monkeypatch):
    """An artifact that gives a text another vector in another batch fails the gate with
    its own error (no per-layer refinement), and nothing is written."""
    import exporters.pipeline as pipeline

    def per_batch(src, dst, exclude=()):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"],
                         per_channel=True, weight_type=QuantType.QInt8)
        return dst

    monkeypatch.setattr(pipeline, "quantize_dynamic_int8", per_batch)
    monkeypatch.setitem(verify_mod.THRESHOLDS, "int8-dynamic", 0.5)  # parity is not the point
    with pytest.raises(InvarianceError, match=r"model\.int8-dynamic\.onnx is not batch-invariant"):
        export(tiny_bert_dir, tmp_path / "b", pooling="mean", max_length=32, int8_dynamic=True)
    assert not (tmp_path / "b").exists()


def test_tiny_models_record_invariance_for_every_precision(tiny_llama_dir, tmp_path):
    """Decoder, left padding, fp16 and bf16 (the reference evaluator: a smaller sample)."""
    bundle = export(tiny_llama_dir, tmp_path / "b", padding_side="left", max_length=32,
                    fp16=True, bf16=True, int8_dynamic=True)
    arts = {a["precision"]: a for a in json.loads((bundle / "angle_rt.json").read_text())
            ["artifacts"]}
    for precision, art in arts.items():
        record = art["parity"]["batch_invariance"]
        assert record["passed"], (precision, record)
    assert arts["bf16"]["parity"]["batch_invariance"]["n_texts"] == 16


def test_a_decoder_bundle_pads_right_so_vectors_are_bit_exact(tiny_llama_dir, stsb_test,
                                                              tmp_path):
    """A decoder's tokenizer pads left; the bundle pads right unless asked: a text keeps its
    columns in any batch, so fp32 and both INT8 schemes give it the same bits alone and
    batched. Left padding shifts its positions and sums with the longest neighbour (a
    random 6-layer Llama's static INT8 failed the gate at 0.99982; bit-exact padded right),
    and stays available when asked for."""
    texts = [*stsb_test.sentences[:64], "x", " ".join(stsb_test.sentences[:30])]
    for side, exact in ((None, True), ("left", False)):
        bundle = export(tiny_llama_dir, tmp_path / f"b-{side}", max_length=64,
                        padding_side=side, verify=False, int8=True, int8_dynamic=True)
        for precision in ("fp32", "int8", "int8-dynamic"):
            with Encoder(bundle, precision=precision) as enc:
                assert enc.manifest.padding_side == (side or "right")
                alone = np.concatenate([enc.encode([t]) for t in texts])
                same = np.array_equal(alone, enc.encode(texts, batch_size=16))
            assert same or not exact, (side, precision)
        assert exact or not same  # int8-dynamic: 7e-7 apart under left padding
    ref = AngleModel.from_pretrained(tiny_llama_dir, max_length=64)  # pads left in torch
    with Encoder(tmp_path / "b-None", precision="fp32") as enc:
        assert compare(ref.encode(texts), enc.encode(texts), 0.99999).passed
