"""Other INT8 schemes for the CPU artifact, against the bundle's own in one run.

    python benchmarks/int8_variants.py [--bundle build/bench/minilm-all] [--threads 2]

Written when the bundle's int8-dynamic artifact was ONNX Runtime's per-tensor (per-batch)
dynamic INT8 with some FFN layers kept in float (`kept_in_float`); since then int8-dynamic
quantizes every layer per token (batch-invariant) and usually keeps none, so the
"per-token kept layers" variant equals the bundle's artifact. Each variant quantizes by
another scheme; none of them is checked for batch invariance here (the export gate does
that; the per-tensor ones are not invariant). Each is scored like the export gate (min
cosine to fp32 over the verification + stress texts; 0.98 to pass) plus STS-B test Spearman,
and timed in interleaved passes (median of 3) beside the bundle's artifacts:

- all-dynamic: ONNX Runtime dynamic INT8 on every linear layer (int8 weights; with 7-bit
  weights: the AVX2 u8·s8 saturation remedy).
- per-token: the kept layers with a per-row activation scale (ReduceMax → uint8 with zero
  point 128 → MatMulInteger → rescale), written as plain ONNX operators.
- outlier split: LLM.int8()-style, the calibration's outlier input channels (> 4× the median
  channel peak, at most 8) go through a small float MatMul, the rest is quantized.
- MatMulNBits: blockwise 8-bit weights with int8 activations per block (accuracy_level 4).
- ORT fused: ONNX Runtime's transformer optimizer (fused Attention, SkipLayerNorm), then
  dynamic INT8 on the same layers as the bundle's artifact.
- OpenVINO (where installed): the same fp32 and Q/DQ graphs on OpenVINO's CPU plugin.

Writes benchmarks/results/int8-variants-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from angle_rt import Encoder
from angle_rt.manifest import read_manifest
from angle_rt.session.base import Session
from angle_rt.session.onnxrt import OrtSession
from angle_torch.sts import find_shared_data, load_sts, sts_spearman
from benchmarks.harness import Runner, cpu_name
from exporters.quantize import linear_layers, replace_nodes
from exporters.texts import calibration_texts, stress_texts, verification_texts
from exporters.verify import compare

THRESHOLD = 0.98


def per_token(model: onnx.ModelProto, nodes: set[str]) -> onnx.ModelProto:
    """MatMul nodes `nodes` → per-row dynamic INT8: s = max|x|/127 per token, x/s + 128 as
    uint8, int8 weights with per-column scales, MatMulInteger, × s × w_scale."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    g.initializer.extend([numpy_helper.from_array(np.array(v, dt), name) for name, v, dt in
                          [("pt_eps", 1e-8, np.float32), ("pt_inv127", 1 / 127, np.float32),
                           ("pt_128", 128, np.float32), ("pt_zp", 128, np.uint8)]])
    out = []
    for n in g.node:
        if n.name not in nodes:
            out.append(n)
            continue
        x, w, p = n.input[0], n.input[1], n.name
        weight = numpy_helper.to_array(inits[w]).astype(np.float32)
        ws = np.abs(weight).max(axis=0) / 127
        ws[ws == 0] = 1
        g.initializer.extend([
            numpy_helper.from_array(np.round(weight / ws).astype(np.int8), f"{p}_wq"),
            numpy_helper.from_array(ws.astype(np.float32), f"{p}_ws")])
        scale = f"{p}_scale"
        out += [helper.make_node("Abs", [x], [f"{p}_abs"]),
                helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_peak"], axes=[-1],
                                 keepdims=1),
                helper.make_node("Max", [f"{p}_peak", "pt_eps"], [f"{p}_peak1"]),
                helper.make_node("Mul", [f"{p}_peak1", "pt_inv127"], [scale])]
        out += [helper.make_node("Div", [x, scale], [f"{p}_xs"]),
                helper.make_node("Round", [f"{p}_xs"], [f"{p}_xr"]),
                helper.make_node("Add", [f"{p}_xr", "pt_128"], [f"{p}_xa"]),
                helper.make_node("Cast", [f"{p}_xa"], [f"{p}_xq"], to=TensorProto.UINT8),
                helper.make_node("MatMulInteger", [f"{p}_xq", f"{p}_wq", "pt_zp"], [f"{p}_yi"]),
                helper.make_node("Cast", [f"{p}_yi"], [f"{p}_yf"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{p}_yf", scale], [f"{p}_y1"]),
                helper.make_node("Mul", [f"{p}_y1", f"{p}_ws"], list(n.output))]
    return replace_nodes(model, out)


def outlier_split(model: onnx.ModelProto, peaks: dict[str, np.ndarray], ratio: float = 4.0,
                  kmax: int = 8) -> tuple[onnx.ModelProto, list[str]]:
    """x·W = x[:, O]·W[O] (float) + (x with O zeroed)·W, O the outlier input channels; returns
    the model and the small float MatMuls to leave unquantized."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    out, small = [], []
    for n in g.node:
        v = peaks.get(n.name)
        idx = np.array([], np.int64) if v is None else np.argsort(v)[::-1][:kmax]
        idx = np.sort(idx[v[idx] > ratio * np.median(v)]) if len(idx) else idx
        if len(idx) == 0:
            out.append(n)
            continue
        x, w, p = n.input[0], n.input[1], n.name
        weight = numpy_helper.to_array(inits[w])
        keep = np.ones(weight.shape[0], np.float32)
        keep[idx] = 0
        g.initializer.extend([numpy_helper.from_array(a, f"{p}_{k}") for k, a in
                              [("oidx", idx.astype(np.int64)), ("wo", weight[idx]),
                               ("keep", keep), ("wi", weight * keep[:, None])]])
        out += [helper.make_node("Gather", [x, f"{p}_oidx"], [f"{p}_xo"], axis=-1),
                helper.make_node("MatMul", [f"{p}_xo", f"{p}_wo"], [f"{p}_yo"],
                                 name=f"{p}_outlier"),
                helper.make_node("Mul", [x, f"{p}_keep"], [f"{p}_xi"]),
                helper.make_node("MatMul", [f"{p}_xi", f"{p}_wi"], [f"{p}_yi"], name=p),
                helper.make_node("Add", [f"{p}_yi", f"{p}_yo"], list(n.output))]
        small.append(f"{p}_outlier")
    return replace_nodes(model, out), small


def channel_peaks(fp32: Path, nodes: list[str], enc: Encoder) -> dict[str, np.ndarray]:
    """max |x| per input channel of each node's activation, over real tokens of the
    calibration texts."""
    import onnxruntime as ort

    model = onnx.load(str(fp32))
    acts = {n.name: n.input[0] for n in model.graph.node if n.name in nodes}
    for a in set(acts.values()):
        model.graph.output.append(helper.make_tensor_value_info(a, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    ids = enc.tokenizer.encode(calibration_texts(None, 512))
    peaks: dict[str, np.ndarray] = {}
    for i in range(0, len(ids), 16):
        rows = ids[i:i + 16]
        width = max(map(len, rows))
        feed = {"input_ids": np.zeros((len(rows), width), np.int64)}
        feed["attention_mask"] = np.zeros_like(feed["input_ids"])
        for j, r in enumerate(rows):
            feed["input_ids"][j, :len(r)], feed["attention_mask"][j, :len(r)] = r, 1
        real = feed["attention_mask"].astype(bool)
        for name, val in zip(names, sess.run(None, feed), strict=True):
            if name in acts.values():
                v = np.abs(val[real]).max(0)
                peaks[name] = np.maximum(peaks.get(name, v), v)
    return {n: peaks[a] for n, a in acts.items()}


def build_variants(bundle: Path, work: Path, enc: Encoder) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.transformers.optimizer import optimize_model

    fp32 = bundle / "model.onnx"
    kept = set(_kept(bundle))
    linear = [layer.node for layer in linear_layers(onnx.load(str(fp32)))]
    dyn_opts = {"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT}

    def dyn(src: Path, name: str, exclude=(), **kw) -> Path:
        quantize_dynamic(str(src), str(work / name), op_types_to_quantize=["MatMul"],
                         per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_exclude=list(exclude), extra_options=dyn_opts, **kw)
        return work / name

    def nbits(block: int) -> Path:
        q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=8, block_size=block,
                                 is_symmetric=True, accuracy_level=4,
                                 op_types_to_quantize=("MatMul",))
        q.process()
        q.model.save_model_to_file(str(work / f"nbits8-{block}.onnx"), False)
        return work / f"nbits8-{block}.onnx"

    v = {"all-dynamic": dyn(fp32, "all.onnx"),
         "all-dynamic 7-bit weights": dyn(fp32, "all-rr.onnx", reduce_range=True)}
    dyn_model = onnx.load(str(bundle / "model.int8-dynamic.onnx"))
    onnx.save(per_token(dyn_model, kept), str(work / "per-token.onnx"))
    v["int8-dynamic + per-token kept layers"] = work / "per-token.onnx"
    split, small = outlier_split(onnx.load(str(fp32)), channel_peaks(fp32, linear, enc))
    onnx.save(split, str(work / "split.onnx"))
    v["outlier split, all dynamic"] = dyn(work / "split.onnx", "split-q.onnx", small)
    v["MatMulNBits 8-bit block 32"] = nbits(32)
    v["MatMulNBits 8-bit block 128"] = nbits(128)
    fused = optimize_model(str(fp32), model_type="bert", opt_level=0, use_gpu=False)
    fused.save_model_to_file(str(work / "fused.onnx"))
    logging.getLogger().setLevel(logging.ERROR)  # the optimizer turned INFO back on
    v["ORT fused fp32"] = work / "fused.onnx"
    v["ORT fused + int8-dynamic layers"] = dyn(work / "fused.onnx", "fused-q.onnx", kept)
    return v


def _kept(bundle: Path) -> list[str]:
    art = next(a for a in read_manifest(bundle).artifacts if a.precision == "int8-dynamic")
    return art.parity.get("kept_in_float", [])


def openvino_session(path: Path, threads: int) -> Callable | None:
    """A Session factory running `path` on OpenVINO's CPU plugin, or None without it."""
    try:
        import openvino as ov
    except ImportError:
        return None

    class OvSession(Session):
        name = "openvino-cpu"

        def __init__(self) -> None:
            cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
            self.req = ov.Core().compile_model(str(path), "CPU", cfg).create_infer_request()

        def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            return next(iter(self.req.infer({"input_ids": ids,
                                             "attention_mask": mask}).values()))

    return lambda _p: OvSession()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("build/bench/minilm-all"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # the quantizers' advice on every call
    data = find_shared_data()
    if data is None:
        sys.exit("needs the STS-B test set: set ANGLE_RT_DATA")
    sts = load_sts(data / "sts" / "stsb-test.jsonl")
    texts = verification_texts(None) + stress_texts(read_manifest(args.bundle).max_length)

    def encoder(path: Path, factory=None) -> Encoder:
        return Encoder(args.bundle, precision="fp32", verify_checksums=False,
                       backend=factory or (lambda _p: OrtSession(path, "cpu", args.threads)))

    ref_enc = encoder(args.bundle / "model.onnx")
    ref = ref_enc.encode(texts)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"bundle fp32": args.bundle / "model.onnx",
                 "bundle int8 (Q/DQ)": args.bundle / "model.int8.onnx",
                 "bundle int8-dynamic": args.bundle / "model.int8-dynamic.onnx",
                 **build_variants(args.bundle, Path(tmp), ref_enc)}
        encs = {k: encoder(v) for k, v in paths.items()}
        for name, src in [("OpenVINO fp32", "model.onnx"), ("OpenVINO int8 (Q/DQ)",
                                                             "model.int8.onnx")]:
            factory = openvino_session(args.bundle / src, args.threads)
            if factory is not None:
                encs[name] = encoder(args.bundle / src, factory)
        rows = {k: score(e, ref, texts, sts) for k, e in encs.items()}
        for k, r in timed(encs, sts.sentences).items():
            rows[k]["sent_per_s"] = r
    base = rows["bundle int8-dynamic"]["sent_per_s"]
    print(f"\n{'variant':40} {'sent/s':>7} {'× int8-dyn':>10} {'min cos':>8} {'STS-B':>6}")
    for k, r in rows.items():
        r["vs_int8_dynamic"] = r["sent_per_s"] / base
        print(f"{k:40} {r['sent_per_s']:7.0f} {r['vs_int8_dynamic']:10.2f} "
              f"{r['min_cosine']:8.4f} {r['stsb_test']:6.2f}" + ("" if r["passes"] else "  ✗"))
    res = {"bundle": str(args.bundle), "threads": args.threads, "machine": cpu_name(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    out = Path(__file__).parent / "results" / f"int8-variants-{res['date'][:10]}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


def score(enc: Encoder, ref: np.ndarray, texts: list[str], sts) -> dict:
    report = compare(ref, enc.encode(texts), THRESHOLD)
    spearman = sts_spearman(enc.encode(sts.text1), enc.encode(sts.text2), sts.scores)
    return {"min_cosine": report.min_cosine, "mean_cosine": report.mean_cosine,
            "stsb_test": spearman, "passes": report.passed}


def timed(encs: dict[str, Encoder], sents: list[str], passes: int = 3) -> dict[str, float]:
    """sent/s per encoder: median of `passes` interleaved passes after a warm-up."""
    runners = [Runner(k, lambda t, e=e: e.encode(t, batch_size=32)) for k, e in encs.items()]
    for r in runners:
        r.warm(sents[:256])
    for _ in range(passes):
        for r in runners:
            r.timed_pass(sents)
    return {r.name: len(sents) / statistics.median(r.seconds) for r in runners}

if __name__ == "__main__":
    main()
