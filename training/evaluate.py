"""`python -m training.evaluate`: STS Spearman×100 for a torch model or an exported bundle.

    python -m training.evaluate --model DIR_OR_BUNDLE --data stsb-test.jsonl [--precision P]

A directory with angle_rt.json (or a file inside one) is encoded by angle_rt, anything
else by the torch AngleModel, so one command measures every precision.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from angle_rt.manifest import MANIFEST_FILE
from angle_torch.sts import load_sts, sts_spearman


def is_bundle(path: str | Path) -> bool:
    p = Path(path)
    return (p / MANIFEST_FILE).is_file() or (p.is_file() and (p.parent / MANIFEST_FILE).is_file())


def embed(model: str | Path, texts: list[str], prompt: str | None = None,
          precision: str | None = None, batch_size: int = 32) -> np.ndarray:
    """Vectors from a bundle (angle_rt) or a model directory / hub id (torch)."""
    if is_bundle(model):
        from angle_rt import Encoder

        return Encoder(model, precision=precision).encode(texts, batch_size=batch_size,
                                                           prompt=prompt)
    if precision not in (None, "fp32"):
        raise ValueError("--precision applies to bundles; a torch model is evaluated in fp32")
    from angle_torch.model import AngleModel

    return AngleModel.from_pretrained(model).encode(texts, batch_size=batch_size, prompt=prompt)


def evaluate(model: str | Path, data: str | Path, prompt: str | None = None,
             precision: str | None = None, batch_size: int = 32) -> float:
    """Spearman×100 between cosine similarity and the gold scores of `data`."""
    pairs = load_sts(data)
    emb = embed(model, pairs.sentences, prompt, precision, batch_size)
    n = len(pairs.text1)
    return sts_spearman(emb[:n], emb[n:], pairs.scores)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle (or file in it), model dir or hub id")
    p.add_argument("--data", required=True, help="jsonl: sentence1/sentence2/score or "
                                                 "text1/text2/label")
    p.add_argument("--prompt", default=None)
    p.add_argument("--precision", default=None, help="bundle artifact precision (fp32, ...)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    try:
        score = evaluate(args.model, args.data, args.prompt, args.precision, args.batch_size)
    except (ValueError, FileNotFoundError) as exc:
        print(f"training.evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"model": args.model, "data": args.data, "spearman": round(score, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
