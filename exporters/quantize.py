"""INT8 in the graph: explicit symmetric Q/DQ on the linear layers, calibrated on text.

Why not ONNX Runtime's quantize_static: its calibrators count pad positions as data
(and its histogram calibrators need equal-shaped batches), and on all-MiniLM-L6-v2 its
MinMax scales gave a mean cosine of 0.81. Here activation statistics come from real
tokens only (the attention mask says which), and each activation scale minimises the
quantisation error over those values.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters.bundle import (
    external_data_files,
    save_onnx,
)
from exporters.graph import GraphIndex

log = logging.getLogger("angle_rt.export")

QMAX = 127  # symmetric int8: [-127, 127], zero point 0 (what TensorRT requires)
# Without VNNI (AVX2) ONNX Runtime's u8·s8 kernels add the products of weights k and k+1
# (k even, along K) with uint8 activations in int16 (vpmaddubsw), which saturates when
# |w_k| + |w_k+1| > 128 (255·128 = 32640 ≤ 32767). Weights are stored so that no such pair
# exceeds PAIR_MAX: every x86 host then computes the same integer sums and an artifact gives
# the vectors its gate measured on any host (tests/exporters/test_int8_exact.py). Each
# channel keeps ±127 and moves only its overflowing pairs, or widens its scale just enough
# (int8_weights); ORT's reduce_range (±63) halves every weight's resolution instead.
# W_QMAX and PAIR_MAX are module settings so benchmarks can compare the three.
W_QMAX = QMAX
PAIR_MAX: int | None = 128
METHODS = ("mse", "max", "percentile")
_SAMPLES_PER_TENSOR = 200_000


@dataclass(frozen=True)
class LinearLayer:
    """A MatMul/Gemm with a weight initializer: the activation input gets Q/DQ, the
    weight is stored int8 with per-output-channel scales."""

    node: str
    activation: str
    weight: str
    channel_axis: int


@dataclass
class Calibration:
    """|activation| samples and maxima per tensor, over real (unpadded) tokens."""

    samples: dict[str, np.ndarray] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)


def linear_layers(model: onnx.ModelProto) -> list[LinearLayer]:
    """Every MatMul/Gemm that multiplies an activation by a 2-D weight initializer (a
    batched MatMul's 3-D weight is not a linear layer: the int8 rewrites take [K, N])."""
    idx = GraphIndex(model)
    rank = {t.name: len(t.dims) for t in model.graph.initializer}
    layers = []
    for n in idx.nodes:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        a, w = n.input[0], n.input[1]
        if rank.get(w) != 2 or a in idx.initializers:
            continue
        trans_b = any(x.name == "transB" and x.i for x in n.attribute)
        layers.append(LinearLayer(n.name, a, w, 0 if trans_b else 1))
    return layers


def layer_group(node_name: str) -> str:
    """A node name with layer indices wildcarded, for grouping sensitivity results.

    >>> layer_group("/m/encoder/layer.3/output/dense/MatMul")
    '/m/encoder/layer.*/output/dense/MatMul'
    """
    return re.sub(r"(?<=[._/])\d+(?=[./_])", "*", node_name)


def calibrate(src: Path, layers: list[LinearLayer],
              feeds: Iterable[dict[str, np.ndarray]], seed: int = 0) -> Calibration:
    """Run the fp32 graph on `feeds`, recording each layer input at real tokens."""
    import onnxruntime as ort

    tensors = sorted({layer.activation for layer in layers})
    model = onnx.load(str(src), load_external_data=False)
    model.graph.output.extend(
        helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if external_data_files(src):  # weights stay in their file: the graph goes beside it
        graph = src.with_name(f".calibrate-{secrets.token_hex(4)}.onnx")
        onnx.save_model(model, str(graph))
        try:
            sess = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        finally:
            graph.unlink()
    else:
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    chunks: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    maxima = dict.fromkeys(tensors, 0.0)
    for feed in feeds:
        outs = sess.run(tensors, feed)
        real = feed["attention_mask"].astype(bool)
        for name, arr in zip(tensors, outs, strict=True):
            vals = np.abs(arr[real] if arr.shape[:2] == real.shape else arr).ravel()
            maxima[name] = max(maxima[name], float(vals.max(initial=0.0)))
            take = min(len(vals), 20_000)
            chunks[name].append(rng.choice(vals, take, replace=False) if take < len(vals)
                                else vals)
    samples = {}
    for t, parts in chunks.items():
        v = np.concatenate(parts)
        samples[t] = rng.choice(v, _SAMPLES_PER_TENSOR, replace=False) \
            if len(v) > _SAMPLES_PER_TENSOR else v
    return Calibration(samples, maxima)


def activation_scale(samples: np.ndarray, amax: float, method: str = "mse") -> float:
    """Per-tensor scale: amax/127 ("max"), the 99.99th percentile ("percentile"), or the
    clip in [0.2, 1]·amax that minimises the mean squared quantisation error ("mse")."""
    if amax <= 0:
        return 1.0
    if method == "max":
        return amax / QMAX
    if method == "percentile":
        return float(np.percentile(samples, 99.99)) / QMAX
    if method != "mse":
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    best, best_scale = np.inf, amax / QMAX
    for ratio in np.linspace(0.2, 1.0, 41):
        scale = amax * ratio / QMAX
        err = np.mean((np.clip(np.round(samples / scale), -QMAX, QMAX) * scale - samples) ** 2)
        if err < best:
            best, best_scale = err, scale
    return float(best_scale)


def insert_qdq(model: onnx.ModelProto, layers: list[LinearLayer],
               act_scales: dict[str, float]) -> onnx.ModelProto:
    """Rewrite `model` in place: Q→DQ on each layer's activation, an int8 weight → DQ."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    by_node = {layer.node: layer for layer in layers}
    new_nodes: list[onnx.NodeProto] = []
    for node in g.node:
        layer = by_node.get(node.name)
        if layer is not None:
            new_nodes += _qdq_nodes(g, layer, numpy_helper.to_array(inits[layer.weight]),
                                    act_scales[layer.node])
            node.input[0], node.input[1] = f"{node.name}_x_dq", f"{node.name}_w_dq"
        new_nodes.append(node)
    return replace_nodes(model, new_nodes)


def int8_weights(weight: np.ndarray, channel_axis: int,
                 k_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights with one scale per output channel, no aligned pair along the
    reduction axis `k_axis` past PAIR_MAX in sum of magnitudes. Per channel the better (less
    squared error) of: scale max|w|/127 with the rare overflowing pairs moved onto the limit,
    or a scale widened until no pair overflows (for channels where many pairs would)."""
    w = np.moveaxis(weight.astype(np.float32), (k_axis, channel_axis), (0, -1))
    reduce = tuple(range(w.ndim - 1))
    s1 = np.abs(w).max(axis=reduce) / W_QMAX
    s1[s1 == 0] = 1.0
    q = np.clip(np.round(w / s1), -W_QMAX, W_QMAX)
    scale = s1
    if PAIR_MAX is not None:
        even = len(w) - len(w) % 2
        peak = (np.abs(w[0:even:2]) + np.abs(w[1:even:2])).max(axis=reduce, initial=0.0)
        s2 = np.maximum(s1, peak / PAIR_MAX)
        moved = _pairs_within(w / s1, q, PAIR_MAX)
        # the widened scale leaves every pair within the limit but for float rounding
        widened = _pairs_within(w / s2, np.clip(np.round(w / s2), -W_QMAX, W_QMAX), PAIR_MAX)
        widen = (np.square(widened * s2 - w).sum(axis=reduce)
                 < np.square(moved * s1 - w).sum(axis=reduce))
        q, scale = np.where(widen, widened, moved), np.where(widen, s2, s1)
    q = np.moveaxis(q, (0, -1), (k_axis, channel_axis))
    return q.astype(np.int8), scale.astype(np.float32)


def _pairs_within(t: np.ndarray, q: np.ndarray, limit: int) -> np.ndarray:
    """`q` (rounded `t`, pairs along axis 0) with each pair (2j, 2j+1) whose |q| sum exceeds
    `limit` put on the nearest point of |a| + |b| = limit: both magnitudes lowered by the same
    amount (the least squared error), then rounded so the pair sums to `limit` exactly."""
    even = len(t) - len(t) % 2
    a, b = np.abs(t[0:even:2]), np.abs(t[1:even:2])
    over = np.abs(q[0:even:2]) + np.abs(q[1:even:2]) > limit
    qa = np.clip(np.round(a - (a + b - limit) / 2), limit - W_QMAX, W_QMAX)
    q = q.copy()
    q[0:even:2] = np.where(over, np.sign(t[0:even:2]) * qa, q[0:even:2])
    q[1:even:2] = np.where(over, np.sign(t[1:even:2]) * (limit - qa), q[1:even:2])
    return q


def replace_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """Give the graph `nodes` (in topological order) and drop initializers no node reads."""
    g = model.graph
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return model


def _qdq_nodes(g: onnx.GraphProto, layer: LinearLayer, weight: np.ndarray,
               act_scale: float) -> list[onnx.NodeProto]:
    p = layer.node
    k_axis = weight.ndim - 1 if layer.channel_axis == weight.ndim - 2 else weight.ndim - 2
    w_q, w_scale = int8_weights(weight, layer.channel_axis, k_axis)
    g.initializer.extend([
        numpy_helper.from_array(np.array(act_scale, dtype=np.float32), f"{p}_x_scale"),
        numpy_helper.from_array(np.array(0, dtype=np.int8), f"{p}_x_zero"),
        numpy_helper.from_array(w_q, f"{p}_w_int8"),
        numpy_helper.from_array(w_scale, f"{p}_w_scale"),
        numpy_helper.from_array(np.zeros(len(w_scale), dtype=np.int8), f"{p}_w_zero"),
    ])
    return [
        helper.make_node("QuantizeLinear", [layer.activation, f"{p}_x_scale", f"{p}_x_zero"],
                         [f"{p}_x_q"], name=f"{p}_QuantizeLinear"),
        helper.make_node("DequantizeLinear", [f"{p}_x_q", f"{p}_x_scale", f"{p}_x_zero"],
                         [f"{p}_x_dq"], name=f"{p}_DequantizeLinear"),
        helper.make_node("DequantizeLinear", [f"{p}_w_int8", f"{p}_w_scale", f"{p}_w_zero"],
                         [f"{p}_w_dq"], name=f"{p}_weight_DequantizeLinear",
                         axis=layer.channel_axis),
    ]


def quantize_int8(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]],
                  exclude: Iterable[str] = (), method: str = "mse",
                  calibration: Calibration | None = None) -> Path:
    """Write the Q/DQ INT8 graph of fp32 `src` to `dst`; `exclude` holds regexes of node
    names (or layer groups) to keep in float. Pass `calibration` to reuse statistics."""
    model = onnx.load(str(src))
    patterns = [re.compile(p) for p in exclude]
    layers = [layer for layer in linear_layers(model)
              if not any(p.search(layer.node) for p in patterns)]
    calib = calibration or calibrate(src, layers, feeds)
    scales = {layer.node: activation_scale(calib.samples[layer.activation],
                                           calib.maxima[layer.activation], method)
              for layer in layers}
    insert_qdq(model, layers, scales)
    # external data like the source's (a model over 2 GB), or when the result passes 2 GB
    save_onnx(model, dst, True if external_data_files(src) else None)
    log.info("int8: %d linear layers quantized (%s calibration)", len(layers), method)
    return dst


def quantize_dynamic_int8(src: Path, dst: Path, exclude: Iterable[str] = ()) -> Path:
    """Dynamic INT8 for CPU serving with one activation scale per token (row), so a text's
    vector never depends on what shares its batch; int8 weights per output channel.

    ONNX Runtime's own dynamic quantization (DynamicQuantizeLinear) takes one scale per
    tensor, i.e. per batch: the same sentence alone and in a batch of 64 then differs (min
    cosine 0.9876 on MiniLM). Here each linear layer's input x [.., K] gets s = max|x|/127
    per row, is quantized to uint8 around 128 (QuantizeLinear along the row axis), multiplied
    by the int8 weights (MatMulIntegerToFloat, ONNX Runtime's contrib op: an ONNX Runtime
    artifact, not a TensorRT input) and rescaled by s. Layers sharing an input (Q, K, V)
    share its quantization. `exclude`: regexes of node names kept in float."""
    patterns = [re.compile(p) for p in exclude]
    model = onnx.load(str(src))
    layers = [layer for layer in linear_layers(model)
              if not any(p.search(layer.node) for p in patterns)]
    per_token_int8(model, layers)
    save_onnx(model, dst, True if external_data_files(src) else None)
    log.info("int8-dynamic: %d linear layers quantized per token", len(layers))
    return dst


MS_DOMAIN = "com.microsoft"
_PT = "angle_rt_pt"  # prefix of the shared constants


def per_token_int8(model: onnx.ModelProto, layers: list[LinearLayer]) -> onnx.ModelProto:
    """Rewrite `layers` of `model` in place as per-token dynamic INT8 (see
    quantize_dynamic_int8); other nodes are kept as they are."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    by_node = {layer.node: layer for layer in layers}
    g.initializer.extend(numpy_helper.from_array(np.array(v, dtype=dt), f"{_PT}_{name}")
                         for name, v, dt in [
                             ("eps", 1e-12, np.float32), ("inv_qmax", 1 / QMAX, np.float32),
                             ("one", 1.0, np.float32), ("zero", 0.0, np.float32),
                             ("mid", 128.0, np.float32), ("a_zp", 128, np.uint8),
                             ("w_zp", 0, np.int8),
                             ("flat", [-1], np.int64), ("start", [0], np.int64),
                             ("last", [-1], np.int64)])
    quantized: dict[str, str] = {}  # activation → prefix of its quantized form
    new_nodes: list[onnx.NodeProto] = []
    for node in g.node:
        layer = by_node.get(node.name)
        if layer is None or not _plain_linear(node):
            new_nodes.append(node)
            continue
        weight = _as_k_by_n(node, numpy_helper.to_array(inits[layer.weight]))
        if layer.activation not in quantized:
            quantized[layer.activation] = f"{node.name}_pt"
            new_nodes += _row_quantize(g, layer.activation, quantized[layer.activation],
                                       weight.shape[0])
        new_nodes += _int8_matmul(g, node, weight, quantized[layer.activation])
    replace_nodes(model, new_nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def _plain_linear(node: onnx.NodeProto) -> bool:
    """A MatMul, or a Gemm without transA (what the per-token rewrite handles)."""
    return node.op_type == "MatMul" or not any(a.name == "transA" and a.i
                                               for a in node.attribute)


def _as_k_by_n(node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
    """The weight as [K, N] float32 (a Gemm's transB and alpha applied)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    w = weight.astype(np.float32)
    if node.op_type == "Gemm":
        w = (w.T if attrs.get("transB", 0) else w) * np.float32(attrs.get("alpha", 1.0))
    return w


def _row_quantize(g: onnx.GraphProto, x: str, p: str, k: int) -> list[onnx.NodeProto]:
    """x [.., K] → `p`_q uint8 [rows, K], `p`_scale [rows, 1], `p`_lead (x's leading dims)."""
    g.initializer.append(numpy_helper.from_array(np.array([-1, k], np.int64), f"{p}_2d"))
    c = f"{_PT}_"
    return [
        helper.make_node("Reshape", [x, f"{p}_2d"], [f"{p}_x2"], name=f"{p}_Flatten"),
        helper.make_node("Abs", [f"{p}_x2"], [f"{p}_abs"], name=f"{p}_Abs"),
        helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_peak"], name=f"{p}_Peak", axes=[1],
                         keepdims=1),
        helper.make_node("Max", [f"{p}_peak", c + "eps"], [f"{p}_peak1"], name=f"{p}_Eps"),
        helper.make_node("Mul", [f"{p}_peak1", c + "inv_qmax"], [f"{p}_scale"],
                         name=f"{p}_Scale"),
        helper.make_node("Reshape", [f"{p}_scale", c + "flat"], [f"{p}_s1"], name=f"{p}_S1"),
        # a zero point of 128 per row, shaped like the scale (QuantizeLinear wants both alike)
        helper.make_node("Mul", [f"{p}_s1", c + "zero"], [f"{p}_z0"], name=f"{p}_Z0"),
        helper.make_node("Add", [f"{p}_z0", c + "mid"], [f"{p}_z1"], name=f"{p}_Z1"),
        helper.make_node("Cast", [f"{p}_z1"], [f"{p}_zp"], name=f"{p}_Zp",
                         to=onnx.TensorProto.UINT8),
        helper.make_node("QuantizeLinear", [f"{p}_x2", f"{p}_s1", f"{p}_zp"], [f"{p}_q"],
                         name=f"{p}_QuantizeLinear", axis=0),
        helper.make_node("Shape", [x], [f"{p}_shape"], name=f"{p}_Shape"),
        helper.make_node("Slice", [f"{p}_shape", c + "start", c + "last"], [f"{p}_lead"],
                         name=f"{p}_Lead"),
    ]


def _int8_matmul(g: onnx.GraphProto, node: onnx.NodeProto, weight: np.ndarray,
                 q: str) -> list[onnx.NodeProto]:
    """`node` on the row-quantized input `q`: int8 weights [K, N] with per-column scales,
    MatMulIntegerToFloat, × the row scales, reshaped back (+ a Gemm's bias)."""
    p = node.name
    w_q, w_scale = int8_weights(weight, channel_axis=1, k_axis=0)
    g.initializer.extend([numpy_helper.from_array(w_q, f"{p}_w_int8"),
                          numpy_helper.from_array(w_scale, f"{p}_w_scale"),
                          numpy_helper.from_array(np.array([weight.shape[1]], np.int64),
                                                  f"{p}_n")])
    c = f"{_PT}_"
    out = node.output[0] if node.op_type == "MatMul" else f"{p}_nobias"
    nodes = [
        helper.make_node("MatMulIntegerToFloat", [f"{q}_q", f"{p}_w_int8", c + "one",
                                                  f"{p}_w_scale", c + "a_zp", c + "w_zp"],
                         [f"{p}_acc"], name=f"{p}_MatMulIntegerToFloat", domain=MS_DOMAIN),
        helper.make_node("Mul", [f"{p}_acc", f"{q}_scale"], [f"{p}_rows"], name=f"{p}_Rescale"),
        helper.make_node("Concat", [f"{q}_lead", f"{p}_n"], [f"{p}_oshape"], name=f"{p}_OShape",
                         axis=0),
        helper.make_node("Reshape", [f"{p}_rows", f"{p}_oshape"], [out], name=f"{p}_Unflatten"),
    ]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
        bias = node.input[2]
        if beta != 1.0:
            g.initializer.append(numpy_helper.from_array(np.array(beta, np.float32),
                                                         f"{p}_beta"))
            nodes.append(helper.make_node("Mul", [bias, f"{p}_beta"], [f"{p}_bias"]))
            bias = f"{p}_bias"
        nodes.append(helper.make_node("Add", [out, bias], [node.output[0]], name=f"{p}_Bias"))
    elif node.op_type == "Gemm":
        nodes[-1].output[0] = node.output[0]
    return nodes


def group_regex(group: str) -> str:
    """A regex matching the node names of a layer group (see layer_group).

    >>> import re; bool(re.search(group_regex("/e/layer.*/out/MatMul"), "/e/layer.11/out/MatMul"))
    True
    """
    return "^" + re.escape(group).replace(r"\*", r"\d+") + "$"
