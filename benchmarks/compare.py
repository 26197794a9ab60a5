"""One run, the same sentences: angle_rt (each precision) against every anchor that loads.

    python benchmarks/compare.py [--model minilm|mpnet] [--threads 2] [--repeats 3]
        [--batch-size 32] [--anchor-python PY ...] [--latency-n 200] [--no-plot]

Systems: angle_rt per artifact of a bundle with fp32/fp16/int8/int8-dynamic (exported into
build/bench on first use); PyTorch eager (angle_torch.model); sentence-transformers' torch
backend in fp32 and bf16; and, through anchor_worker.py in other environments
(--anchor-python, repeatable), sentence-transformers ONNX / ONNX int8, fastembed and
angle_emb. After a warm-up, `--repeats` passes over all sentences run interleaved (system
by system within each repetition); the median pass counts. Then single-sentence calls give
p50/p99 latency. Reported per system: sent/s, tokens/s, latency, RSS added by loading,
peak RSS growth during a pass, min cosine against sentence-transformers fp32, STS-B test
Spearman, and ratios to the fastest anchor. Writes JSON (and a PNG chart when matplotlib
is installed) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from angle_rt import Encoder
from angle_torch.sts import find_shared_data, load_sts, sts_spearman
from benchmarks.harness import Runner, cpu_name, loaded, summary
from benchmarks.models import MODELS
from exporters import export
from exporters.texts import benchmark_sentences
from exporters.verify import compare

REFERENCE = "sentence-transformers torch fp32"
BARE_INT8 = "ONNX Runtime quantize_dynamic, all linear (per-batch scales)"
# the same graph run as angle_rt runs its own: batches side by side, one thread each
BARE_INT8_STREAMS = BARE_INT8 + ", batches side by side"
BARES = (BARE_INT8, BARE_INT8_STREAMS)
EQUAL_QUALITY = 0.3  # an anchor within this STS-B test Spearman×100 of ST fp32 counts


def bundle_for(model: str) -> Path:
    bundle = Path("build/bench") / f"{model}-all"
    if not (bundle / "angle_rt.json").is_file():
        export(MODELS[model](), bundle, force=True, progress=True, fp16=True, int8=True,
               int8_dynamic=True)
    return bundle


def local_runners(model_dir: Path, bundle: Path, threads: int, batch: int) -> list[Runner]:
    import torch
    from sentence_transformers import SentenceTransformer

    from angle_torch.model import AngleModel

    torch.set_num_threads(threads)
    manifest = Encoder(bundle).manifest
    runners = []
    for art in manifest.artifacts:
        runners.append(loaded(f"angle_rt {art.precision}", lambda a=art: _angle_rt(
            bundle, a.precision, threads, batch)))
    default = Encoder(bundle).artifact.precision
    runners.append(loaded(f"angle_rt {default}, one batch at a time", lambda: _angle_rt(
        bundle, default, threads, batch, streams=1)))
    runners.append(loaded(BARE_INT8, lambda: _bare_ort_int8(bundle, threads, batch)))
    runners.append(loaded(BARE_INT8_STREAMS, lambda: _bare_ort_int8(bundle, threads, batch,
                                                                     streams=threads)))
    norm = manifest.normalized
    runners.append(loaded("torch eager (angle_torch.model)", lambda: _torch_eager(
        AngleModel.from_pretrained(model_dir), batch, norm)))
    runners.append(loaded(REFERENCE, lambda: _st(
        SentenceTransformer(str(model_dir), device="cpu"), batch)))
    runners.append(loaded("sentence-transformers torch bf16", lambda: _st(
        SentenceTransformer(str(model_dir), device="cpu").to(torch.bfloat16), batch)))
    return runners


def _angle_rt(bundle: Path, precision: str, threads: int, batch: int, streams: int = 0):
    """The Encoder's CPU default for a budget of `threads`: that many batches side by side
    on one thread each; `streams=1`: one batch at a time on every thread."""
    streams = streams or threads
    enc = Encoder(bundle, precision=precision, streams=streams,
                  intra_op_threads=max(1, threads // streams))
    return lambda t: enc.encode(t, batch_size=batch)


def _bare_ort_int8(bundle: Path, threads: int, batch: int, streams: int = 1):
    """ONNX Runtime's quantize_dynamic on every linear layer of the bundle's fp32 graph (one
    activation scale per tensor: per batch), run through the same Encoder pipeline: as ONNX
    Runtime runs by default (one batch on `threads` threads) or, with `streams`, as angle_rt
    runs its own artifacts."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from angle_rt.session.onnxrt import OrtSession

    path = Path("build/bench") / f"{bundle.name}-ort-dynamic.onnx"
    if not path.is_file():
        logging.getLogger().setLevel(logging.ERROR)
        quantize_dynamic(str(bundle / "model.onnx"), str(path), op_types_to_quantize=["MatMul"],
                         per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True})
    enc = Encoder(bundle, precision="fp32", verify_checksums=False, streams=streams,
                  backend=lambda _p: OrtSession(path, "cpu", max(1, threads // streams)))
    return lambda t: enc.encode(t, batch_size=batch)


def _torch_eager(model, batch: int, normalize: bool):
    def fn(t):
        out = model.encode([t] if isinstance(t, str) else t, batch_size=batch,
                           normalize=normalize)
        return out[0] if isinstance(t, str) else out
    return fn


def _st(model, batch: int):
    # bf16 tensors have no numpy dtype: convert through float32
    return lambda t: model.encode(t, batch_size=batch, convert_to_tensor=True).float().numpy()


class RemoteRunner(Runner):
    """A system living in an anchor_worker.py process; same interface as Runner."""

    def __init__(self, worker: Worker, name: str, load_mb: float) -> None:
        super().__init__(name, None, load_mb)
        self.worker = worker

    def warm(self, texts: list[str]) -> None:
        self.worker.ask("warm", self.name)

    def timed_pass(self, texts: list[str]) -> float:
        r = self.worker.ask("pass", self.name)
        self.seconds.append(r["seconds"])
        if r["peak_growth_mb"] is not None:
            self.peak_growth_mb.append(r["peak_growth_mb"])
        return r["seconds"]

    def latencies_ms(self, texts: list[str]) -> list[float]:
        return self.worker.ask("latency", self.name, texts=str(self.worker.latency_file))["ms"]

    def fetch(self) -> None:
        file = self.worker.workdir / f"{len(self.worker.saved)}.npy"
        self.worker.ask("save", self.name, file=str(file))
        self.worker.saved.append(file)
        self.last = np.load(file)


class Worker:
    """One anchor_worker.py process (another Python environment)."""

    def __init__(self, python: str, cfg: dict, workdir: Path, latency_file: Path) -> None:
        self.workdir, self.latency_file, self.saved = workdir, latency_file, []
        script = Path(__file__).parent / "anchor_worker.py"
        self.proc = subprocess.Popen([python, str(script), json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._read()
        self.ready, self.skipped = hello["ready"], hello["skipped"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"anchor worker exited with {self.proc.wait()}; see its stderr")
        return json.loads(line)

    def ask(self, cmd: str, name: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, "name": name, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def remote_runners(args, model_dir: Path, bundle: Path, texts: list[str], lat: list[str],
                   tmp: Path, have: set[str]) -> tuple[list[Runner], list[Worker], dict]:
    manifest = Encoder(bundle).manifest
    (tmp / "sentences.json").write_text(json.dumps(texts))
    (tmp / "latency.json").write_text(json.dumps(lat))
    runners, workers, skipped, kinds = [], [], {}, set()
    for i, python in enumerate(args.anchor_python):
        workdir = tmp / f"worker{i}"
        workdir.mkdir()
        cfg = {"model_dir": str(model_dir), "sentences": str(tmp / "sentences.json"),
               "workdir": str(workdir), "threads": args.threads, "batch_size": args.batch_size,
               "pooling": manifest.pooling, "normalize": manifest.normalized,
               "max_length": manifest.max_length, "dim": manifest.embedding_dim,
               "skip": sorted(have)}
        w = Worker(python, cfg, workdir, tmp / "latency.json")
        workers.append(w)
        skipped.update({kind: f"{why} ({python})" for kind, why in w.skipped.items()})
        for name, info in w.ready.items():
            runners.append(RemoteRunner(w, name, info["load_mb"]))
            kinds.add(info["kind"])
            have.add(name)
    # a kind that loaded in some environment is not "skipped" because another lacks it
    return runners, workers, {k: v for k, v in skipped.items() if k not in kinds}


def keep(runners: list, pattern: str | None, default: str) -> list:
    """The runners --systems selects (all without it), the reference and default always."""
    if pattern is None:
        return runners
    wanted = re.compile(pattern)
    return [r for r in runners if r.name in (REFERENCE, default) or wanted.search(r.name)]


def measure(runners: list[Runner], texts: list[str], lat: list[str], repeats: int) -> None:
    for r in runners:
        r.warm(texts[:128])
    for _ in range(repeats):  # interleaved: each repetition visits every system
        for r in runners:
            r.timed_pass(texts)
    for r in runners:
        r.latency = summary(r.latencies_ms(lat))
        if isinstance(r, RemoteRunner):
            r.fetch()


def report(runners: list[Runner], texts: list[str], n_tokens: int, pairs,
           default: str) -> dict:
    rows = {}
    ref = next(r for r in runners if r.name == REFERENCE).last
    for r in runners:
        med = statistics.median(r.seconds)
        rows[r.name] = {"sent_per_s": len(texts) / med, "tokens_per_s": n_tokens / med,
                        "seconds": r.seconds, **r.latency, "load_rss_mb": r.load_mb,
                        "peak_rss_growth_mb": max(r.peak_growth_mb, default=None),
                        "min_cos_vs_st": compare(ref, r.last, 0.0).min_cosine}
        if pairs is not None:
            n = len(pairs.text1)
            rows[r.name]["stsb_test_spearman"] = sts_spearman(r.last[:n], r.last[n:],
                                                              pairs.scores)
    anchors = {k: v for k, v in rows.items() if not k.startswith("angle_rt") and k not in BARES}
    best = max(anchors, key=lambda k: anchors[k]["sent_per_s"])
    for row in rows.values():
        row["x_vs_best_anchor"] = row["sent_per_s"] / anchors[best]["sent_per_s"]
        row["p50_vs_st_torch"] = row["p50_ms"] / rows[REFERENCE]["p50_ms"]
    return {"best_anchor": best, "results": rows, "targets": targets(rows, best, default)}


def targets(rows: dict, best: str, default: str) -> dict:
    """Issue 6's and 23's targets, each with the figures it was judged on. `default`: the
    artifact `Encoder(bundle)` picks on this CPU."""
    ours = {k: v for k, v in rows.items() if k.startswith("angle_rt")}
    fp32 = ours.get("angle_rt fp32", {})
    floor = fp32.get("stsb_test_spearman", float("nan")) - 0.3
    ok = {k: v for k, v in ours.items() if not v.get("stsb_test_spearman", 0) < floor}
    fastest = max(ok, key=lambda k: ok[k]["sent_per_s"])
    out = {"fastest_vs_best_anchor": {"system": fastest, "anchor": best,
                                      "ratio": ok[fastest]["x_vs_best_anchor"], "goal": 2.0}}
    st = rows[REFERENCE].get("stsb_test_spearman", float("nan"))
    equal = {k: v for k, v in rows.items() if not k.startswith("angle_rt")
             and k not in BARES and not v.get("stsb_test_spearman", st) < st - EQUAL_QUALITY}
    anchor = max(equal, key=lambda k: equal[k]["sent_per_s"])
    mine = rows[f"angle_rt {default}"]
    out["default_vs_best_equal_quality_anchor"] = {
        "system": f"angle_rt {default}", "anchor": anchor, "goal": 2.0,
        "ratio": mine["sent_per_s"] / equal[anchor]["sent_per_s"],
        "stsb_below_st_fp32": st - mine.get("stsb_test_spearman", float("nan"))}
    for key, bare in (("default_vs_bare_ort_int8", BARE_INT8),
                      ("default_vs_bare_ort_int8_side_by_side", BARE_INT8_STREAMS)):
        if bare in rows:
            out[key] = {"system": f"angle_rt {default}", "goal": 1.0,
                        "ratio": mine["sent_per_s"] / rows[bare]["sent_per_s"]}
    st_onnx = rows.get("sentence-transformers ONNX fp32")
    if st_onnx and fp32:
        out["fp32_vs_st_onnx_fp32"] = {"ratio": fp32["sent_per_s"] / st_onnx["sent_per_s"],
                                       "goal": 1.3}
    best_p50 = min(ours, key=lambda k: ours[k]["p50_ms"])
    out["p50_vs_st_torch"] = {"system": best_p50, "ratio": ours[best_p50]["p50_vs_st_torch"],
                              "goal_at_most": 0.5}
    return out


def plot(res: dict, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = sorted(res["results"].items(), key=lambda kv: kv[1]["sent_per_s"])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    colors = ["tab:blue" if k.startswith("angle_rt") else "tab:gray" for k, _ in rows]
    ax.barh([k for k, _ in rows], [v["sent_per_s"] for _, v in rows], color=colors)
    for i, (_, v) in enumerate(rows):
        ax.text(v["sent_per_s"], i, f" {v['sent_per_s']:.0f}"
                + (f" · {v['stsb_test_spearman']:.2f}" if "stsb_test_spearman" in v else ""),
                va="center", fontsize=8)
    ax.set_xlabel("sentences / s (label: STS-B test Spearman)")
    ax.set_title(f"{res['model']}, {res['n']} {res['texts']} sentences, {res['threads']} "
                 f"threads, batch {res['batch_size']}\n{res['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return True


def run(args: argparse.Namespace) -> dict:
    model_dir, bundle = MODELS[args.model](), bundle_for(args.model)
    texts, source = benchmark_sentences()
    lat = texts[:: max(1, len(texts) // args.latency_n)][: args.latency_n]
    runners = keep(local_runners(model_dir, bundle, args.threads, args.batch_size),
                   args.systems, f"angle_rt {Encoder(bundle).artifact.precision}")
    with tempfile.TemporaryDirectory(dir="build") as tmp:
        remote, workers, skipped = remote_runners(args, model_dir, bundle, texts, lat,
                                                  Path(tmp), {r.name for r in runners})
        remote = keep(remote, args.systems, "")
        try:
            measure(runners + remote, texts, lat, args.repeats)
        finally:
            for w in workers:
                w.close()
    n_tokens = sum(len(r) for r in Encoder(bundle).tokenizer.encode(texts))
    pairs = load_sts(find_shared_data() / "sts" / "stsb-test.jsonl") \
        if source != "built-in" else None
    return {"model": args.model, "texts": source, "n": len(texts), "tokens": n_tokens,
            "threads": args.threads, "batch_size": args.batch_size, "repeats": args.repeats,
            "latency_calls": len(lat), "machine": cpu_name(), "skipped_anchors": skipped,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "default_artifact": Encoder(bundle).artifact.precision,
            **report(runners + remote, texts, n_tokens, pairs, Encoder(bundle).artifact.precision)}


def show(res: dict) -> None:
    print(f"{res['model']}: {res['n']} {res['texts']} sentences ({res['tokens']} tokens), "
          f"{res['threads']} threads, batch {res['batch_size']}, median of {res['repeats']}; "
          f"{res['machine']}")
    print(f"{'system':42} {'sent/s':>7} {'tok/s':>7} {'x best':>6} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'load MB':>7} {'peak+MB':>7} {'min cos':>8} {'STS-B':>6}")
    for name, r in sorted(res["results"].items(), key=lambda kv: -kv[1]["sent_per_s"]):
        print(f"{name:42} {r['sent_per_s']:7.0f} {r['tokens_per_s']:7.0f} "
              f"{r['x_vs_best_anchor']:6.2f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} "
              f"{r['load_rss_mb']:7.0f} {r['peak_rss_growth_mb'] or float('nan'):7.0f} "
              f"{r['min_cos_vs_st']:8.5f} {r.get('stsb_test_spearman', float('nan')):6.2f}")
    for why, text in res["skipped_anchors"].items():
        print(f"skipped {why}: {text}")
    for name, t in res["targets"].items():
        goal = t.get("goal", t.get("goal_at_most"))
        met = t["ratio"] >= goal if "goal" in t else t["ratio"] <= goal
        print(f"target {name}: {t['ratio']:.2f} (goal {'≥' if 'goal' in t else '≤'} {goal}) "
              f"{'met' if met else 'NOT met'}  {t.get('system', '')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="minilm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--latency-n", type=int, default=200, help="single-sentence calls each")
    p.add_argument("--anchor-python", action="append", default=[],
                   help="python of another environment for anchor_worker.py (repeatable)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--systems", metavar="REGEX",
                   help="run only the systems whose name matches (sentence-transformers "
                        "torch fp32, the reference, and the default artifact always run): "
                        "more repeats of a few, e.g. 'bf16|quantize_dynamic'")
    args = p.parse_args()
    res = run(args)
    show(res)
    res["systems"] = args.systems
    part = "-some" if args.systems else ""
    stem = Path(__file__).parent / "results" / f"compare-{args.model}{part}-{res['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {stem.with_suffix('.json')}")
    if not args.no_plot and plot(res, stem.with_suffix(".png")):
        print(f"wrote {stem.with_suffix('.png')}")


if __name__ == "__main__":
    main()
