"""Where a served request's CPU goes: `angle-rt serve` under closed-loop one-sentence clients,
with the server's CPU split between its event loop (the main thread: HTTP, JSON, tokenizing
small bodies, the handler) and its other threads (the batch workers, the log writer, the
tokenizer pool), per request.

    python benchmarks/serve_cpu.py --bundle BUNDLE [--clients 32] [--seconds 10]
        [--rounds 3] [--variant NAME=ARGS ...] [--tree NAME=PATH ...] [--out JSON]

A variant is extra `angle-rt serve` arguments; a tree is another checkout of this
repository (e.g. `git worktree add /tmp/base <commit>`) whose `angle_rt` serves instead,
so two commits compare in one run. Rounds alternate the variants and trees, so their
ratios share the machine's drift. A tiny bundle (a 2-layer random model) makes the server
loop-bound: its figures are then the HTTP path's own cost. Per setting: sent/s, p50 / p99,
event-loop and other-thread CPU µs a request (from /proc, over the same window as the
request count from /metrics), host idle cores (/proc/stat), and the batches' mean size
and padding efficiency. Bounded: servers bind 127.0.0.1 only and are stopped here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
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

TICK = os.sysconf("SC_CLK_TCK")
METRICS = ("angle_rt_inputs_total", "angle_rt_tokens_total", "angle_rt_batch_size_sum",
           "angle_rt_batch_size_count", "angle_rt_batch_tokens_sum")


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of (the main thread, all other threads) of process `pid`."""
    main = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        seconds = (int(fields[11]) + int(fields[12])) / TICK
        if int(task.name) == pid:
            main += seconds
        else:
            other += seconds
    return main, other


def idle_seconds() -> float:
    return int(Path("/proc/stat").read_text().split()[4]) / TICK


def metrics(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = dict.fromkeys(METRICS, 0.0)
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def measure(pid: int, port: int, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """One closed-loop load; CPU and batch figures over the same window as its requests."""
    m0, (main0, other0), idle0 = metrics(port), thread_cpu(pid), idle_seconds()
    stats = load(port, "/v1/embeddings", bodies, clients, seconds)
    if stats["errors"]:
        raise RuntimeError(f"{stats['errors']} requests failed: {stats.get('last_error')}")
    main1, other1 = thread_cpu(pid)
    idle1, m1 = idle_seconds(), metrics(port)
    d = {k: m1[k] - m0[k] for k in METRICS}
    requests = max(d["angle_rt_inputs_total"], 1)
    window = seconds + 3.0  # load() runs a 3 s warm-up before the measured seconds
    return {"sent_per_s": stats["sent_per_s"], "p50_ms": stats["p50_ms"],
            "p99_ms": stats["p99_ms"], "errors": stats["errors"],
            "loop_us_per_request": (main1 - main0) / requests * 1e6,
            "other_threads_us_per_request": (other1 - other0) / requests * 1e6,
            "idle_cores": (idle1 - idle0) / window,
            "batch_size": d["angle_rt_batch_size_sum"] / max(d["angle_rt_batch_size_count"], 1),
            "padding_efficiency": d["angle_rt_tokens_total"]
            / max(d["angle_rt_batch_tokens_sum"], 1)}


def settings(args: argparse.Namespace) -> list[tuple[str, Path, list[str]]]:
    out = [(name, ROOT, extra.split()) for name, extra in
           (v.split("=", 1) for v in args.variant or ["default="])]
    out += [(name, Path(path).resolve(), []) for name, path in
            (t.split("=", 1) for t in args.tree or [])]
    return out


def run(args: argparse.Namespace) -> dict:
    bodies = _bodies(sentences(args.data), "base64")
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = settings(args)
            k = r % len(order)
            for name, tree, extra in order[k:] + order[:k]:
                port = free_port()
                cmd = [sys.executable, "-m", "angle_rt.cli", "serve", str(args.bundle),
                       "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "m",
                       *extra]
                env = {"PYTHONPATH": str(tree)} if tree != ROOT else None
                with server(cmd, Path(tmp) / f"{name}.log", port, "/ready", env=env,
                            cwd=tree) as (pid, _):
                    row = measure(pid, port, bodies, args.clients, args.seconds)
                rows.setdefault(name, []).append(row)
                print(f"round {r + 1} {name}: " + ", ".join(
                    f"{key} {value:.2f}" for key, value in row.items()
                    if isinstance(value, float)), flush=True)
    return {name: {"rounds": rs, "median": {key: statistics.median(x[key] for x in rs)
                                            for key in rs[0] if isinstance(rs[0][key], float)}}
            for name, rs in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, default=Path(os.environ.get(
        "ANGLE_RT_DATA", ROOT.parent / "shared" / "data")) / "sts" / "stsb-test.jsonl")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variant", action="append", metavar="NAME=ARGS",
                   help="extra `angle-rt serve` arguments (repeatable; default: none)")
    p.add_argument("--tree", action="append", metavar="NAME=PATH",
                   help="serve another checkout's angle_rt as well (repeatable)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    publish("serve_cpu.py", args.out,
            {"clients": args.clients, "seconds": args.seconds, **run(args)})


if __name__ == "__main__":
    main()
