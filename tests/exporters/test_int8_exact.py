"""INT8 artifacts compute exactly on every x86 host, so one artifact gives one vector.

Without VNNI (AVX2, e.g. Zen 3), ONNX Runtime's u8·s8 kernels add the products of weights
k and k+1 (k even) with uint8 activations in int16 (vpmaddubsw), which saturates past 32767:
255·(|w_k| + |w_k+1|) overflows when the pair sums past 128. With VNNI or AMX the sums are
exact. A full-range artifact therefore gave other vectors on an AVX2 host than on the VNNI
host whose gate passed it (a random tiny Llama's int8-dynamic: min cosine 0.55 on Zen 3).
The exporter keeps every aligned pair within 128.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import exporters.quantize as quant
from exporters.quantize import (
    QMAX,
    Calibration,
    int8_weights,
    quantize_dynamic_int8,
    quantize_int8,
)

K, N = 64, 24


def _one_linear_layer(path: Path, weight: np.ndarray, gemm: bool) -> Path:
    """x [rows, K] times `weight` [K, N]: a MatMul, or a Gemm holding it as [N, K] (transB)."""
    if gemm:
        node = helper.make_node("Gemm", ["x", "w"], ["y"], name="/layer/Gemm", transB=1)
        weight = weight.T.copy()
    else:
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/layer/MatMul")
    graph = helper.make_graph(
        [node], "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", N])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _worst_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Weights [K, N] and activations of one sign at their peaks, so every product the kernel
    adds is as large as it can be. Half the columns are large everywhere (their pairs must be
    brought within 128); in the other half the large weights sit at k = 1, 2 mod 4, so the
    pairs (k, k+1) with k even hold one large weight each but the pairs with k odd hold two:
    a kernel that paired weights otherwise than the exporter assumes would saturate."""
    rng = np.random.default_rng(seed)
    weight = rng.uniform(0.5, 1.0, (K, N)).astype(np.float32)
    straddle = np.where(np.isin(np.arange(K) % 4, (1, 2)), 1.0, 1.0 / QMAX)
    weight[:, N // 2:] = straddle[:, None]
    x = np.concatenate([np.ones((4, K)), rng.uniform(0.8, 1.0, (4, K)),
                        rng.uniform(-1.0, 1.0, (4, K))]).astype(np.float32)
    return weight, x


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


def _weights_as_stored(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The artifact's int8 weights as [K, N] and their per-column scales."""
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    w_q = next(v for k, v in inits.items() if k.endswith("_w_int8")).astype(np.int64)
    return (w_q if w_q.shape == (K, N) else w_q.T), \
        next(v for k, v in inits.items() if k.endswith("_w_scale"))


def _build(kind: str, src: Path, dst: Path) -> Path:
    if kind == "int8-dynamic":
        return quantize_dynamic_int8(src, dst)
    calib = Calibration(samples={"x": np.ones(8, np.float32)}, maxima={"x": 1.0})
    return quantize_int8(src, dst, [], method="max", calibration=calib)


def _exact(kind: str, x: np.ndarray, w_q: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """The artifact's arithmetic with integer sums in int64: what a VNNI host computes."""
    if kind == "int8-dynamic":  # rows quantized alone: s = max|x|/127, uint8 around 128
        s = np.abs(x).max(axis=1, keepdims=True) / np.float32(QMAX)
        q = np.clip(np.round(x / s) + 128, 0, 255).astype(np.int64) - 128
        return (q @ w_q) * w_scale * s
    s = np.float32(1.0 / QMAX)  # one calibrated scale (amax 1)
    q = np.clip(np.round(x / s), -QMAX, QMAX).astype(np.int64)
    return (q @ w_q) * w_scale * s


LAYERS = [("int8", False), ("int8", True), ("int8-dynamic", False), ("int8-dynamic", True)]


@pytest.mark.parametrize(("kind", "gemm"), LAYERS)
def test_int8_weight_pairs_leave_the_sum_room(kind, gemm, tmp_path):
    weight, _ = _worst_case()
    art = _build(kind, _one_linear_layer(tmp_path / "fp32.onnx", weight, gemm),
                 tmp_path / "q.onnx")
    w_q, _ = _weights_as_stored(art)
    pairs = np.abs(w_q[0::2]) + np.abs(w_q[1::2])
    assert pairs.max() == 128 and 255 * pairs.max() <= np.iinfo(np.int16).max
    assert np.abs(w_q).max() == QMAX  # the full int8 range is still used


@pytest.mark.parametrize(("kind", "gemm"), LAYERS)
def test_int8_arithmetic_is_exact_on_this_host(kind, gemm, tmp_path):
    """Fails on an AVX2 host when weight pairs can sum past 128 (the sums saturate there)."""
    weight, x = _worst_case()
    art = _build(kind, _one_linear_layer(tmp_path / "fp32.onnx", weight, gemm),
                 tmp_path / "q.onnx")
    want = _exact(kind, x, *_weights_as_stored(art))
    got = _run(art, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    # and the quantized layer still computes the float one
    np.testing.assert_allclose(got, x @ weight, rtol=0.05, atol=0.05 * np.abs(x @ weight).max())


def test_pair_limit_keeps_weights_closer_than_seven_bits(monkeypatch):
    """On heavy-tailed (trained-like) weights the pair limit costs far less than ONNX
    Runtime's reduce_range remedy (every weight within ±63), and more than nothing."""
    rng = np.random.default_rng(1)
    weight = rng.standard_t(4, (384, 1536)).astype(np.float32)

    def sq_error(w_max: int, pair_max: int | None) -> float:
        monkeypatch.setattr(quant, "W_QMAX", w_max)
        monkeypatch.setattr(quant, "PAIR_MAX", pair_max)
        q, scale = int8_weights(weight, channel_axis=1, k_axis=0)
        if pair_max is not None:
            assert (np.abs(q[0::2].astype(int)) + np.abs(q[1::2])).max() <= pair_max
        return float(np.square(q * scale - weight).sum())

    full, pairs, seven = sq_error(127, None), sq_error(127, 128), sq_error(63, None)
    assert full < pairs < 0.6 * seven


@pytest.mark.parametrize(("flags", "weight_max", "warns"), [
    ("fpu sse2 avx2 fma", None, True),  # an earlier bundle on AVX2: sums saturate
    ("fpu sse2 avx2 avx512f avx512_vnni", None, False),
    ("fpu sse2 avx2 avx_vnni", None, False),
    ("fpu sse2 avx2 fma", 128, False),  # this exporter's weights: exact everywhere
])
def test_full_range_int8_on_a_saturating_host_is_flagged(tiny_bert_bundle, tmp_path,
                                                         monkeypatch, flags, weight_max, warns):
    import dataclasses
    import platform
    import warnings

    import angle_rt.session as session
    from angle_rt.manifest import read_manifest

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(session, "CPUINFO", cpuinfo)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    manifest = read_manifest(tiny_bert_bundle)
    quant = {"activations": "per-token", "weights": "per-channel"}
    if weight_max is not None:
        quant["weight_pair_max"] = weight_max
    int8 = dataclasses.replace(manifest.artifacts[0], file="model.int8-dynamic.onnx",
                               precision="int8-dynamic", quantization=quant)
    manifest = dataclasses.replace(manifest, artifacts=(*manifest.artifacts, int8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        art, device = session.select(manifest, None, None, "cpu")
    assert (art.file, device) == ("model.int8-dynamic.onnx", "cpu")
    saturating = [w for w in caught if "saturate" in str(w.message)]
    assert len(saturating) == int(warns)
    if warns:
        assert "re-export" in str(saturating[0].message)


@pytest.mark.parametrize("kind", ["int8", "int8-dynamic"])
def test_batched_matmul_weight_stays_float(kind, tmp_path):
    """A MatMul by a 3-D weight initializer is a batched product, not a linear layer: the
    int8 rewrites (which take [K, N]) once made graphs ONNX Runtime refused to load or run."""
    weight = np.random.default_rng(0).normal(size=(2, K, N)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/bmm/MatMul")
    graph = helper.make_graph(
        [node], "bmm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, "rows", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "rows", N])],
        [numpy_helper.from_array(weight, "w")])
    src = tmp_path / "bmm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    assert quant.linear_layers(onnx.load(str(src))) == []
    x = np.random.default_rng(1).normal(size=(2, 5, K)).astype(np.float32)
    out = _run(_build(kind, src, tmp_path / "q.onnx"), x)
    np.testing.assert_allclose(out, x @ weight, rtol=1e-5, atol=1e-5)
