"""INT8 weight encodings against fp32, as this host runs them: full-range (±127) weights,
the exporter's (aligned pairs within 128: exact on every x86 host) and ±63 (ONNX Runtime's
reduce_range), both INT8 schemes, every linear layer quantized unless --exclude says.

    python benchmarks/int8_exactness.py --bundle build/bench/minilm-all --out F.json \
        [--exclude REGEX ...]

Without VNNI (AVX2) ONNX Runtime's u8·s8 kernels add pairs of products in int16, which
saturates when a pair of weights (k, k+1) sums past 128 in magnitude. For each weight
scheme this writes both artifacts beside the bundle's fp32 graph and reports, encoded by
angle_rt on this host, the min / 1st-percentile / mean cosine to fp32 over STS-B test
sentences. Whether the host's sums are exact is tested on one layer
(tests/exporters/test_int8_exact.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import exporters.quantize as quant
from angle_rt import Encoder
from angle_rt.batching import pad_batch, plan_batches
from angle_rt.manifest import INPUT_NAMES, read_manifest
from angle_rt.postprocess import cosine_rows
from angle_rt.session import OrtSession, int8_sums_exact
from angle_rt.tokenizer import TextTokenizer
from angle_torch.sts import find_shared_data, load_sts
from benchmarks.harness import cpu_name
from exporters.texts import calibration_texts

# (label, largest |w|, largest |w_k| + |w_k+1|): full range, the exporter's, ORT's reduce_range
WEIGHTS = [("full", 127, None), ("pairs", 127, 128), ("7-bit", 63, None)]


def calibration_feeds(bundle: Path) -> list[dict[str, np.ndarray]]:
    """The built-in calibration texts as padded batches, as the exporter makes them."""
    m = read_manifest(bundle)
    ids = TextTokenizer(bundle / "tokenizer.json", m.max_length).encode(
        calibration_texts(None, 512))
    return [dict(zip(INPUT_NAMES, pad_batch([ids[i] for i in batch], m.pad_token_id,
                                            m.padding_side), strict=True))
            for batch in plan_batches([len(r) for r in ids], 16, 16 * 256)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle with model.onnx")
    ap.add_argument("--sentences", type=int, default=1200)
    ap.add_argument("--exclude", nargs="*", default=[],
                    help="regexes of linear nodes kept in float (as angle-export's)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    data = find_shared_data()
    if data is None:
        sys.exit("needs the STS-B test set: set ANGLE_RT_DATA")
    sts = load_sts(data / "sts" / "stsb-test.jsonl")
    pairs = (t for pair in zip(sts.text1, sts.text2, strict=True) for t in pair)
    texts = list(dict.fromkeys(pairs))[:args.sentences]  # the first distinct ones, pair by pair

    def vectors(path: Path) -> np.ndarray:
        return Encoder(args.bundle, precision="fp32", verify_checksums=False,
                       backend=lambda _p: OrtSession(path, "cpu")).encode(texts)

    src = args.bundle / "model.onnx"
    ref = vectors(src)
    calib = quant.calibrate(src, quant.linear_layers(onnx.load(str(src))),
                            calibration_feeds(args.bundle))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, w_max, pair_max in WEIGHTS:
            quant.W_QMAX, quant.PAIR_MAX = w_max, pair_max  # read as each artifact is written
            for artifact, path in [
                    ("int8-dynamic", quant.quantize_dynamic_int8(
                        src, Path(tmp) / f"dyn-{name}.onnx", args.exclude)),
                    ("int8 Q/DQ", quant.quantize_int8(src, Path(tmp) / f"qdq-{name}.onnx", [],
                                                      args.exclude, calibration=calib))]:
                cos = cosine_rows(vectors(path), ref)
                rows.append({"weights": name, "artifact": artifact,
                             **{k: round(float(v), 5) for k, v in [
                                 ("min", cos.min()), ("p1", np.percentile(cos, 1)),
                                 ("mean", cos.mean())]}})
                print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "machine": {"cpu": cpu_name(), "int8_sums_exact_at_full_range": int8_sums_exact()},
        "bundle": str(args.bundle), "exclude": args.exclude, "sentences": len(texts),
        "command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
