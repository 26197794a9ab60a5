"""What `angle-export` costs on large models: wall time, peak RSS, artifact sizes, parity.

    python benchmarks/large_export.py uae-large [--precisions fp16,int8,int8-dynamic]
    python benchmarks/large_export.py decoder-2gb decoder-1b [--verify-size 64]

Models are random-initialized from real configs (no hub here): `uae-large` is
UAE-Large-V1's BERT-large (24 × 1,024, cls, max_length 512, Prompts.C as `query`),
`decoder-1b` a ~1.1B Llama (2,048 wide, 22 layers: TinyLlama's shape), `decoder-2gb` a Llama
just over 2 GiB in fp32 (the >2 GB external-data path). The export runs as a child process
(`python -m exporters.cli`), so its peak RSS is that process's alone (RUSAGE_CHILDREN).
Results: benchmarks/results/large-export-<config>-<precisions>-<date>.json (one file per
config and precision list, so runs of other precisions the same day are kept).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "uae-large": {"kind": "bert-large", "max_length": None},
    "decoder-1b": {"kind": "llama", "hidden": 2048, "layers": 22, "intermediate": 5632,
                   "heads": 32, "kv_heads": 4, "max_length": 512},
    "decoder-2gb": {"kind": "llama", "hidden": 2048, "layers": 11, "intermediate": 5632,
                    "heads": 16, "kv_heads": 16, "max_length": 256},
}


def build(name: str, out: Path) -> Path:
    from tests.tiny_models import build_random_bert_large, build_random_llama

    cfg = CONFIGS[name]
    if cfg["kind"] == "bert-large":
        return build_random_bert_large(out)
    return build_random_llama(out, cfg["hidden"], cfg["layers"], cfg["intermediate"],
                              cfg["heads"], cfg["kv_heads"])


def machine() -> dict:
    cpu = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import os

    import psutil

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(
        psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version()}


def run(name: str, precisions: list[str], verify_size: int | None, work: Path,
        max_length: int | None) -> dict:
    import numpy as np

    from angle_rt import Encoder

    model_dir = work / f"{name}-model"
    t0 = time.perf_counter()
    build(name, model_dir)
    build_s = time.perf_counter() - t0
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    bundle = work / f"{name}-bundle"
    cmd = [sys.executable, "-m", "exporters.cli", "--model", str(model_dir), "-o",
           str(bundle), "--force", "-q", "--engine", "no"]
    cmd += [f"--{p}" for p in precisions]
    length = max_length or CONFIGS[name]["max_length"]
    if length:
        cmd += ["--max-length", str(length)]
    if verify_size:
        cmd += ["--verify-size", str(verify_size)]
    print("running:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    export_s = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    result = {"config": name, "model": CONFIGS[name], "precisions": ["fp32", *precisions],
              "weights_bytes": weights, "build_model_s": round(build_s, 1),
              "export_wall_s": round(export_s, 1), "export_peak_rss_bytes": peak_rss,
              "exit_code": proc.returncode, "stdout": proc.stdout[-4000:],
              "stderr_tail": proc.stderr[-2000:] if proc.returncode else "",
              "machine": machine(), "date": date.today().isoformat()}
    if proc.returncode:
        return result
    manifest = json.loads((bundle / "angle_rt.json").read_text())
    result["parity"] = {k: v for k, v in manifest["parity"].items() if k != "results"}
    result["parameters"] = manifest["parity"].get("model_parameters")
    arts = []
    for art in manifest["artifacts"]:
        files = [art["file"], *[e["file"] for e in art.get("external_data", [])]]
        entry = {"file": art["file"], "precision": art["precision"],
                 "bytes": sum((bundle / f).stat().st_size for f in files),
                 "external_data": [e["file"] for e in art.get("external_data", [])],
                 "parity": {k: art["parity"].get(k) for k in ("n", "min_cosine",
                                                               "mean_cosine", "verified")
                            if art.get("parity") and k in art["parity"]}}
        try:
            t0 = time.perf_counter()
            enc = Encoder(bundle, precision=art["precision"], backend="cpu")
            entry["load_s"] = round(time.perf_counter() - t0, 1)
            vec = enc.encode(["a sentence to load and run"])
            entry["runs"] = bool(np.isfinite(vec).all())
            enc.close()
        except Exception as exc:  # bf16 on a CPU without ONNX Runtime kernels for it
            entry["runs"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        arts.append(entry)
    result["artifacts"] = arts
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", choices=sorted(CONFIGS))
    p.add_argument("--precisions", default="fp16,int8,int8-dynamic",
                   help="comma list of fp16, bf16, int8, int8-dynamic (fp32 always)")
    p.add_argument("--verify-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--work", help="folder for models and bundles (default: a temp folder, "
                                  "removed after)")
    args = p.parse_args(argv)
    precisions = [x for x in args.precisions.split(",") if x]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="large-export-"))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = ROOT / "benchmarks" / "results"
    try:
        for name in args.configs:
            result = run(name, precisions, args.verify_size, work, args.max_length)
            path = out_dir / f"large-export-{name}-{'+'.join(precisions)}-{result['date']}.json"
            path.write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps({k: result.get(k) for k in ("config", "exit_code",
                                                         "export_wall_s",
                                                         "export_peak_rss_bytes")}))
            for art in result.get("artifacts", []):
                print(f"  {art['file']}: {art['bytes'] / 1e9:.2f} GB, parity {art['parity']}, "
                      f"runs {art['runs']}")
            shutil.rmtree(work / f"{name}-model", ignore_errors=True)
            shutil.rmtree(work / f"{name}-bundle", ignore_errors=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
