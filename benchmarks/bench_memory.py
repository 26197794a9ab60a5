"""Peak memory while streaming many sentences through Encoder.encode_iter.

    python benchmarks/bench_memory.py --bundle build/bench/minilm [--n 1000000]

Short sentences (built-in ones cut to 3–12 words, numbered so none repeat) are generated
lazily and encoded in chunks; RSS is sampled from /proc after loading and every chunk.
Reports RSS after load, peak RSS (VmHWM) and their ratio, plus throughput.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from angle_rt import Encoder
from benchmarks.harness import cpu_name, rss_mb
from exporters.texts import builtin_sentences


def short_sentences(n: int, seed: int = 0) -> Iterator[str]:
    rng, pool = random.Random(seed), [s.split() for s in builtin_sentences()]
    for i in range(n):
        words = rng.choice(pool)
        k = rng.randint(3, 12)
        yield " ".join(words[:k]) + f" #{i}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--precision", default=None)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--chunk-size", type=int, default=4096)
    args = p.parse_args()
    enc = Encoder(args.bundle, precision=args.precision)
    assert "torch" not in sys.modules  # the baseline is the runtime's alone
    enc.encode(builtin_sentences()[:64])  # warm-up: arenas and thread pools exist now
    after_load, _ = rss_mb()
    start, done, checksum, trace = time.perf_counter(), 0, 0.0, {}
    every = max(1, args.n // 10)
    for chunk in enc.encode_iter(short_sentences(args.n), chunk_size=args.chunk_size,
                                 show_progress_bar=True):
        done += len(chunk)
        checksum += float(chunk[:, 0].sum())  # consume, as a caller writing vectors would
        if done // every != (done - len(chunk)) // every:  # RSS at each tenth of the run
            trace[done] = round(rss_mb()[0], 1)
    seconds = time.perf_counter() - start
    now, peak = rss_mb()
    result = {"bundle": args.bundle, "artifact": enc.artifact.file, "n": done,
              "rss_after_load_mb": round(after_load, 1), "peak_rss_mb": round(peak, 1),
              "rss_at_end_mb": round(now, 1), "peak_over_load": round(peak / after_load, 3),
              "sent_per_s": round(done / seconds, 1), "seconds": round(seconds, 1),
              "rss_trace_mb": trace, "machine": cpu_name()}
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / f"memory-{Path(args.bundle).name}-{args.n}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
