"""Precision in the graph: FP16/BF16 with FP32 islands (INT8 Q/DQ and dynamic INT8 are in
exporters/quantize.py).

TensorRT 11 builds strongly typed networks from what the ONNX says, and ONNX Runtime
runs the same files, so every numeric here is checked on CPU before any engine exists.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from exporters.bundle import check_model_file, external_data_files, save_onnx
from exporters.graph import GraphIndex

log = logging.getLogger("angle_rt.export")

# Kept in FP32 whatever the target: normalizations and their decomposed pieces, softmax,
# reductions (pooling, RMSNorm's mean of squares) and the L2 norm.
FP32_OPS = frozenset({
    "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "Softmax",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare",
    "Pow", "Sqrt", "Reciprocal", "CumSum", "Range",
})
_NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
_FLOAT = onnx.TensorProto.FLOAT
# Op types a failing FP16/BF16 gate may suggest keeping in FP32 (--fp16-exclude).
FP16_CANDIDATE_OPS = ("MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid")
LOW_TYPES = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}


def fp32_islands(model: onnx.ModelProto, extra_ops: Iterable[str] = ()) -> set[str]:
    """Names of the nodes to keep in FP32 when converting `model` to 16-bit floats.

    1. ops of FP32_OPS (+ `extra_ops`) and casts to float32 written in the model code;
    2. float nodes that do not depend on the *values* of input_ids — the attention-mask
       bias (finfo.min would be -inf in fp16), position tables and RoPE angles — and the
       nodes that first mix them into the token stream (the mask add);
    3. everything after the last normalization: pooling and L2 normalize.
    """
    idx = GraphIndex(model)
    floats = _float_tensors(model)
    ops = FP32_OPS | set(extra_ops)
    keep = {n.name for n in idx.nodes if n.op_type in ops or _casts_to_fp32(n)}
    value_nodes = idx.descendants(["input_ids"], through_shape=False)
    side = {n.name for n in idx.nodes if n.name not in value_nodes
            and n.op_type != "Constant" and any(o in floats for o in n.output)}
    keep |= side
    for n in idx.nodes:  # where side values enter the token stream: the mask add, RoPE
        if n.name in value_nodes and any(
                i in floats and i in idx.producer and idx.producer[i].name in side
                for i in n.input):
            keep.add(n.name)
    keep |= _tail(idx) | _rms_norm_chains(idx)
    for n in idx.nodes:  # constants read only by FP32 nodes keep their FP32 values
        users = [c for o in n.output for c in idx.consumers.get(o, [])]
        if n.op_type == "Constant" and users and all(c.name in keep for c in users):
            keep.add(n.name)
    return keep


def _casts_to_fp32(node: onnx.NodeProto) -> bool:
    """An explicit `.to(float32)` in the model code (RMSNorm upcasts): honour it."""
    return node.op_type == "Cast" and any(a.name == "to" and a.i == _FLOAT
                                          for a in node.attribute)


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of float32 tensors, from type inference on the graph without its weights
    (initializers become typed inputs), so that graphs over 2 GB are never serialized."""
    src = model.graph
    inputs = {i.name for i in src.input}
    typed = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
             for t in src.initializer if t.name not in inputs]
    skeleton = onnx.helper.make_model(
        onnx.helper.make_graph(list(src.node), src.name, [*src.input, *typed],
                               list(src.output), value_info=list(src.value_info)),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    g = inferred.graph
    infos = [*g.value_info, *g.input, *g.output]
    names = {v.name for v in infos if v.type.tensor_type.elem_type == _FLOAT}
    return names | {t.name for t in src.initializer if t.data_type == _FLOAT}


def _rms_norm_chains(idx: GraphIndex, depth: int = 8) -> set[str]:
    """Decomposed RMSNorm: from Pow(x, 2) through mean, +eps, sqrt and 1/· up to the Mul
    that scales x — mean(x²) passes 65504 as soon as |x| > 256."""
    chains: set[str] = set()
    for pow_node in (n for n in idx.nodes if n.op_type == "Pow"):
        x = pow_node.input[0]
        frontier, seen = [pow_node], {pow_node.name}
        for _ in range(depth):
            nxt = []
            for node in frontier:
                for user in (u for o in node.output for u in idx.consumers.get(o, [])):
                    if user.name in seen:
                        continue
                    seen.add(user.name)
                    if not (user.op_type == "Mul" and x in user.input):
                        nxt.append(user)
            frontier = nxt
        if any(idx_node.op_type == "Mul" and x in idx_node.input
               for idx_node in idx.nodes if idx_node.name in seen):
            chains |= seen
    return chains


def _tail(idx: GraphIndex) -> set[str]:
    """Nodes from the last normalization to the output (pooling, normalize)."""
    norms = [n for n in idx.nodes if n.op_type in _NORM_OPS]
    if not norms:  # RMSNorm decomposed: Pow → ReduceMean → … ; take the last ReduceMean
        norms = [n for n in idx.nodes if n.op_type == "ReduceMean"]
    return idx.node_descendants(norms[-1]) if norms else set()


def convert_float16(src: Path, dst: Path, dtype: str = "fp16",
                    exclude_ops: Iterable[str] = ()) -> Path:
    """Write a mixed-precision copy of the fp32 graph `src`: fp16 or bf16 compute,
    FP32 islands (see fp32_islands), FP32 inputs and outputs."""
    if dtype not in LOW_TYPES:
        raise ValueError(f"dtype must be one of {sorted(LOW_TYPES)}, got {dtype!r}")
    external = True if external_data_files(src) else None  # a model over 2 GB: like fp32
    model = onnx.load(str(src))
    keep = fp32_islands(model, exclude_ops)
    log.info("%s: %d of %d nodes stay fp32", dtype, len(keep), len(model.graph.node))
    to_low_precision(model, keep, LOW_TYPES[dtype])
    save_onnx(model, dst, external)
    check_model_file(dst)
    return dst


def to_low_precision(model: onnx.ModelProto, keep: set[str], low: int) -> None:
    """Retype `model` in place: nodes outside `keep` compute in `low` (FLOAT16/BFLOAT16).

    Weights read only by low nodes are stored in `low`; a Cast is inserted on every float
    edge that crosses between the two domains; graph inputs and outputs keep their types.
    """
    g = model.graph
    floats = _float_tensors(model)
    idx = GraphIndex(model)
    low_tensors = {o for n in idx.nodes if n.name not in keep for o in n.output if o in floats}
    for t in g.initializer:
        users = idx.consumers.get(t.name, [])
        if t.data_type == _FLOAT and users and all(u.name not in keep for u in users):
            t.CopyFrom(_low_tensor(t.name, onnx.numpy_helper.to_array(t), low))
            low_tensors.add(t.name)
    nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}
    for node in g.node:
        target = _FLOAT if node.name in keep else low
        if target == low:
            _retype_attributes(node, low)
        for i, name in enumerate(node.input):
            if name not in floats:
                continue
            have = low if name in low_tensors else _FLOAT
            if have != target:
                node.input[i] = _cast(name, target, casts, nodes)
        nodes.append(node)
    outputs = {o.name for o in g.output}
    if outputs & low_tensors:
        raise ValueError(f"graph outputs {sorted(outputs & low_tensors)} would be low "
                         "precision; the pooling tail must stay fp32")
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # types changed; ONNX Runtime and TensorRT infer them again


def _cast(name: str, to: int, casts: dict[tuple[str, int], str],
          nodes: list[onnx.NodeProto]) -> str:
    key = (name, to)
    if key not in casts:
        out = f"{name}__to_{onnx.TensorProto.DataType.Name(to).lower()}"
        nodes.append(onnx.helper.make_node("Cast", [name], [out], to=to, name=out + "_Cast"))
        casts[key] = out
    return casts[key]


def _retype_attributes(node: onnx.NodeProto, low: int) -> None:
    """Float constants and float32 type attributes of a node that now computes in `low`."""
    for attr in node.attribute:
        if attr.name in ("to", "dtype") and attr.i == _FLOAT:
            attr.i = low
        if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == _FLOAT:
            attr.t.CopyFrom(_low_tensor(attr.t.name, onnx.numpy_helper.to_array(attr.t), low))


def _low_tensor(name: str, values: np.ndarray, low: int) -> onnx.TensorProto:
    if low == onnx.TensorProto.BFLOAT16:
        return _bf16_tensor(name, values)
    finfo = np.finfo(np.float16)  # saturate instead of overflowing to inf
    clipped = np.clip(values, finfo.min, finfo.max).astype(np.float16)
    return onnx.numpy_helper.from_array(clipped, name)


def _bf16_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    """A BFLOAT16 tensor, rounded to nearest even from float32."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    t = onnx.TensorProto(name=name, data_type=onnx.TensorProto.BFLOAT16,
                         dims=list(values.shape))
    t.raw_data = rounded.tobytes()
    return t
