"""One `angle-rt serve` process against N of them (one worker on one thread each, the
clients spread over them), at the same closed-loop load, against the offline ceiling.

    python benchmarks/serve_processes.py --bundle BUNDLE [--processes 2] [--clients 32]
        [--seconds 12] [--rounds 3] [--out RESULT.json]

The question: on a 2-core host, does giving each core its own event loop and worker (as
`uvicorn --workers` or a pod per core would) lift the served rate toward the offline one?
Each process's single worker takes everything queued in its process, so its batches grow
with its share of the clients, where the default process's two workers split the queue.
Each round measures the offline ceiling (`Encoder.encode`, batch 32, median of 3 passes),
the default process, the N processes, then the ceiling again; ratios are to the mean of
the two ceilings. Every server binds 127.0.0.1 and is stopped here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import serve_load as sl  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    texts = sl.sentences(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="serve-processes-"))
    (tmp / "texts.json").write_text(json.dumps(texts))
    bodies = sl._bodies(texts, "base64")
    base = [sys.executable, "-m", "angle_rt.cli", "serve", str(args.bundle),
            "--served-model-name", "m", "--port", "0"]
    rounds = []
    with ExitStack() as stack:
        one = stack.enter_context(sl.server(base, tmp / "one.log", None, "/ready"))[1]
        many = [stack.enter_context(sl.server([*base, "--workers", "1", "--threads", "1"],
                                              tmp / f"p{k}.log", None, "/ready"))[1]
                for k in range(args.processes)]
        for port in (one, *many):  # shapes, caches, thread pools: steady state
            sl.load(port, "/v1/embeddings", bodies, 8, args.prewarm_seconds)
        for _ in range(args.rounds):
            before = sl._offline(args.bundle, tmp / "texts.json")["sent_per_s"]
            single = sl.load(one, "/v1/embeddings", bodies, args.clients, args.seconds)
            split = sl.load(many, "/v1/embeddings", bodies, args.clients, args.seconds)
            after = sl._offline(args.bundle, tmp / "texts.json")["sent_per_s"]
            ceiling = (before + after) / 2
            rounds.append({"offline": [before, after], "one_process": single,
                           f"{args.processes}_processes": split,
                           "ratio_one": single["sent_per_s"] / ceiling,
                           f"ratio_{args.processes}": split["sent_per_s"] / ceiling})
            print(json.dumps(rounds[-1]), flush=True)
    key = f"ratio_{args.processes}"
    return {"rounds": rounds, "summary": {
        "median_ratio_one_process": statistics.median(r["ratio_one"] for r in rounds),
        f"median_ratio_{args.processes}_processes": statistics.median(r[key] for r in rounds)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, default=Path(os.environ.get(
        "ANGLE_RT_DATA", ROOT.parent / "shared" / "data")) / "sts" / "stsb-test.jsonl")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prewarm-seconds", type=float, default=4.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = {"clients": args.clients, "seconds": args.seconds, **run(args)}
    sl.publish("serve_processes.py", args.out, result)


if __name__ == "__main__":
    main()
