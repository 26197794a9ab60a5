"""What arrival-order batching costs the model alone, no HTTP: one worker's sent/s on one
ONNX Runtime thread for the batches `encode` forms (the whole list sorted by length, batch
32) against the batches a server can form (windows of k sentences in arrival order, each
planned by the Encoder's planner as the batcher plans it, for several `batch_cost`s).

    python benchmarks/served_batches.py --bundle BUNDLE [--windows 4 8 16 32]
        [--costs 16 32 64] [--rounds 3]

Same sentences (STS-B test, shuffled once with seed 0), same process; every (window,
cost) pass is timed `--rounds` times interleaved with the sorted pass, and the median of
the per-round ratios is reported. Writes benchmarks/results/served-batches-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from angle_rt import Encoder
from angle_rt.batching import plan_batches
from benchmarks.harness import cpu_name
from benchmarks.serve_load import sentences

ROOT = Path(__file__).resolve().parent.parent


def arrival_batches(lengths: np.ndarray, window: int, cost: int, budget: int) -> list[np.ndarray]:
    """Windows of `window` consecutive sentences, each planned apart (as the batcher does)."""
    out = []
    for start in range(0, len(lengths), window):
        idx = np.arange(start, min(start + window, len(lengths)))
        out += [idx[b] for b in plan_batches(lengths[idx], 32, budget, 1, None, cost)]
    return out


def timed(enc: Encoder, ids: list[list[int]], batches: list[np.ndarray]) -> float:
    """Sentences a second through enc.run_batch over these batches."""
    start = time.perf_counter()
    for b in batches:
        enc.run_batch([ids[i] for i in b])
    return sum(map(len, batches)) / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict:
    texts = sentences(args.data)
    order = np.random.default_rng(0).permutation(len(texts))
    enc = Encoder(args.bundle, intra_op_threads=1)
    ids = [enc.tokenize([texts[i]], None)[0] for i in order]
    lengths = np.array([len(r) for r in ids])
    by_length = np.argsort(-lengths, kind="stable")
    sorted_batches = [by_length[i:i + 32] for i in range(0, len(ids), 32)]
    timed(enc, ids, sorted_batches[:20])  # warm
    rows = []
    for window in args.windows:
        for cost in args.costs:
            batches = arrival_batches(lengths, window, cost, enc.max_batch_tokens)
            ratios, rates, ceilings = [], [], []
            for _ in range(args.rounds):
                ceiling, rate = timed(enc, ids, sorted_batches), timed(enc, ids, batches)
                ratios.append(rate / ceiling)
                rates.append(rate)
                ceilings.append(ceiling)
            padded = sum(len(b) * lengths[b].max() for b in batches) / len(ids)
            row = {"window": window, "batch_cost": cost, "sent_per_s": statistics.median(rates),
                   "sorted_sent_per_s": statistics.median(ceilings),
                   "ratio": statistics.median(ratios), "rows_per_batch": len(ids) / len(batches),
                   "padded_tokens_per_row": float(padded)}
            rows.append(row)
            print(f"window {window:3d} cost {cost:3d}: {row['sent_per_s']:6.0f} sent/s "
                  f"({row['ratio']:.2f}x sorted {row['sorted_sent_per_s']:.0f}), "
                  f"{row['rows_per_batch']:.1f} rows/batch, {padded:.1f} padded tokens/row",
                  flush=True)
    return {"bundle": str(args.bundle), "sentences": len(ids),
            "real_tokens_per_row": float(lengths.mean()), "rows": rows,
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--costs", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", type=Path, default=Path(os.environ.get(
        "ANGLE_RT_DATA", ROOT.parent / "shared" / "data")) / "sts" / "stsb-test.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                   f"served-batches-{datetime.now(timezone.utc):%Y-%m-%d}.json")
    args = p.parse_args()
    result = run(args)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
