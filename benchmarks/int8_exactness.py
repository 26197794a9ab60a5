"""INT8 weight encodings against fp32, as this host runs them: full-range (±127) weights,
the exporter's (aligned pairs within 128: exact on every x86 host) and ±63 (ONNX Runtime's
reduce_range), both INT8 schemes, every linear layer quantized unless --exclude says.

    python benchmarks/int8_exactness.py --bundle build/bench/minilm-all --out F.json \
        [--exclude REGEX ...]

For an encoder bundle (right padding; its model.onnx, tokenizer and max_length).

Without VNNI (AVX2) ONNX Runtime's u8·s8 kernels add pairs of products in int16, which
saturates when a pair of weights (k, k+1) sums past 128 in magnitude. For each weight
scheme this writes both artifacts and reports, as this host runs them, the min /
1st-percentile / mean cosine to the bundle's fp32 graph over STS-B test sentences. Whether
the host's sums are exact is tested on one layer (tests/exporters/test_int8_exact.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

import exporters.quantize as quant
from exporters.texts import calibration_texts

# (label, largest |w|, largest |w_k| + |w_k+1|): full range, the exporter's, ORT's reduce_range
WEIGHTS = [("full", 127, None), ("pairs", 127, 128), ("7-bit", 63, None)]


def sentences(data: Path, limit: int) -> list[str]:
    texts = []
    for line in data.read_text().splitlines():
        row = json.loads(line)
        texts += [row["sentence1"], row["sentence2"]]
    return list(dict.fromkeys(texts))[:limit]


def feeds(tok: Tokenizer, texts: list[str],
          batch: int = 32) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
    """(indices, feed) in length order, padded per batch."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        enc = tok.encode_batch([texts[i] for i in idx])
        yield idx, {"input_ids": np.array([e.ids for e in enc], np.int64),
                    "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}


def embed(path: Path, tok: Tokenizer, texts: list[str]) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rows: dict[int, np.ndarray] = {}
    for idx, feed in feeds(tok, texts):
        rows.update(zip(idx, sess.run(None, feed)[0], strict=True))
    out = np.stack([rows[i] for i in range(len(texts))])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def score(vecs: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    cos = (vecs * ref).sum(axis=1)
    return {"min": round(float(cos.min()), 5), "p1": round(float(np.percentile(cos, 1)), 5),
            "mean": round(float(cos.mean()), 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle with model.onnx")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/sts/stsb-test.jsonl"))
    ap.add_argument("--sentences", type=int, default=1200)
    ap.add_argument("--exclude", nargs="*", default=[],
                    help="regexes of linear nodes kept in float (as angle-export's)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    src = args.bundle / "model.onnx"
    tok = Tokenizer.from_file(str(args.bundle / "tokenizer.json"))
    manifest = json.loads((args.bundle / "angle_rt.json").read_text())
    tok.enable_truncation(manifest["max_length"])
    tok.enable_padding(pad_id=manifest["pad_token_id"])
    texts = sentences(args.data, args.sentences)
    ref = embed(src, tok, texts)

    def vectors(path: Path) -> np.ndarray:
        return embed(path, tok, texts)

    layers = quant.linear_layers(onnx.load(str(src)))
    calib = quant.calibrate(src, layers, (f for _, f in feeds(tok, calibration_texts(None, 512))))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, w_max, pair_max in WEIGHTS:
            quant.W_QMAX, quant.PAIR_MAX = w_max, pair_max  # read as each artifact is written
            dyn = quant.quantize_dynamic_int8(src, Path(tmp) / f"dyn-{name}.onnx", args.exclude)
            qdq = quant.quantize_int8(src, Path(tmp) / f"qdq-{name}.onnx", [], args.exclude,
                                      calibration=calib)
            rows += [{"weights": name, "artifact": "int8-dynamic", **score(vectors(dyn), ref)},
                     {"weights": name, "artifact": "int8 Q/DQ", **score(vectors(qdq), ref)}]
            print(*(json.dumps(r) for r in rows[-2:]), sep="\n", flush=True)
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    args.out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "vnni": bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))},
        "bundle": str(args.bundle), "exclude": args.exclude,
        "sentences": len(texts), "command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
