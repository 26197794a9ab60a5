"""One-sentence latency while a flood runs: does `angle-rt serve` keep a light client fast
when two clients send 2,048 long texts each?

    python benchmarks/serve_flood.py --bundle BUNDLE [--quanta 1024 2048 8192]
        [--lanes 0 128] [--flood-requests 2] [--flood-inputs 2048] [--flood-chars 900]
        [--light-clients 3]

Per `--fair-quantum-tokens` value and `--lane-tokens` value (`--lanes`; the server's
default when not given), a server on 127.0.0.1 (started and stopped here):
1. idle: one client sends --idle-requests one-sentence requests in a row: p50 / p99; then
   one request of 2,048 STS-B sentences, alone (best of 2): what small turns cost it;
2. flood: --flood-requests requests of --flood-inputs texts of --flood-chars characters
   each (900: ~217 tokens; STS-B sentences joined) are sent at once; 0.5 s later
   --light-clients clients start sending one-sentence requests in a loop until the floods
   are answered: their p50 / p99, and p99 over the idle p50 (the issue's bound: ≤ 10);
   the floods' wall time and tokens/s (what fairness costs them).
Writes benchmarks/results/serve-flood-<bundle>-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def sentences(data: Path) -> list[str]:
    out: list[str] = []
    for line in (data / "sts" / "stsb-test.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out += [rec["sentence1"], rec["sentence2"]]
    return list(dict.fromkeys(out))


def paragraphs(pool: list[str], n: int, chars: int = 900) -> list[str]:
    """n texts of ~`chars` characters (≈ 200 tokens), consecutive sentences joined."""
    out, k = [], 0
    for _ in range(n):
        text = ""
        while len(text) < chars:
            text += pool[k % len(pool)] + " "
            k += 1
        out.append(text.strip())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(bundle: str, quantum: int, lane: int | None,
          log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "angle_rt.cli", "serve", bundle, "--host", "127.0.0.1",
           "--port", str(port), "--fair-quantum-tokens", str(quantum), "--no-access-log",
           "--request-timeout", "900", "--served-model-name", "m"]
    cmd += [] if lane is None else ["--lane-tokens", str(lane)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server not ready in 120 s")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


async def one(client: httpx.AsyncClient, url: str, text: str) -> float:
    t = time.perf_counter()
    r = await client.post(f"{url}/v1/embeddings", json={"input": text, "model": "m"})
    r.raise_for_status()
    return time.perf_counter() - t


async def idle(url: str, pool: list[str], n: int) -> list[float]:
    async with httpx.AsyncClient(timeout=60) as client:
        for k in range(20):  # warm-up
            await one(client, url, pool[k])
        return [await one(client, url, pool[k % len(pool)]) for k in range(n)]


async def flood(url: str, pool: list[str], floods: list[list[str]],
                light_clients: int) -> dict:
    lat: list[float] = []
    done = asyncio.Event()

    async def light(k: int) -> None:
        async with httpx.AsyncClient(timeout=900) as client:
            while not done.is_set():
                lat.append(await one(client, url, pool[k % len(pool)]))
                k += light_clients

    async def big(texts: list[str]) -> float:
        async with httpx.AsyncClient(timeout=900) as client:
            t = time.perf_counter()
            r = await client.post(f"{url}/v1/embeddings", json={"input": texts, "model": "m"})
            r.raise_for_status()
            return time.perf_counter() - t

    t0 = time.perf_counter()
    bigs = [asyncio.create_task(big(texts)) for texts in floods]
    await asyncio.sleep(0.5)
    lights = [asyncio.create_task(light(k)) for k in range(light_clients)]
    walls = await asyncio.gather(*bigs)
    done.set()
    await asyncio.gather(*lights)
    return {"light_latencies": lat, "flood_seconds": walls,
            "all_floods_seconds": time.perf_counter() - t0}


def variant(args: argparse.Namespace, quantum: int, lane: int | None, pool: list[str],
            floods: list[list[str]], tmp: Path) -> dict:
    proc, url = start(args.bundle, quantum, lane, tmp / f"serve-{quantum}-{lane}.log")
    try:
        quiet = asyncio.run(idle(url, pool, args.idle_requests))
        lone = []  # one request of 2,048 short sentences alone: what small turns cost it
        for _ in range(2):
            t = time.perf_counter()
            httpx.post(f"{url}/v1/embeddings", json={"input": pool[:2048], "model": "m"},
                       timeout=600).raise_for_status()
            lone.append(time.perf_counter() - t)
        tokens = httpx.post(f"{url}/tokenize", json={"inputs": floods[0][:64]},
                            timeout=60).json()
        lane = httpx.get(f"{url}/info", timeout=10).json().get("lane_tokens")
        mean_tokens = statistics.mean(len(t) for t in tokens)
        got = asyncio.run(flood(url, pool, floods, args.light_clients))
    finally:
        proc.terminate()
        proc.wait(60)
    lat = got.pop("light_latencies")
    idle_p50 = pct(quiet, 0.5)
    total_tokens = mean_tokens * sum(len(f) for f in floods)
    res = {"fair_quantum_tokens": quantum, "lane_tokens": lane,
           "idle_p50_ms": round(idle_p50, 2), "idle_p99_ms": round(pct(quiet, 0.99), 2),
           "lone_2048_sentences_sent_per_s": round(2048 / min(lone), 1),
           "flood_light_requests": len(lat),
           "flood_light_requests_per_s": round(len(lat) / got["all_floods_seconds"], 1),
           "flood_light_p50_ms": round(pct(lat, 0.5), 2),
           "flood_light_p99_ms": round(pct(lat, 0.99), 2),
           "flood_light_max_ms": round(max(lat) * 1000, 2),
           "p99_over_idle_p50": round(pct(lat, 0.99) / idle_p50, 2),
           "flood_mean_tokens_per_text": round(mean_tokens, 1),
           "flood_seconds": [round(s, 1) for s in got["flood_seconds"]],
           "flood_tokens_per_s": round(total_tokens / got["all_floods_seconds"], 1)}
    print(json.dumps(res), file=sys.stderr, flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--quanta", type=int, nargs="+", default=[2048])
    p.add_argument("--lanes", type=int, nargs="+", default=[None],
                   help="--lane-tokens values to run (default: the server's own)")
    p.add_argument("--flood-requests", type=int, default=2)
    p.add_argument("--flood-inputs", type=int, default=2048)
    p.add_argument("--flood-chars", type=int, default=900,
                   help="characters of each flood text (900: ~217 tokens)")
    p.add_argument("--light-clients", type=int, default=3)
    p.add_argument("--idle-requests", type=int, default=300)
    p.add_argument("--data", default=os.environ.get("ANGLE_RT_DATA", str(REPO.parent / "shared"
                                                                         / "data")))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    pool = sentences(Path(args.data))
    texts = paragraphs(pool, args.flood_requests * args.flood_inputs, args.flood_chars)
    floods = [texts[i * args.flood_inputs:(i + 1) * args.flood_inputs]
              for i in range(args.flood_requests)]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [variant(args, q, lane, pool, floods, Path(tmp))
                for q in args.quanta for lane in args.lanes]
    result = {"bundle": args.bundle, "machine": cpu_name(), "cpus": os.cpu_count(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "flood_requests": args.flood_requests, "flood_inputs": args.flood_inputs,
              "flood_chars": args.flood_chars,
              "light_clients": args.light_clients, "runs": runs,
              "command": " ".join(sys.argv)}
    name = Path(args.bundle).name
    out = Path(args.out or RESULTS / f"serve-flood-{name}-{result['date'][:10]}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
