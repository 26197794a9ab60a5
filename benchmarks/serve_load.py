"""Served throughput and latency under concurrent single-sentence clients, in one run:
`angle-rt serve` against the offline `Encoder.encode` ceiling and anchor servers.

    python benchmarks/serve_load.py --bundle BUNDLE --model-dir MODEL_DIR
        [--concurrency 1 8 32 128] [--seconds 20] [--rounds 2]
        [--infinity-python PY [--infinity-variant onnx-int8 onnx-fp32 torch]]
        [--naive-python PY] [--angle-variant NAME=ARGS]

Systems, each a server process on 127.0.0.1 started (all at once; an idle one takes no
CPU) and stopped by this script:
- angle-rt: `python -m angle_rt.cli serve BUNDLE` with its defaults (the default CPU
  artifact, access log on); `--angle-variant 'w2=--workers 2 --threads 1'` adds others.
- infinity: `infinity_emb v2` from its own environment (`--infinity-python`) on CPU, per
  `--infinity-variant`: its ONNX Runtime ("optimum") engine as it runs by default on CPU
  (it prefers a quantized file), the same on the fp32 ONNX, and its torch engine. The
  optimum engine needs a transformers-layout ONNX in MODEL_DIR; prepare it once, in that
  environment:
      optimum-cli export onnx --model MODEL_DIR --task feature-extraction \
          --library-name transformers /tmp/x && cp /tmp/x/model.onnx MODEL_DIR/
      python -c "from onnxruntime.quantization import quantize_dynamic as q, QuantType as T; \
          q('MODEL_DIR/model.onnx', 'MODEL_DIR/model_quantized.onnx', weight_type=T.QInt8)"
- naive: FastAPI + sentence-transformers, one `model.encode` per request (the setup most
  users start from), from an environment with fastapi, uvicorn, sentence-transformers.
- offline: `Encoder.encode` over the whole list (batch 32) in a subprocess: the ceiling.

Load: `c` clients, each one keep-alive HTTP/1.1 connection sending OpenAI requests with one
real STS-B test sentence (`encoding_format` base64 where the server takes it) and waiting
for each answer; a 3 s warm-up, then `--seconds` measured (before the rounds, each server
gets `--prewarm-seconds` of 8-client load: torch runs slowly until it has seen many
shapes). Each (round, c) block measures the offline ceiling (median of 3 passes), then every
system in turn (the order rotates), then the ceiling again, and divides by the mean of the
two, so the ratios of a block share its machine noise; the summary gives
per-block ratios and their median. Reported per
system and `c`: sent/s, p50/p99 latency, errors, server RSS (process tree). Writes
benchmarks/results/serve-minilm-<date>.json. Bounded: servers bind 127.0.0.1 only, every
setting stops at its deadline, and every server is stopped here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import SIMD_FLAGS, cpu_name  # noqa: E402

HOST = "127.0.0.1"
WARMUP_S = 3.0
INFINITY_VARIANTS = {"onnx-int8": ["--engine", "optimum"],
                     "onnx-fp32": ["--engine", "optimum", "--onnx-do-not-prefer-quantized"],
                     "torch": ["--engine", "torch"]}

NAIVE_SERVER = r'''
import sys
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer

model = SentenceTransformer(sys.argv[1], device="cpu")
app = FastAPI()


class Req(BaseModel):
    input: str | list[str]
    model: str | None = None
    encoding_format: str | None = None


@app.get("/health")
def health():
    return {"status": "ok"}


@app.post("/v1/embeddings")
def embeddings(req: Req):
    texts = [req.input] if isinstance(req.input, str) else req.input
    vecs = model.encode(texts, normalize_embeddings=True)
    return {"object": "list", "model": "naive",
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()}
                     for i, v in enumerate(vecs)],
            "usage": {"prompt_tokens": 0, "total_tokens": 0}}


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
'''

OFFLINE = r'''
import json, sys, time
from angle_rt import Encoder
texts = json.load(open(sys.argv[2]))
enc = Encoder(sys.argv[1])
enc.encode(texts[:256])
rates = []
for _ in range(3):  # one pass is ~2 s: the median of three is steadier
    start = time.perf_counter()
    enc.encode(texts, batch_size=32)
    rates.append(len(texts) / (time.perf_counter() - start))
print(json.dumps({"sent_per_s": sorted(rates)[1], "passes": rates,
                  "artifact": enc.artifact.file, "backend": enc.session.name}))
'''


# -- the load generator ------------------------------------------------------------------------

async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    # the head in one read: a readline a header line cost this client, which shares the
    # cores with the servers, 16 µs a response with 13 headers (now 4)
    status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
    status = int(status_line.split()[1])
    length, chunked = None, False
    for line in lines:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length or 0)
    body = bytearray()
    while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
        body += await reader.readexactly(size)
        await reader.readline()
    await reader.readline()
    return status, bytes(body)


async def _client(port: int, requests: list[bytes], offset: int, warm_until: float,
                  stop_at: float, latencies: list[float], stats: dict) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    i = offset
    try:
        while (start := time.perf_counter()) < stop_at:
            writer.write(requests[i % len(requests)])
            i += 1
            status, body = await _read_response(reader)
            end = time.perf_counter()
            if status != 200:
                stats["errors"] += 1
                stats.setdefault("last_error", body[:300].decode("utf-8", "replace"))
            elif start >= warm_until and end <= stop_at:
                latencies.append(end - start)
                if stats.get("sample") is None:
                    stats["sample"] = body
    finally:
        writer.close()


def load(port: int | list[int], path: str, bodies: list[bytes], clients: int,
         seconds: float) -> dict:
    """`clients` closed-loop clients for WARMUP_S + `seconds`; stats of the measured part.
    With several ports, client c talks to ports[c % len(ports)]."""
    ports = [port] if isinstance(port, int) else port
    head = (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{ports[0]}\r\nContent-Type: application/json"
            "\r\nAuthorization: Bearer -\r\nContent-Length: {n}\r\n\r\n")
    requests = [head.replace("{n}", str(len(b))).encode() + b for b in bodies]
    latencies: list[float] = []
    stats: dict = {"errors": 0}

    async def main() -> None:
        now = time.perf_counter()
        warm_until, stop_at = now + WARMUP_S, now + WARMUP_S + seconds
        step = max(1, len(requests) // clients)
        await asyncio.gather(*(_client(ports[c % len(ports)], requests, c * step, warm_until,
                                       stop_at, latencies, stats) for c in range(clients)))

    _run_loop(main())
    lat = np.array(latencies) * 1e3
    sample = stats.pop("sample", None)
    return {"sent_per_s": len(lat) / seconds, "requests": len(lat),
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "dim": _dim(sample), **stats}


def _run_loop(coro) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def _dim(body: bytes | None) -> int | None:
    """Embedding width in a sample answer (float list or base64 float32)."""
    if not body:
        return None
    emb = json.loads(body)["data"][0]["embedding"]
    return len(emb) if isinstance(emb, list) else len(emb) * 3 // 4 // 4


# -- servers -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def server(cmd: list[str], log: Path, port: int | None, ready_path: str,
           env: dict[str, str] | None = None, cwd: Path = ROOT,
           timeout: float = 300) -> Iterator[tuple[int, int]]:
    """Start `cmd`, wait until GET ready_path answers 200; yield (pid, port); stop it."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while port is None:
            m = re.search(r'"url":\s*"http://127\.0\.0\.1:(\d+)"', log.read_text())
            port = int(m.group(1)) if m else None
            _check_alive(proc, log, deadline)
            time.sleep(0.1)
        while not _ok(port, ready_path):
            _check_alive(proc, log, deadline)
            time.sleep(0.25)
        yield proc.pid, port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _check_alive(proc: subprocess.Popen, log: Path, deadline: float) -> None:
    if proc.poll() is not None or time.monotonic() > deadline:
        raise RuntimeError(f"server {'exited' if proc.poll() is not None else 'timed out'}:\n"
                           + log.read_text()[-3000:])


def _ok(port: int, path: str) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
                      .encode())
            return s.recv(64).split()[1:2] == [b"200"]
    except OSError:
        return False


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, AttributeError):
            continue
    return total / 1024


# -- the run -------------------------------------------------------------------------------

def systems(args: argparse.Namespace, tmp: Path) -> dict[str, dict]:
    out = {"angle-rt": {"cmd": [sys.executable, "-m", "angle_rt.cli", "serve", str(args.bundle),
                                "--served-model-name", "m", "--port", "0"],
                        "port": None, "ready": "/ready", "path": "/v1/embeddings",
                        "fmt": "base64"}}
    for variant in args.angle_variant:
        suffix, _, extra = variant.partition("=")
        out[f"angle-rt-{suffix}"] = {**out["angle-rt"],
                                     "cmd": [*out["angle-rt"]["cmd"], *extra.split()]}
    for engine in args.infinity_variant if args.infinity_python else ():
        port = free_port()
        # run from the model directory as `.`: infinity 0.0.78 hands optimum 2.x the ONNX
        # file's path as listed, and optimum matches it against bare file names
        out[f"infinity-{engine}"] = {
            "cmd": [args.infinity_python, "-m", "infinity_emb.cli", "v2", "--model-id", ".",
                    "--served-model-name", "m", "--port", str(port), "--host", HOST,
                    "--device", "cpu", *INFINITY_VARIANTS[engine], *args.infinity_arg],
            "cwd": args.model_dir, "port": port, "ready": "/health", "path": "/embeddings",
            "fmt": "base64", "env": {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
                                     "INFINITY_ANONYMOUS_USAGE_STATS": "0"}}
    if args.naive_python:
        script = tmp / "naive_server.py"
        script.write_text(NAIVE_SERVER)
        port = free_port()
        out["naive"] = {"cmd": [args.naive_python, str(script), str(args.model_dir), str(port)],
                        "port": port, "ready": "/health", "path": "/v1/embeddings",
                        "fmt": "float", "env": {"HF_HUB_OFFLINE": "1"}}
    return out


def run(args: argparse.Namespace) -> dict:
    """All servers up at once (idle ones take no CPU); each (round, clients) block measures
    the offline ceiling, then every system in turn (the order rotates), then the ceiling
    again, so the ratios of one block share its machine noise."""
    texts = sentences(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    (tmp / "texts.json").write_text(json.dumps(texts))
    specs = systems(args, tmp)
    rows, offline = [], []
    with ExitStack() as stack:
        up = {}
        for name, spec in specs.items():
            up[name] = stack.enter_context(server(
                spec["cmd"], tmp / f"{name}.log", spec["port"], spec["ready"],
                spec.get("env"), spec.get("cwd", ROOT)))
            print(f"{name} up (pid {up[name][0]})", flush=True)
        for name, (_, port) in up.items():  # shapes, caches, thread pools: steady state
            load(port, specs[name]["path"], _bodies(texts, specs[name]["fmt"]), 8,
                 args.prewarm_seconds)
        for rnd in range(args.rounds):
            for k, c in enumerate(args.concurrency):
                names = list(specs)
                shift = (rnd + k) % len(names)
                off = _offline(args.bundle, tmp / "texts.json")
                print(f"round {rnd + 1} c={c}: offline {off['sent_per_s']:.0f} sent/s",
                      flush=True)
                for name in names[shift:] + names[:shift]:
                    pid, port = up[name]
                    res = load(port, specs[name]["path"], _bodies(texts, specs[name]["fmt"]), c,
                               args.seconds)
                    res.update(system=name, clients=c, round=rnd + 1, rss_mb=tree_rss_mb(pid))
                    rows.append(res)
                    print(f"  {name:16s} {res['sent_per_s']:7.1f} sent/s  p50 "
                          f"{res['p50_ms'] or 0:7.1f} ms  p99 {res['p99_ms'] or 0:7.1f} ms  "
                          f"err {res['errors']}  rss {res['rss_mb']:.0f} MB", flush=True)
                offline.append(_ceiling(off, _offline(args.bundle, tmp / "texts.json"),
                                        rnd + 1, c))
                print(f"  offline after {offline[-1]['after']:.0f} sent/s; block ceiling "
                      f"{offline[-1]['sent_per_s']:.0f}", flush=True)
    return {"rows": rows, "offline": offline, "summary": summarize(rows, offline)}


def _ceiling(before: dict, after: dict, rnd: int, clients: int) -> dict:
    """A block's ceiling: the mean of the offline rates measured before and after its
    systems ran (this VM drifted 1,101–1,509 sent/s within one run; one side alone moved the ratio
    more than the server did)."""
    return {**before, "sent_per_s": (before["sent_per_s"] + after["sent_per_s"]) / 2,
            "before": before["sent_per_s"], "after": after["sent_per_s"], "round": rnd,
            "clients": clients}


def _bodies(texts: list[str], fmt: str) -> list[bytes]:
    return [json.dumps({"input": [t], "model": "m", "encoding_format": fmt}).encode()
            for t in texts]


def _offline(bundle: Path, texts: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", OFFLINE, str(bundle), str(texts)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(rows: list[dict], offline: list[dict]) -> dict:
    """Medians per system and clients; target ratios per block (same round and clients),
    then their median."""
    med = {}
    for key in sorted({(r["system"], r["clients"]) for r in rows}):
        sel = [r for r in rows if (r["system"], r["clients"]) == key]
        med[f"{key[0]}@{key[1]}"] = {
            k: statistics.median(r[k] for r in sel) if all(r[k] is not None for r in sel)
            else None for k in ("sent_per_s", "p50_ms", "p99_ms", "rss_mb")}
    ceiling = {(o["round"], o["clients"]): o["sent_per_s"] for o in offline}
    speed = {(r["system"], r["round"], r["clients"]): r["sent_per_s"] for r in rows}

    def block_ratios(c: int, other: str | None) -> list[float]:
        out = []
        for (rnd, clients), top in ceiling.items():
            if clients != c or ("angle-rt", rnd, c) not in speed:
                continue
            bottom = top if other is None else speed.get((other, rnd, c))
            if bottom:
                out.append(speed[("angle-rt", rnd, c)] / bottom)
        return out

    def ratio(c: int, other: str | None) -> dict | None:
        values = block_ratios(c, other)
        return {"median": statistics.median(values), "per_round": values} if values else None

    anchors = sorted({r["system"] for r in rows} - {"angle-rt"})
    a8 = med.get("angle-rt@8", {})
    targets = {"served_over_offline_at_32 (≥ 0.7)": ratio(32, None),
               **{f"over_{a}_at_32 (≥ {3 if a == 'naive' else 2})": ratio(32, a)
                  for a in anchors},
               "p99_over_p50_at_8 (≤ 3)": (a8["p99_ms"] / a8["p50_ms"]) if a8.get("p50_ms")
               else None}
    by_clients = {c: ratio(c, None) for c in sorted({o["clients"] for o in offline})}
    return {"median": med, "offline_sent_per_s": statistics.median(ceiling.values()),
            "served_over_offline_by_clients": by_clients, "targets": targets}


def sentences(path: Path) -> list[str]:
    texts = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        texts += [row.get("sentence1") or row["text1"], row.get("sentence2") or row["text2"]]
    return list(dict.fromkeys(texts))


def publish(script: str, out: Path | None, result: dict) -> None:
    """Print `result` with its date, machine and command line; write it to `out` too."""
    text = json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "machine": machine(),
                       "command": " ".join([f"benchmarks/{script}", *sys.argv[1:]]),
                       **result}, indent=1)
    print(text)
    if out:
        out.write_text(text)
        print(f"wrote {out}")


def machine() -> dict:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    simd = [f for f in SIMD_FLAGS if f in flags]
    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "simd_flags": simd,
            "python": sys.version.split()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="angle_rt bundle to serve")
    p.add_argument("--model-dir", type=Path, required=True,
                   help="the same model as a sentence-transformers directory (anchors)")
    p.add_argument("--data", type=Path, default=Path(os.environ.get(
        "ANGLE_RT_DATA", ROOT.parent / "shared" / "data")) / "sts" / "stsb-test.jsonl")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per setting")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prewarm-seconds", type=float, default=10.0,
                   help="8-client load on each server before the rounds (not measured)")
    p.add_argument("--infinity-python", help="python of an env with infinity-emb[server]")
    p.add_argument("--infinity-variant", nargs="+", choices=INFINITY_VARIANTS,
                   default=list(INFINITY_VARIANTS),
                   help="onnx-int8: its ONNX Runtime engine as it runs on CPU by default "
                        "(prefers the quantized file); onnx-fp32: the same on model.onnx; "
                        "torch: its PyTorch engine")
    p.add_argument("--angle-variant", action="append", default=[], metavar="NAME=ARGS",
                   help="also serve angle-rt with extra arguments as angle-rt-NAME, e.g. "
                        "'w2=--workers 2 --threads 1' (repeatable)")
    p.add_argument("--infinity-arg", action="append", default=[],
                   help="extra infinity_emb v2 argument (repeatable)")
    p.add_argument("--naive-python", help="python of an env with fastapi, uvicorn and "
                                          "sentence-transformers")
    p.add_argument("--out", type=Path, help="result JSON (default: benchmarks/results/"
                                            "serve-minilm-<date>.json)")
    args = p.parse_args()
    started = datetime.now(timezone.utc)
    result = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "command": " ".join(sys.argv), "seconds": args.seconds,
              "warmup_s": WARMUP_S, "rounds": args.rounds, **run(args)}
    out = args.out or ROOT / "benchmarks" / "results" / \
        f"serve-minilm-{started.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
