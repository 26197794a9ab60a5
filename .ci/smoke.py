"""Steps of .ci/smoke.sh, each run by the venv it checks.

  model DIR            (dev venv)     a tiny random BERT with MiniLM's tokenizer + a small STS file
  reference BUNDLE NPY (dev venv)     encode TEXTS with the bundle, save the vectors
  runtime BUNDLE NPY   (runtime venv) no torch & co.; angle_rt from this venv; the same vectors
  int8 BUNDLE          (export venv)  the manifest lists a gated int8 artifact, Spearman included

Only `model` needs more than numpy and angle_rt.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "A man is playing a guitar.",
    "",
    "Zwei Hunde spielen im Schnee — naïve café, 東京.",
    "word " * 200,  # past max_length: truncated
    "The quick brown fox jumps over the lazy dog.",
    "?",
]
# what only the export/train extras bring; none may be in the runtime-only venv
NOT_IN_RUNTIME = ("torch", "transformers", "onnx", "peft", "scipy", "datasets", "safetensors",
                  "sentence_transformers", "tensorrt")


def fail(msg: str) -> None:
    print(f"SMOKE FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def model(out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import build_tiny_bert

    build_tiny_bert(out / "tiny-bert")
    # for the INT8 Spearman gate where no shared STS-B is found: identical pairs score 5,
    # other pairs 0 (any gold works: the gate compares int8 with fp32 on the same pairs)
    rng = random.Random(0)
    words = ["a", "man", "woman", "dog", "cat", "plays", "eats", "runs", "guitar", "ball",
             "the", "park", "kitchen", "quickly", "slowly", "red", "small", "near", "under"]
    s = [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(200)]
    with open(out / "sts.jsonl", "w", encoding="utf-8") as fh:
        for i in range(0, len(s), 2):
            fh.write(json.dumps({"sentence1": s[i], "sentence2": s[i], "score": 5.0}) + "\n")
            fh.write(json.dumps({"sentence1": s[i], "sentence2": s[i + 1], "score": 0.0}) + "\n")
    print(f"tiny BERT and sts.jsonl in {out}")


def encode(bundle: Path) -> np.ndarray:
    import angle_rt

    enc = angle_rt.Encoder(bundle)
    vecs = enc.encode(TEXTS)
    if vecs.shape != (len(TEXTS), enc.dim) or not np.isfinite(vecs).all():
        fail(f"encode gave {vecs.shape}, finite={np.isfinite(vecs).all()}")
    print(f"angle_rt {angle_rt.__file__}: {enc.artifact.file} on {enc.session.name}, "
          f"{vecs.shape}")
    return vecs


def reference(bundle: Path, npy: Path) -> None:
    np.save(npy, encode(bundle))


def runtime(bundle: Path, npy: Path) -> None:
    present = [m for m in NOT_IN_RUNTIME if importlib.util.find_spec(m) is not None]
    if present:
        fail(f"`pip install angle-rt` brought {present}")
    for dist in ("onnxruntime-gpu",):
        try:
            metadata.distribution(dist)
            fail(f"`pip install angle-rt` brought {dist}")
        except metadata.PackageNotFoundError:
            pass
    import angle_rt

    if ROOT in Path(angle_rt.__file__).resolve().parents:
        fail(f"angle_rt imported from the checkout ({angle_rt.__file__}), not the venv")
    got, want = encode(bundle), np.load(npy)
    cos = (got * want).sum(1) / np.maximum(
        np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-30)
    diff = float(np.abs(got - want).max())
    print(f"vs dev venv: min cosine {cos.min():.8f}, max |diff| {diff:.2e}")
    if cos.min() < 0.999999 or diff > 1e-4 * max(1.0, float(np.abs(want).max())):
        fail("runtime venv's vectors differ from the dev venv's")
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(NOT_IN_RUNTIME))
    if loaded:
        fail(f"loaded {loaded}")
    embed_txt(bundle, got)


def embed_txt(bundle: Path, vectors: np.ndarray) -> None:
    """`angle-rt embed` on .txt → .npy needs no extra: the console script, then the rows."""
    rows = [i for i, t in enumerate(TEXTS) if t]
    Path("texts.txt").write_text("".join(TEXTS[i] + "\n" for i in rows), encoding="utf-8")
    cli = Path(sys.executable).parent / "angle-rt"
    run = subprocess.run([str(cli), "embed", str(bundle), "texts.txt", "vectors.npy"],
                         capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        fail(f"angle-rt embed exited {run.returncode}: {run.stderr}")
    got = np.load("vectors.npy")
    if got.shape != (len(rows), vectors.shape[1]) or np.abs(got - vectors[rows]).max() > 1e-5:
        fail(f"angle-rt embed gave {got.shape}, not the encode vectors of {len(rows)} lines")
    print(f"angle-rt embed texts.txt vectors.npy: {got.shape}, equal to encode")


def int8(bundle: Path) -> None:
    manifest = json.loads((bundle / "angle_rt.json").read_text(encoding="utf-8"))
    arts = [a for a in manifest["artifacts"] if a["precision"] == "int8"]
    if not arts:
        fail(f"no int8 artifact in {[a['file'] for a in manifest['artifacts']]}")
    art = arts[0]
    if not (bundle / art["file"]).is_file():
        fail(f"{art['file']} listed but missing")
    parity = art.get("parity") or {}
    if not parity.get("passed") or "stsb_dev" not in parity:
        fail(f"int8 parity lacks a passed gate with the STS Spearman: {parity}")
    print(f"{art['file']}: min cos {parity['min_cosine']:.5f}, Spearman {parity['stsb_dev']:.2f}"
          f" (fp32 {parity['stsb_dev_fp32']:.2f})")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="step", required=True)
    sub.add_parser("model").add_argument("out", type=Path)
    for name in ("reference", "runtime"):
        s = sub.add_parser(name)
        s.add_argument("bundle", type=Path)
        s.add_argument("npy", type=Path)
    sub.add_parser("int8").add_argument("bundle", type=Path)
    a = p.parse_args()
    if a.step == "model":
        model(a.out)
    elif a.step == "int8":
        int8(a.bundle)
    else:
        {"reference": reference, "runtime": runtime}[a.step](a.bundle, a.npy)


if __name__ == "__main__":
    main()
