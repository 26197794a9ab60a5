"""angle_rt (each precision) vs PyTorch eager (training.model) vs sentence-transformers.

    python benchmarks/bench_encode.py [--model minilm|mpnet] [--threads 2] [--repeats 3]
                                      [--precisions]

Interleaved repetitions after a warm-up; the median pass per system is reported, with
ratios to sentence-transformers measured in the same run. Writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from angle_rt import Encoder
from benchmarks.models import MODELS
from exporters import export
from exporters.verify import builtin_sentences, compare
from training.sts import find_shared_data, load_sts, sts_spearman


def sentences() -> tuple[list[str], str]:
    data = find_shared_data()
    if data is None:
        return builtin_sentences(), "built-in"
    return load_sts(data / "sts" / "stsb-test.jsonl").sentences, "STS-B test"


def systems(model_dir: Path, bundle: Path, threads: int, batch: int,
            precisions: bool) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from training.model import AngleModel

    torch.set_num_threads(threads)
    manifest = Encoder(bundle).manifest
    fns = {}
    for art in manifest.artifacts if precisions else manifest.artifacts[:1]:
        enc = Encoder(bundle, precision=art.precision, intra_op_threads=threads)
        fns[f"angle_rt {art.precision}"] = (lambda e: lambda t: e.encode(t, batch_size=batch))(enc)
    ref = AngleModel.from_pretrained(model_dir)
    st = SentenceTransformer(str(model_dir), device="cpu")
    fns["torch eager (training.model)"] = lambda t: ref.encode(
        t, batch_size=batch, normalize=manifest.normalized)
    fns["sentence-transformers torch fp32"] = lambda t: st.encode(t, batch_size=batch)
    if precisions:
        st16 = SentenceTransformer(str(model_dir), device="cpu").to(torch.bfloat16)
        fns["sentence-transformers torch bf16"] = lambda t: st16.encode(
            t, batch_size=batch, convert_to_tensor=True).float().numpy()
    return fns


def run(args: argparse.Namespace) -> dict:
    model_dir = MODELS[args.model]()
    bundle = Path("build/bench") / (args.model + ("-all" if args.precisions else ""))
    if not (bundle / "angle_rt.json").is_file():
        extra = dict(fp16=True, int8=True, int8_dynamic=True) if args.precisions else {}
        export(model_dir, bundle, force=True, progress=True, **extra)
    texts, source = sentences()
    fns = systems(model_dir, bundle, args.threads, args.batch_size, args.precisions)
    outputs = {name: fn(texts[:128]) for name, fn in fns.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            outputs[name] = fn(texts)
            times[name].append(time.perf_counter() - start)
    if args.st_python:
        for name, r in st_onnx_anchors(args, model_dir, texts).items():
            times[name], outputs[name] = r["seconds"], np.asarray(r["embeddings"])
    anchor = statistics.median(times["sentence-transformers torch fp32"])
    ref = outputs["sentence-transformers torch fp32"]
    n_tokens = sum(len(r) for r in Encoder(bundle).tokenizer.encode(texts))
    rows = {}
    pairs = load_sts(find_shared_data() / "sts" / "stsb-test.jsonl") if source != "built-in" \
        else None
    for name, ts in times.items():
        med = statistics.median(ts)
        out = np.asarray(outputs[name], dtype=np.float32)
        rows[name] = {"sent_per_s": len(texts) / med, "tokens_per_s": n_tokens / med,
                      "seconds": ts, "x_vs_sentence_transformers": anchor / med,
                      "min_cos_vs_st": compare(ref, out, 0.0).min_cosine}
        if pairs is not None:
            n = len(pairs.text1)
            rows[name]["stsb_test_spearman"] = sts_spearman(out[:n], out[n:], pairs.scores)
    return {"model": args.model, "texts": source, "n": len(texts), "tokens": n_tokens,
            "threads": args.threads, "batch_size": args.batch_size, "repeats": args.repeats,
            "machine": f"{platform.processor() or platform.machine()}, {_cpu_name()}",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "results": rows}


def st_onnx_anchors(args: argparse.Namespace, model_dir: Path, texts: list[str]) -> dict:
    """sentence-transformers ONNX / qint8, run in the environment at --st-python."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(dir="build") as tmp:
        sent = Path(tmp) / "sentences.json"
        sent.write_text(json.dumps(texts))
        out = Path("build/bench/st-onnx") / "result.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        script = Path(__file__).parent / "st_onnx_anchor.py"
        subprocess.run([args.st_python, str(script), str(model_dir), str(sent), str(out),
                        str(args.threads), str(args.batch_size), str(args.repeats)], check=True)
        return json.loads(out.read_text())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.platform()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="minilm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--st-python", help="python of an environment with sentence-transformers"
                                       "[onnx] (see st_onnx_anchor.py): adds its ONNX anchors")
    p.add_argument("--precisions", action="store_true",
                   help="also fp16 / int8 / int8-dynamic artifacts and sentence-transformers bf16")
    args = p.parse_args()
    res = run(args)
    print(f"{res['model']}: {res['n']} {res['texts']} sentences ({res['tokens']} tokens), "
          f"{res['threads']} threads, batch {res['batch_size']}, median of {res['repeats']}")
    print(f"{'system':36} {'sent/s':>8} {'tok/s':>9} {'x ST':>6} {'min cos vs ST':>14} "
          f"{'STS-B':>6}")
    for name, r in res["results"].items():
        print(f"{name:36} {r['sent_per_s']:8.0f} {r['tokens_per_s']:9.0f} "
              f"{r['x_vs_sentence_transformers']:6.2f} {r['min_cos_vs_st']:14.7f} "
              f"{r.get('stsb_test_spearman', float('nan')):6.2f}")
    tag = args.model + ("-precisions" if args.precisions else "")
    out = Path(__file__).parent / "results" / f"encode-{tag}-{res['date'][:10]}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
