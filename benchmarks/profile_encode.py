"""Where angle_rt's CPU time goes: pipeline stages, graph operators, batch size.

    python benchmarks/profile_encode.py [--bundle build/bench/minilm-all] [--threads 2]

1. Stages of Encoder.encode on the STS-B test sentences (built-in ones without the data):
   tokenize, session.run, and the rest (batch planning, padding, scatter).
2. ONNX Runtime's own profiler per artifact: share of graph time per operator type.
3. sent/s per batch size per artifact (one pass each after a warm-up).
Writes benchmarks/results/profile-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from angle_rt import Encoder
from angle_rt.session.onnxrt import OrtSession
from benchmarks.harness import cpu_name
from exporters.texts import benchmark_sentences


def stages(enc: Encoder, texts: list[str], batch: int) -> dict[str, float]:
    """Seconds of one real encode() of `texts`: tokenize, session.run, and the rest
    (batch planning, padding, scatter back to input order, checks)."""
    t: dict[str, float] = defaultdict(float)

    def timed(stage: str, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                t[stage] += time.perf_counter() - start
        return call

    enc.tokenizer.encode = timed("tokenize", enc.tokenizer.encode)
    enc.session.run = timed("session.run", enc.session.run)
    try:
        start = time.perf_counter()
        enc.encode(texts, batch_size=batch)
        total = time.perf_counter() - start
    finally:  # drop the instance attributes: the class methods show through again
        del enc.tokenizer.encode, enc.session.run
    return {**t, "rest": total - sum(t.values())}


def operator_shares(path: Path, texts: list[str], threads: int, batch: int) -> dict[str, float]:
    """Fraction of ONNX Runtime node time per operator type over one encode of `texts`."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = {"enable_profiling": True, "profile_file_prefix": str(Path(tmp) / "ort")}
        enc = Encoder(path, backend=lambda p: OrtSession(p, "cpu", threads, opts))
        enc.encode(texts, batch_size=batch)
        events = json.loads(Path(enc.session.inference_session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values())
    return {op: us / total for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])}


def batch_sweep(enc: Encoder, texts: list[str], sizes: list[int]) -> dict[int, float]:
    enc.encode(texts[:256], batch_size=32)
    rates = {}
    for b in sizes:
        start = time.perf_counter()
        enc.encode(texts, batch_size=b)
        rates[b] = len(texts) / (time.perf_counter() - start)
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="build/bench/minilm-all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sizes", default="8,16,32,64,128")
    args = p.parse_args()
    texts, source = benchmark_sentences()
    manifest = Encoder(args.bundle).manifest
    res: dict = {"bundle": args.bundle, "texts": source, "n": len(texts),
                 "threads": args.threads, "machine": cpu_name(),
                 "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "artifacts": {}}
    for art in manifest.artifacts:
        if art.format != "onnx":
            continue
        enc = Encoder(args.bundle, precision=art.precision, intra_op_threads=args.threads)
        enc.encode(texts[:256])
        st = stages(enc, texts, args.batch_size)
        ops = operator_shares(Path(args.bundle) / art.file, texts, args.threads,
                              args.batch_size)
        sweep = batch_sweep(enc, texts, [int(s) for s in args.sizes.split(",")])
        res["artifacts"][art.precision] = {"stages_s": st, "operator_share": ops,
                                           "sent_per_s_by_batch": sweep}
        total = sum(st.values())
        print(f"\n{art.precision}: {len(texts)} sentences in {total:.2f} s at batch "
              f"{args.batch_size}")
        print("  stages: " + ", ".join(f"{k} {v / total:.1%}" for k, v in st.items()))
        print("  graph:  " + ", ".join(f"{k} {v:.1%}" for k, v in list(ops.items())[:8]))
        print("  sent/s by batch: " + ", ".join(f"{b}: {r:.0f}" for b, r in sweep.items()))
    out = Path(__file__).parent / "results" / f"profile-{res['date'][:10]}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
