"""How much of the gap between served and offline throughput is the batches' shape.

`angle-rt serve` runs under closed-loop one-sentence clients (as serve_load.py's 32) with
`Encoder.run_batch` recording every batch it runs; the batches of the measured window are
then replayed on as many threads as the server's workers, with no server, loop or client
on the cores, and set against offline `Encoder.encode` (batch 32, measured before and after
each replay: this VM's offline rate drifts). replay / offline is what the served batches
(fewer sentences, more padding, one fixed run cost each) allow before any HTTP; served /
replay is what the server's own work (HTTP, JSON, tokenizing, the loop) and sharing the
cores with the clients leave of it.

    python benchmarks/serve_replay.py --bundle /tmp/embed-bench-minilm --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serve_load import (  # noqa: E402
    _bodies,
    free_port,
    load,
    publish,
    sentences,
    server,
)

# the server process: angle-rt serve with each batch's rows recorded, written at exit
RECORDING = r'''
import atexit, pickle, sys, time
from angle_rt.encoder import Encoder
batches, real = [], Encoder.run_batch
def run_batch(self, rows):
    batches.append((time.monotonic(), [list(r) for r in rows]))
    return real(self, rows)
Encoder.run_batch = run_batch
atexit.register(lambda: pickle.dump(batches, open(sys.argv[1], "wb")))
from angle_rt.cli import main
sys.exit(main(sys.argv[2:]))
'''


def record(bundle: Path, bodies: list[bytes], clients: int, seconds: float,
           tmp: Path) -> tuple[dict, list[list[list[int]]]]:
    """Serve under load; the load's figures and the batches run while it was measured."""
    port, rec = free_port(), tmp / "batches.pkl"
    cmd = [sys.executable, "-c", RECORDING, str(rec), "serve", str(bundle), "--host",
           "127.0.0.1", "--port", str(port), "--served-model-name", "m"]
    with server(cmd, tmp / "serve.log", port, "/ready"):
        load(port, "/v1/embeddings", bodies, clients, min(4.0, seconds))  # warm-up
        start = time.monotonic()
        served = load(port, "/v1/embeddings", bodies, clients, seconds)
        end = time.monotonic()
    with open(rec, "rb") as fh:  # written when the server exited
        batches = [rows for t, rows in pickle.load(fh) if start <= t <= end]
    return served, batches


def replay(enc: object, batches: list[list[list[int]]], threads: int) -> float:
    """Sentences a second running exactly these batches on `threads` threads."""
    it, lock, done = iter(batches), threading.Lock(), []

    def work() -> None:
        n = 0
        while True:
            with lock:
                rows = next(it, None)
            if rows is None:
                done.append(n)
                return
            enc.run_batch(rows)
            n += len(rows)

    start = time.perf_counter()
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def offline(enc: object, texts: list[str]) -> float:
    start = time.perf_counter()
    enc.encode(texts, batch_size=32)
    return len(texts) / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict:
    from angle_rt import Encoder

    texts = sentences(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        served, batches = record(args.bundle, _bodies(texts, "base64"), args.clients,
                                 args.seconds, Path(tmp))
    n = sum(map(len, batches))
    enc = Encoder(args.bundle)
    offline(enc, texts)  # warm-up
    rounds = []
    for _ in range(args.rounds):
        before = offline(enc, texts)
        rate = replay(enc, batches, enc.streams)
        after = offline(enc, texts)
        rounds.append({"offline_before": before, "replay": rate, "offline_after": after,
                       "replay_vs_offline": rate / ((before + after) / 2)})
        print(json.dumps(rounds[-1]), flush=True)
    return {"served_sent_per_s": served["sent_per_s"], "batches": len(batches),
            "sentences_a_batch": n / len(batches),
            "padded_tokens_a_sentence": sum(len(b) * max(map(len, b)) for b in batches) / n,
            "threads": enc.streams, "rounds": rounds,
            "median_replay_vs_offline": statistics.median(r["replay_vs_offline"]
                                                          for r in rounds),
            "served_vs_replay": served["sent_per_s"] / statistics.median(
                r["replay"] for r in rounds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, default=Path(os.environ.get(
        "ANGLE_RT_DATA", ROOT.parent / "shared" / "data")) / "sts" / "stsb-test.jsonl")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    publish("serve_replay.py", args.out,
            {"clients": args.clients, "seconds": args.seconds, **run(args)})


if __name__ == "__main__":
    main()
