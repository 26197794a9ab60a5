"""FP16 / BF16 / INT8 artifacts: gates on real sentences, graph structure, failures."""

import json

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

import exporters.verify as verify_mod
from angle_rt import Encoder
from angle_torch.sts import sts_spearman
from exporters import export
from exporters.cli import main
from exporters.precision import fp32_islands
from exporters.quantize import QMAX, linear_layers
from exporters.texts import builtin_sentences, stress_texts
from tests.conftest import MINILM_KEPT

PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")


@pytest.mark.slow
def test_int8_search_from_scratch_keeps_few_layers_in_float(minilm_dir, tmp_path, stsb_test):
    """No exclusions given: the gate fails, whole layer types go to float, then the
    outlier-ordered binary search quantizes back as many layers as the gate allows."""
    bundle = export(minilm_dir, tmp_path / "b", int8=True, int8_dynamic=True)
    arts = {a["precision"]: a for a in json.loads((bundle / "angle_rt.json").read_text())
            ["artifacts"]}
    # per-token activation scales (int8-dynamic) pass with every layer quantized
    assert 0 < len(arts["int8"]["parity"]["kept_in_float"]) <= 18
    assert len(arts["int8-dynamic"]["parity"].get("kept_in_float", [])) <= 18
    for p in ("int8", "int8-dynamic"):
        assert arts[p]["parity"]["passed"]
        assert arts[p]["parity"]["min_cosine"] >= 0.98
        assert arts[p]["parity"]["stsb_dev_drop"] <= 1.0
        assert abs(_stsb(bundle, p, stsb_test) - _stsb(bundle, "fp32", stsb_test)) <= 1.0


def _stsb(bundle, precision, stsb_test):
    emb = Encoder(bundle, precision=precision).encode(stsb_test.sentences)
    n = len(stsb_test.text1)
    return sts_spearman(emb[:n], emb[n:], stsb_test.scores)


@pytest.mark.parametrize("which", ["mean", pytest.param("cls", marks=pytest.mark.slow)])
def test_minilm_precisions_meet_their_gates(which, request, stsb_test):
    bundle = request.getfixturevalue("minilm_precisions" if which == "mean"
                                     else "minilm_cls_bundle")
    manifest = json.loads((bundle / "angle_rt.json").read_text())
    arts = {a["precision"]: a for a in manifest["artifacts"]}
    assert set(arts) == set(PRECISIONS)
    assert arts["fp16"]["parity"]["min_cosine"] >= 0.999
    assert arts["int8"]["parity"]["min_cosine"] >= 0.98
    for p in PRECISIONS:
        assert arts[p]["parity"]["non_finite"] == 0 and arts[p]["parity"]["passed"]
    for p in ("int8", "int8-dynamic"):
        assert arts[p]["parity"]["stsb_dev_drop"] <= 1.0
    scores = {p: _stsb(bundle, p, stsb_test) for p in PRECISIONS}
    print(f"STS-B test Spearman ({which}):", {p: round(s, 2) for p, s in scores.items()})
    assert abs(scores["fp16"] - scores["fp32"]) < 0.05
    assert abs(scores["int8"] - scores["fp32"]) <= 1.0
    assert abs(scores["int8-dynamic"] - scores["fp32"]) <= 1.0


def test_default_artifact_on_cpu_is_int8(minilm_precisions):
    assert Encoder(minilm_precisions).artifact.precision == "int8-dynamic"
    assert Encoder(minilm_precisions, precision="fp16").artifact.file == "model.fp16.onnx"


def test_fp16_graph_keeps_islands_in_fp32(minilm_precisions):
    model = onnx.load(str(minilm_precisions / "model.fp16.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    ops = {}
    for node in model.graph.node:
        ops.setdefault(node.op_type, set()).update(types.get(i) for i in node.input[:1])
    assert ops["LayerNormalization"] == {fp32} and ops["Softmax"] == {fp32}
    assert ops["MatMul"] == {fp16}
    assert [types[o.name] for o in model.graph.output] == [fp32]
    assert types["input_ids"] == onnx.TensorProto.INT64


def test_int8_graph_is_symmetric_qdq_on_linear_layers(minilm_precisions):
    fp32 = onnx.load(str(minilm_precisions / "model.onnx"))
    model = onnx.load(str(minilm_precisions / "model.int8.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    quantized = [n for n in model.graph.node if n.op_type == "MatMul"
                 and all(i in {o for d in model.graph.node if d.op_type == "DequantizeLinear"
                               for o in d.output} for i in n.input)]
    art = next(a for a in json.loads((minilm_precisions / "angle_rt.json").read_text())
               ["artifacts"] if a["precision"] == "int8")
    # linear nodes in float: those the fixture excluded and any more the gate's search kept
    kept = sorted({*MINILM_KEPT, *art["parity"].get("kept_in_float", [])})
    assert len(linear_layers(fp32)) == 36 and len(kept) <= 18
    assert set(kept) <= {layer.node for layer in linear_layers(fp32)}
    assert {n.name for n in quantized}.isdisjoint(kept) and len(quantized) == 36 - len(kept)
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = inits[n.input[2]]
            assert zero.dtype == np.int8 and not zero.any()  # symmetric: zero point 0
        if n.op_type == "QuantizeLinear":  # feeds only its DQ, which feeds only a MatMul
            (dq,) = consumers[n.output[0]]
            assert dq.op_type == "DequantizeLinear"
            assert {c.op_type for c in consumers[dq.output[0]]} == {"MatMul"}
            assert inits[n.input[1]].shape == ()  # per-tensor activation scale
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:  # weights
            w = inits[n.input[0]]
            assert w.dtype == np.int8 and np.abs(w).max() <= QMAX
            assert inits[n.input[1]].shape == (w.shape[1],)  # per output channel
    qdq_inputs = {c.op_type for n in model.graph.node if n.op_type == "DequantizeLinear"
                  for c in consumers[n.output[0]]}
    assert qdq_inputs == {"MatMul"}  # nothing on LayerNorm, softmax or residual adds


@pytest.mark.parametrize("side", ["left", "right"])
def test_tiny_llama_fp16_bf16_finite_at_max_length(tiny_llama_dir, tmp_path, side):
    bundle = export(tiny_llama_dir, tmp_path / "b", padding_side=side, max_length=64,
                    fp16=True, bf16=True)
    arts = {a["precision"]: a for a in json.loads((bundle / "angle_rt.json").read_text())
            ["artifacts"]}
    assert arts["fp16"]["parity"]["runtime"] == "onnxruntime-cpu"
    assert arts["bf16"]["parity"]["runtime"] == "onnx-reference"  # no BF16 kernels in ORT CPU
    assert arts["bf16"]["parity"]["min_cosine"] >= 0.99
    enc = Encoder(bundle, precision="fp16")
    texts = stress_texts(64) + builtin_sentences()[:20]
    ids = enc.tokenizer.encode(texts)
    assert max(len(r) for r in ids) == 64
    for batch in (1, 8):
        out = enc.encode(texts, batch_size=batch)
        assert np.isfinite(out).all()
    from angle_rt.batching import pad_batch

    ev = ReferenceEvaluator(str(bundle / "model.bf16.onnx"))
    input_ids, mask = pad_batch(ids[:8], enc.manifest.pad_token_id, side)
    assert np.isfinite(ev.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]).all()


def test_llama_rmsnorm_chain_stays_fp32(tiny_llama_dir, tmp_path):
    bundle = export(tiny_llama_dir, tmp_path / "b", max_length=32, verify=False)
    model = onnx.load(str(bundle / "model.onnx"))
    keep = fp32_islands(model)
    norm = [n for n in model.graph.node if "layers.0/input_layernorm" in n.name]
    assert {n.op_type for n in norm if n.name in keep} >= {"Pow", "ReduceMean", "Add",
                                                           "Sqrt", "Div", "Mul"}


@pytest.mark.parametrize(("flag", "advice"), [("--fp16", "--fp16-exclude"),
                                               ("--int8", "--int8-exclude")])
def test_failing_gate_names_layers_to_exclude(capsys, tiny_bert_dir, tmp_path, monkeypatch,
                                              flag, advice):
    # demand more than reduced precision can give, so the gate fails and diagnoses
    precision = flag.lstrip("-")
    monkeypatch.setitem(verify_mod.THRESHOLDS, precision, 0.9999999)
    monkeypatch.chdir(tmp_path)  # a relative -o, as users type it
    code = main(["--model", str(tiny_bert_dir), "-o", "b", "-q",
                 "--pooling", "mean", "--max-length", "32", flag])
    err = capsys.readouterr().err
    assert code == 1 and "parity gate failed" in err and f"model.{precision}.onnx" in err
    assert advice in err
    assert not (tmp_path / "b").exists()
