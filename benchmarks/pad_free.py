"""Pad-free linear layers for the per-token INT8 graph: do served (mixed-length) batches get
faster when the int8 MatMuls skip the padding rows, and what does it cost sorted batches?

    python benchmarks/pad_free.py --bundle BUNDLE [--rounds 5] [--out F]

BUNDLE holds the int8-dynamic artifact. Its per-token rewrite flattens each linear input to
[B·T, K] rows; the variant built here gathers the real tokens' rows first (NonZero of the
flattened attention mask), quantizes and multiplies only those N rows, and gathers the
result back to [B·T, N_out] (padding positions read row 0: finite values the attention and
pooling masks drop). Integer sums and per-row scales do not depend on which rows share a
MatMul, so the vectors keep their bits: checked on random batches before timing. Both graphs
run on one ONNX Runtime thread (a served worker's), over the STS-B test sentences (shuffled
once, seed 0) in three batch shapes: `encode`'s (sorted by length, 32 a batch), today's
served windows (6 arrivals planned as the batcher plans them, batch cost 16) and windows of
8 arrivals unsplit (what a pad-free graph would let the batcher run); rounds interleave the
graphs, medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from angle_rt import Encoder
from angle_rt.batching import plan_batches
from benchmarks.harness import cpu_name
from benchmarks.serve_load import sentences

ROOT = Path(__file__).resolve().parent.parent
MASK = "attention_mask"


def pad_free(model: onnx.ModelProto) -> onnx.ModelProto:
    """The per-token graph with each quantized activation's rows gathered to the real
    tokens and each int8 MatMul's rows gathered back (see the docstring)."""
    g = model.graph
    g.initializer.extend([numpy_helper.from_array(np.array([-1], np.int64), "pf_flat"),
                          numpy_helper.from_array(np.array(0, np.int64), "pf_zero"),
                          numpy_helper.from_array(np.array(1, np.int64), "pf_one")])
    nodes = [
        helper.make_node("Reshape", [MASK, "pf_flat"], ["pf_mask"]),
        helper.make_node("NonZero", ["pf_mask"], ["pf_nz"]),
        helper.make_node("Reshape", ["pf_nz", "pf_flat"], ["pf_rows"]),  # real tokens' rows
        helper.make_node("CumSum", ["pf_mask", "pf_zero"], ["pf_count"]),
        helper.make_node("Sub", ["pf_count", "pf_one"], ["pf_rank"]),
        helper.make_node("Cast", ["pf_mask"], ["pf_real"], to=onnx.TensorProto.BOOL),
        helper.make_node("Where", ["pf_real", "pf_rank", "pf_zero"], ["pf_back"]),
    ]
    for node in g.node:
        nodes.append(node)
        if node.name.endswith("_Flatten") and node.output[0].endswith("_x2"):
            x2 = node.output[0]
            nodes.append(helper.make_node("Gather", [x2, "pf_rows"], [x2 + "_pf"], axis=0))
        elif node.name.endswith("_Rescale"):
            rows = node.output[0]
            nodes.append(helper.make_node("Gather", [rows, "pf_back"], [rows + "_pf"], axis=0))
    for node in nodes:  # the quantizers read the gathered rows, the unflatten the scattered
        quantizer = node.op_type in ("Abs", "QuantizeLinear") and node.input[0].endswith("_x2")
        if quantizer or node.name.endswith("_Unflatten"):
            node.input[0] += "_pf"
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feed(ids: list[list[int]], rows: np.ndarray) -> dict[str, np.ndarray]:
    width = max(len(ids[i]) for i in rows)
    x = np.zeros((len(rows), width), np.int64)
    m = np.zeros_like(x)
    for r, i in enumerate(rows):
        x[r, :len(ids[i])], m[r, :len(ids[i])] = ids[i], 1
    return {"input_ids": x, MASK: m}


def shapes(lengths: np.ndarray, budget: int) -> dict[str, list[np.ndarray]]:
    by_length = np.argsort(-lengths, kind="stable")
    n = len(lengths)
    windows = {w: [np.arange(s, min(s + w, n)) for s in range(0, n, w)] for w in (6, 8)}
    return {"sorted-32": [by_length[i:i + 32] for i in range(0, n, 32)],
            "served-6-cost16": [w[b] for w in windows[6]
                                for b in plan_batches(lengths[w], 32, budget, 1, None, 16)],
            "window-8-unsplit": windows[8]}


def check_bits(base: ort.InferenceSession, packed: ort.InferenceSession,
               ids: list[list[int]], n: int = 30) -> None:
    rng = np.random.default_rng(1)
    for _ in range(n):
        f = feed(ids, rng.choice(len(ids), int(rng.integers(1, 48)), replace=False))
        a, b = base.run(None, f)[0], packed.run(None, f)[0]
        if not np.array_equal(a, b):
            raise SystemExit(f"bits differ: max |diff| {np.abs(a - b).max():.3g}")


def prepared(args: argparse.Namespace) -> tuple[Encoder, list[list[int]], np.ndarray, Path]:
    """The bundle's int8-dynamic Encoder (one thread), the STS-B test ids shuffled once
    (seed 0), their lengths and the artifact's path."""
    texts = sentences(args.data)
    enc = Encoder(args.bundle, precision="int8-dynamic", intra_op_threads=1)
    order = np.random.default_rng(0).permutation(len(texts))
    ids = [enc.tokenize([texts[i]], None)[0] for i in order]
    return enc, ids, np.array([len(r) for r in ids]), Path(args.bundle) / enc.artifact.file


def timed_rounds(graphs: dict[str, ort.InferenceSession],
                 feeds: dict[str, list[dict[str, np.ndarray]]], rounds: int,
                 sentences_per_pass: int) -> dict[str, dict[str, list[float]]]:
    """Sent/s of each graph on each shape's batches, `rounds` times, the graphs alternating."""
    rates: dict[str, dict[str, list[float]]] = {k: {g: [] for g in graphs} for k in feeds}
    for sess in graphs.values():  # warm
        for f in feeds["sorted-32"][:10]:
            sess.run(None, f)
    for _ in range(rounds):
        for shape, fs in feeds.items():
            for name, sess in graphs.items():
                start = time.perf_counter()
                for f in fs:
                    sess.run(None, f)
                rates[shape][name].append(sentences_per_pass / (time.perf_counter() - start))
    return rates


def paired(new: list[float], base: list[float]) -> float:
    """Median of the per-round ratios: the VM's speed drifts ±15% between rounds, so the
    pair measured in one round is the measure."""
    return statistics.median(n / b for n, b in zip(new, base, strict=True))


def run(args: argparse.Namespace) -> dict:
    enc, ids, lengths, src = prepared(args)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(pad_free(onnx.load(str(src))), f"{tmp}/pad-free.onnx")
        graphs = {"per-token": session(src), "pad-free": session(Path(tmp) / "pad-free.onnx")}
    check_bits(graphs["per-token"], graphs["pad-free"], ids)
    batches = shapes(lengths, enc.max_batch_tokens)
    feeds = {k: [feed(ids, b) for b in v] for k, v in batches.items()}
    rates = timed_rounds(graphs, feeds, args.rounds, len(ids))
    rows = []
    for shape, fs in feeds.items():
        real = sum(int(f[MASK].sum()) for f in fs)
        ratio = paired(rates[shape]["pad-free"], rates[shape]["per-token"])
        row = {"shape": shape, "batches": len(fs), "rows_per_batch": len(ids) / len(fs),
               "density": real / sum(f[MASK].size for f in fs),
               **{f"{g}_sent_per_s": statistics.median(v) for g, v in rates[shape].items()},
               "pad_free_over_per_token": ratio, "rounds": rates[shape]}
        rows.append(row)
        print(f"{shape:17s} {row['rows_per_batch']:5.1f} rows, density {row['density']:.2f}: "
              f"per-token {row['per-token_sent_per_s']:5.0f}, pad-free "
              f"{row['pad-free_sent_per_s']:5.0f} sent/s (median ratio a round {ratio:.2f})",
              flush=True)
    return {"bundle": str(args.bundle), "sentences": len(ids), "bits_equal": True, "rows": rows,
            **stamp()}


def stamp() -> dict:
    return {"machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """--bundle, --rounds, --data (STS-B test) and --out (results/NAME-DATE.json)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data", type=Path, default=Path(os.environ.get(
        "ANGLE_RT_DATA", ROOT.parent / "shared" / "data")) / "sts" / "stsb-test.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                   f"{name}-{datetime.now(timezone.utc):%Y-%m-%d}.json")
    return p


def write(out: Path, result: dict) -> None:
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    args = parser(__doc__, "pad-free").parse_args()
    write(args.out, run(args))


if __name__ == "__main__":
    main()
