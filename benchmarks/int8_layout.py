"""Fewer nodes for the per-token INT8 graph: does a run's fixed cost shrink enough to help
small (served) batches?

    python benchmarks/int8_layout.py --bundle BUNDLE [--batches 1 6 32] [--reps 5] [--out F]

BUNDLE holds model.onnx (fp32) and the int8-dynamic artifact. The exporter's per-token
rewrite flattens each linear input to [rows, K], quantizes it with a per-row scale and zero
point (QuantizeLinear along axis 0) and reshapes the result back: 12 nodes a quantized
activation and 4 a layer, mostly shape bookkeeping. The variant here keeps [B, T, K]:
x / s (Div, s = max|x|/127 per row, broadcast) into a scalar QuantizeLinear, then
MatMulIntegerToFloat on the 3-D input and × s: 6 nodes an activation, 2 a layer. It is
built from the same fp32 graph with the artifact's kept-in-float layers, checked for equal
bits with the artifact, and both run on one ONNX Runtime thread (what a served worker
has) on rows of STS-B test sentences of 16 tokens; each batch's time is the best of
`--reps` runs, the two graphs alternating.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import exporters.quantize as quant
from angle_rt.manifest import read_manifest
from angle_rt.session import OrtSession
from angle_rt.tokenizer import TextTokenizer
from angle_torch.sts import find_shared_data, load_sts
from benchmarks.harness import cpu_name


def unflattened(model: onnx.ModelProto, layers: list[quant.LinearLayer]) -> onnx.ModelProto:
    """`model` with `layers` as per-token INT8 on their N-D inputs (see the docstring)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    c = "bench_pt_"
    g.initializer.extend(numpy_helper.from_array(np.array(v, dtype=dt), c + name)
                         for name, v, dt in [("eps", 1e-12, np.float32),
                                             ("inv_qmax", 1 / quant.QMAX, np.float32),
                                             ("one", 1.0, np.float32),
                                             ("a_zp", 128, np.uint8), ("w_zp", 0, np.int8)])
    by_node = {layer.node: layer for layer in layers}
    done: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        layer = by_node.get(node.name)
        if layer is None:
            nodes.append(node)
            continue
        x, p = layer.activation, f"{layer.activation}_bq"
        if x not in done:
            done.add(x)
            nodes += [helper.make_node("Abs", [x], [p + "abs"]),
                      helper.make_node("ReduceMax", [p + "abs"], [p + "peak"], axes=[-1],
                                       keepdims=1),
                      helper.make_node("Max", [p + "peak", c + "eps"], [p + "peak1"]),
                      helper.make_node("Mul", [p + "peak1", c + "inv_qmax"], [p + "scale"]),
                      helper.make_node("Div", [x, p + "scale"], [p + "y"]),
                      helper.make_node("QuantizeLinear", [p + "y", c + "one", c + "a_zp"],
                                       [p + "q"])]
        weight = quant._as_k_by_n(node, numpy_helper.to_array(inits[layer.weight]))
        w_q, w_scale = quant.int8_weights(weight, channel_axis=1, k_axis=0)
        n = node.name
        g.initializer.extend([numpy_helper.from_array(w_q, n + "_bw"),
                              numpy_helper.from_array(w_scale, n + "_bs")])
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
        out = node.output[0] + ("_nobias" if bias else "")
        nodes += [helper.make_node("MatMulIntegerToFloat",
                                   [p + "q", n + "_bw", c + "one", n + "_bs", c + "a_zp",
                                    c + "w_zp"], [n + "_acc"], domain=quant.MS_DOMAIN),
                  helper.make_node("Mul", [n + "_acc", p + "scale"], [out])]
        if bias:
            nodes.append(helper.make_node("Add", [out, bias], [node.output[0]]))
    quant.replace_nodes(model, nodes)
    model.opset_import.append(helper.make_opsetid(quant.MS_DOMAIN, 1))
    return model


def build_variant(bundle: Path, kept: list[str], dst: Path) -> None:
    model = onnx.load(str(bundle / "model.onnx"))
    layers = [layer for layer in quant.linear_layers(model)
              if layer.node not in kept and quant._plain_linear(
                  next(n for n in model.graph.node if n.name == layer.node))]
    onnx.save(unflattened(model, layers), str(dst))


def rows_of(bundle: Path, length: int) -> list[list[int]]:
    data = find_shared_data()
    if data is None:
        sys.exit("no shared data: set ANGLE_RT_DATA")
    sts = load_sts(data / "sts" / "stsb-test.jsonl")
    manifest = read_manifest(bundle)
    tok = TextTokenizer(bundle / manifest.tokenizer["file"], manifest.max_length)
    ids = tok.encode(list(sts.text1) + list(sts.text2))
    return [r for r in ids if len(r) == length]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 6, 32])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    art = next(a for a in read_manifest(args.bundle).artifacts if a.precision == "int8-dynamic")
    kept = list((art.parity or {}).get("kept_in_float", []))
    rows = rows_of(args.bundle, args.tokens)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        variant = Path(tmp) / "variant.onnx"
        build_variant(args.bundle, kept, variant)
        graphs = {"exporter": args.bundle / art.file, "unflattened": variant}
        sess = {k: OrtSession(p, intra_op_threads=1,
                              config={"session.intra_op.allow_spinning": "0"})
                for k, p in graphs.items()}
        probe = np.array(rows[:8], np.int64)
        same = np.array_equal(*(s.run(probe, np.ones_like(probe)) for s in sess.values()))
        nodes = {k: len(onnx.load(str(p), load_external_data=False).graph.node)
                 for k, p in graphs.items()}
        result = {}
        for bs in args.batches:
            ids = np.array([rows[i] for i in rng.choice(len(rows), bs)], np.int64)
            best = dict.fromkeys(sess, float("inf"))
            for _ in range(args.reps):
                for k, s in sess.items():
                    t = time.perf_counter()
                    s.run(ids, np.ones_like(ids))
                    best[k] = min(best[k], time.perf_counter() - t)
            result[bs] = {k: round(1e3 * v, 3) for k, v in best.items()}
            print(f"batch {bs:3d}: " + "  ".join(f"{k} {v:7.2f} ms" for k, v in
                                                  result[bs].items()), flush=True)
    report = {"command": " ".join(sys.argv), "cpu": cpu_name(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "equal_bits": bool(same), "file_nodes": nodes, "tokens": args.tokens,
              "ms_a_run_best_of_reps": result}
    print(json.dumps({k: report[k] for k in ("equal_bits", "file_nodes")}))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
