"""`angle-rt embed` against `Encoder.encode` on the same sentences, `--ray` against the local
command, and peak memory over a long run.

    python benchmarks/embed_files.py --bundle /tmp/embed-bench-minilm [--n 100000] [--rounds 2]
    python benchmarks/embed_files.py --bundle BUNDLE --memory [--n 1000000] [--dtypes ...]
    python benchmarks/embed_files.py --bundle BUNDLE --s3 [--n 100000]

Corpus: the STS-B, SICK-R and NLI sentences of ../shared/data (or $ANGLE_RT_DATA), deduped and
repeated to --n rows with row ids, as one Parquet file (10,000-row groups). Throughput mode
runs each setting in its own process, interleaved round by round (other work on the machine
then weighs on every setting alike):

- encode: read the texts into a list, then time `Encoder(bundle).encode(texts)` only;
- embed:  `python -m angle_rt.embed BUNDLE corpus.parquet out.parquet`, wall time (process
  start, model load, reading, writing, resume bookkeeping, the final Parquet join);
- ray:    the same with `--ray --ray-cpus 2 --ray-actors 2` (2 single-thread actors on a local
  Ray), wall time including Ray's start;
- same_process (opt-in: --settings ...,same_process): one process, one Encoder, timing
  `encode(list)` then `embed_file` twice: the job's own overhead without the process-to-process
  variance of separate runs.

Peak RSS: VmHWM of the process (exact, rusage) and the sampled sum over its process tree
(Ray's raylet, GCS and actors included; shared pages count once per process). Memory mode
runs `embed` once over --n rows per output dtype (float32, int8, binary), samples RSS against
rows done (from the job's state file) and reports the Parquet output's bytes a row against
the .npy of the same vectors. S3 mode runs the job local → local and s3:// → s3:// against
moto's server on 127.0.0.1. Writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.harness import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = {"sts/stsb-train.jsonl": ("sentence1", "sentence2"),
           "sts/stsb-dev.jsonl": ("sentence1", "sentence2"),
           "sts/stsb-test.jsonl": ("sentence1", "sentence2"),
           "sts/sick-r-train.jsonl": ("sentence1", "sentence2"),
           "nli/pairs.jsonl": ("text1", "text2"),
           "nli/triples.jsonl": ("text", "positive", "negative")}


def sentence_pool(data: Path) -> list[str]:
    """Unique non-empty sentences of the shared STS and NLI files, in file order."""
    seen: dict[str, None] = {}
    for name, fields in SOURCES.items():
        path = data / name
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            for f in fields:
                if isinstance(rec.get(f), str) and rec[f].strip():
                    seen.setdefault(rec[f], None)
    if not seen:
        raise SystemExit(f"no sentences under {data}: set ANGLE_RT_DATA")
    return list(seen)


def write_corpus(path: Path, n: int, pool: list[str]) -> None:
    """n rows (id, text): the pool repeated, streamed in 10,000-row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema) as out:
        for start in range(0, n, 10_000):
            ids = list(range(start, min(n, start + 10_000)))
            out.write_table(pa.table({"id": ids, "text": [pool[i % len(pool)] for i in ids]},
                                     schema=schema))


def run_measured(cmd: list[str], state: Path | None = None, every: float = 0.5,
                 env: dict[str, str] | None = None) -> dict[str, object]:
    """Run `cmd`; wall seconds, exact peak RSS of the process, sampled peak of its tree,
    and (with `state`) an RSS trace against the job's rows done."""
    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        ps, tree_peak, trace = psutil.Process(proc.pid), 0.0, []
        cpu: dict[int, float] = {}  # pid → last CPU seconds seen (children: the tree's)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            own = tree = 0.0
            try:
                procs = [ps, *ps.children(recursive=True)]
                own = ps.memory_info().rss / 2**20
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    tree += p.memory_info().rss / 2**20
                    t = p.cpu_times()
                    cpu[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
            tree_peak = max(tree_peak, tree)
            if state is not None:
                trace.append((round(time.perf_counter() - start, 1), _rows_done(state),
                              round(own, 1)))
            time.sleep(every)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    cpu[proc.pid] = usage.ru_utime + usage.ru_stime  # exact for the process itself
    return {"seconds": seconds, "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "tree_cpu_seconds": round(sum(cpu.values()), 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "tree_peak_rss_mb": round(tree_peak, 1), "stdout": stdout.strip(),
            "stderr_tail": stderr.strip().splitlines()[-1:], "trace": trace}


def _rows_done(state: Path) -> int | None:
    try:
        return json.loads(state.read_text())["rows_read"]
    except (OSError, ValueError, KeyError):
        return None


ENCODE = r"""
import json, sys, time
import pyarrow.parquet as pq
from angle_rt import Encoder
texts = pq.read_table(sys.argv[2], columns=["text"]).column("text").to_pylist()
enc = Encoder(sys.argv[1])
enc.encode(texts[:64])
t, c = time.perf_counter(), time.process_time()
vectors = enc.encode(texts)
print(json.dumps({"encode_seconds": time.perf_counter() - t, "rows": len(vectors),
                  "encode_cpu_seconds": time.process_time() - c,
                  "artifact": enc.artifact.file}))
"""


SAME_PROCESS = r"""
import json, os, sys, time
import pyarrow.parquet as pq
from angle_rt import Encoder
from angle_rt.embed import embed_file
bundle, corpus, out = sys.argv[1:4]
texts = pq.read_table(corpus, columns=["text"]).column("text").to_pylist()
enc = Encoder(bundle)
enc.encode(texts[:64])
got = {}
for name in ("encode", "embed_file", "encode", "embed_file")[: 2 * int(sys.argv[4])]:
    t, c = time.perf_counter(), time.process_time()
    if name == "encode":
        enc.encode(texts)
    else:
        embed_file(enc, corpus, out, overwrite=True)
        os.remove(out)
    got.setdefault(name, []).append([time.perf_counter() - t, time.process_time() - c])
print(json.dumps(got))
"""


def settings(bundle: str, corpus: Path, work: Path) -> dict[str, list[str]]:
    py, embed = sys.executable, [sys.executable, "-m", "angle_rt.embed", bundle, str(corpus)]
    quiet = ["--no-progress", "-q", "--overwrite"]
    return {
        "encode": [py, "-c", ENCODE, bundle, str(corpus)],
        # one process, one Encoder: encode(list) then embed_file, twice (no process noise)
        "same_process": [py, "-c", SAME_PROCESS, bundle, str(corpus),
                         str(work / "same.parquet"), "2"],
        "embed": [*embed, str(work / "out.parquet"), *quiet],
        "ray": [*embed, str(work / "out_ray"), *quiet, "--ray", "--ray-cpus", "2",
                "--ray-actors", "2", "--ray-cpus-per-actor", "1"],
    }


def throughput(args: argparse.Namespace, corpus: Path, work: Path) -> dict[str, object]:
    cmds = settings(args.bundle, corpus, work)
    names = [s for s in args.settings.split(",") if s]
    rounds: list[dict[str, dict]] = []
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]  # interleaved, alternating order
        got = {}
        for name in order:
            res = run_measured(cmds[name])
            res.pop("trace")
            if name == "same_process":
                inner = json.loads(res["stdout"])
                res["passes"] = inner
                enc_s = [x[0] for x in inner["encode"]]
                job_s = [x[0] for x in inner["embed_file"]]
                res["seconds"] = sum(enc_s) + sum(job_s)
                res["embed_file_overhead"] = round(sum(job_s) / sum(enc_s) - 1, 4)
                res["embed_file_cpu_overhead"] = round(
                    sum(x[1] for x in inner["embed_file"])
                    / sum(x[1] for x in inner["encode"]) - 1, 4)
                res["sent_per_s"] = round(2 * len(enc_s) * args.n / res["seconds"], 1)
                got[name] = res
                print(f"round {r + 1} same process: encode {enc_s}, embed_file {job_s} s: "
                      f"overhead {res['embed_file_overhead']}", file=sys.stderr, flush=True)
                continue
            if name == "encode":  # the encode call alone, not reading or loading
                inner = json.loads(res["stdout"])
                res["process_seconds"], res["process_cpu_seconds"] = (res["seconds"],
                                                                      res["cpu_seconds"])
                res["seconds"] = inner["encode_seconds"]
                res["cpu_seconds"] = res["tree_cpu_seconds"] = inner["encode_cpu_seconds"]
            res["sent_per_s"] = round(args.n / res["seconds"], 1)
            got[name] = res
            print(f"round {r + 1} {name}: {res['seconds']:.1f} s, {res['sent_per_s']} sent/s, "
                  f"CPU {res['tree_cpu_seconds']} s, peak RSS {res['peak_rss_mb']} MB "
                  f"(tree {res['tree_peak_rss_mb']} MB), load {os.getloadavg()[0]:.1f}",
                  file=sys.stderr, flush=True)
            for out in (work / "out.parquet", work / "out_ray"):
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(
                    missing_ok=True)
        rounds.append(got)
    ratios = []
    for got in rounds:
        entry = {}
        if "encode" in got and "embed" in got:  # wall time, and CPU time (less load-bound)
            entry["embed_overhead"] = round(got["embed"]["seconds"] / got["encode"]["seconds"]
                                            - 1, 4)
            entry["embed_cpu_overhead"] = round(got["embed"]["tree_cpu_seconds"]
                                                / got["encode"]["tree_cpu_seconds"] - 1, 4)
        if "same_process" in got:
            entry["same_process_overhead"] = got["same_process"]["embed_file_overhead"]
            entry["same_process_cpu_overhead"] = got["same_process"]["embed_file_cpu_overhead"]
        if "embed" in got and "ray" in got:  # throughput of --ray over the local command
            entry["ray_over_local"] = round(got["embed"]["seconds"] / got["ray"]["seconds"], 4)
            entry["ray_over_local_cpu"] = round(got["embed"]["tree_cpu_seconds"]
                                                / got["ray"]["tree_cpu_seconds"], 4)
        ratios.append(entry)
    median = {k: statistics.median(r[k] for r in ratios) for k in ratios[0]} if ratios else {}
    return {"rounds": rounds, "ratios": ratios, "median_ratios": median}


def memory(args: argparse.Namespace, corpus: Path, work: Path) -> dict[str, object]:
    """One run per output dtype: RSS against rows, and the output's bytes a row against
    the .npy of the same vectors."""
    return {"dtypes": {dtype: memory_run(args, corpus, work, dtype)
                       for dtype in args.dtypes.split(",")}}


def npy_bytes_per_row(out: Path) -> dict[str, float]:
    """What `--output vectors.npy` would take a row: the vectors (exact: width × itemsize)
    and the ids' JSON lines (measured on the ids written)."""
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(out).metadata[b"angle_rt.embed"])
    ids = pq.read_table(out, columns=["id"]).column("id").to_pylist()
    vec = meta["width"] * np.dtype(meta["dtype"]).itemsize
    id_bytes = sum(len(json.dumps(i)) + 1 for i in ids) / max(1, len(ids))
    return {"vectors": vec, "ids_jsonl": round(id_bytes, 2), "total": round(vec + id_bytes, 2)}


def memory_run(args: argparse.Namespace, corpus: Path, work: Path,
               dtype: str) -> dict[str, object]:
    out = work / "out.parquet"
    cmd = [sys.executable, "-m", "angle_rt.embed", args.bundle, str(corpus), str(out),
           "--no-progress", "-q", "--overwrite", "--chunk-size", str(args.chunk_size),
           "--output-dtype", dtype]
    res = run_measured(cmd, state=work / "out.parquet.partial" / "state.json", every=1.0)
    trace = [t for t in res.pop("trace") if t[1] is not None]
    after_first = [rss for _, rows, rss in trace if rows >= args.chunk_size]
    tenths = {}
    for _, rows, rss in trace:
        tenths.setdefault(min(10, rows * 10 // args.n), rss)
    res.update({
        "rss_after_first_chunk_mb": after_first[0] if after_first else None,
        "max_sampled_rss_after_first_chunk_mb": max(after_first) if after_first else None,
        "rss_at_each_tenth_mb": tenths,
        "sent_per_s": round(args.n / res["seconds"], 1),
        "output_mb": round(out.stat().st_size / 2**20, 1),
        "parquet_bytes_per_row": round(out.stat().st_size / args.n, 2),
        "npy_bytes_per_row": npy_bytes_per_row(out),
    })
    print(f"{dtype}: {res['sent_per_s']} sent/s, peak RSS {res['peak_rss_mb']} MB, "
          f"{res['parquet_bytes_per_row']} B/row (.npy {res['npy_bytes_per_row']['total']})",
          file=sys.stderr, flush=True)
    out.unlink(missing_ok=True)
    return res


def s3_round_trip(args: argparse.Namespace, corpus: Path, work: Path) -> dict[str, object]:
    """The same job local → local and S3 → S3 (moto's server mode on 127.0.0.1, in this
    process: an in-memory store, so this is the cost of the remote code path and the HTTP
    round trips, not of a real network), interleaved over --rounds."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
           "AWS_EC2_METADATA_DISABLED": "true"}
    fs = pafs.S3FileSystem(endpoint_override=f"http://{host}:{port}", access_key="bench",
                           secret_key="bench", allow_bucket_creation=True)
    fs.create_dir("bench")
    with fs.open_output_stream("bench/corpus.parquet") as fh:
        fh.write(corpus.read_bytes())
    base = [sys.executable, "-m", "angle_rt.embed", args.bundle]
    quiet = ["--no-progress", "-q", "--overwrite", "--chunk-size", str(args.chunk_size)]
    cmds = {"local": [*base, str(corpus), str(work / "out.parquet"), *quiet],
            "s3": [*base, "s3://bench/corpus.parquet", "s3://bench/out.parquet", *quiet]}
    rounds = []
    try:
        for r in range(args.rounds):
            got = {}
            for name in (cmds if r % 2 == 0 else list(cmds)[::-1]):
                # a finished job with the same settings is not redone: start from nothing
                (work / "out.parquet").unlink(missing_ok=True)
                if fs.get_file_info("bench/out.parquet").type != pafs.FileType.NotFound:
                    fs.delete_file("bench/out.parquet")
                res = run_measured(cmds[name], env=env)
                res.pop("trace")
                got[name] = res
                print(f"round {r + 1} {name}: {res['seconds']:.1f} s", file=sys.stderr,
                      flush=True)
            got["s3_over_local"] = round(got["s3"]["seconds"] / got["local"]["seconds"], 4)
            rounds.append(got)
    finally:
        server.stop()
    return {"rounds": rounds,
            "median_s3_over_local": statistics.median(r["s3_over_local"] for r in rounds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--n", type=int, default=None, help="rows (100,000; --memory: 1,000,000)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--settings", default="encode,embed,ray")
    p.add_argument("--memory", action="store_true", help="one long embed run per "
                   "--dtypes, RSS vs rows and bytes a row")
    p.add_argument("--dtypes", default="float32,int8,binary", help="--memory's dtypes")
    p.add_argument("--s3", action="store_true", help="local vs S3 (local moto server) runs")
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--data", default=os.environ.get("ANGLE_RT_DATA", "../shared/data"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.n = args.n or (1_000_000 if args.memory else 100_000)
    work = Path(args.work or tempfile.mkdtemp(prefix="embed-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    pool = sentence_pool(Path(args.data))
    corpus = work / f"corpus-{args.n}.parquet"
    if not corpus.exists():
        write_corpus(corpus, args.n, pool)
    manifest = json.loads((Path(args.bundle) / "angle_rt.json").read_text())
    result = {
        "n": args.n,
        "unique_sentences": len(pool), "bundle": args.bundle,
        "model": manifest["source"].get("model"), "machine": cpu_name(),
        "cpus": os.cpu_count(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg(),
    }
    what = memory if args.memory else s3_round_trip if args.s3 else throughput
    result["what"] = what.__name__
    result.update(what(args, corpus, work))
    result["load_average_at_end"] = os.getloadavg()
    name = Path(args.bundle).name
    out = Path(args.out or RESULTS / f"embed-{result['what']}-{name}-{args.n}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
