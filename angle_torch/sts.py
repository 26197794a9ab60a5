"""STS data (format A jsonl) and the Spearman metric used to judge embeddings."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from angle_rt.postprocess import cosine_rows

DATA_ENV = "ANGLE_RT_DATA"


def find_shared_data() -> Path | None:
    """The shared data folder: $ANGLE_RT_DATA, else ../shared/data beside the checkout."""
    candidates = [os.environ.get(DATA_ENV)]
    here = Path(__file__).resolve().parent.parent
    candidates += [str(p / "shared" / "data") for p in (here.parent, *here.parents)]
    for c in candidates:
        if c and (Path(c) / "sts").is_dir():
            return Path(c)
    return None


@dataclass(frozen=True)
class StsPairs:
    """Sentence pairs with gold similarity scores."""

    text1: list[str]
    text2: list[str]
    scores: np.ndarray

    @property
    def sentences(self) -> list[str]:
        """text1 then text2 (2n sentences, duplicates kept)."""
        return self.text1 + self.text2


def load_sts(path: str | Path) -> StsPairs:
    """A jsonl with sentence1/sentence2/score (or text1/text2/label) per line."""
    t1, t2, y = [], [], []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            t1.append(rec.get("sentence1", rec.get("text1")))
            t2.append(rec.get("sentence2", rec.get("text2")))
            y.append(float(rec.get("score", rec.get("label"))))
    return StsPairs(t1, t2, np.asarray(y, dtype=np.float64))


def spearman_x100(pred: np.ndarray, gold: np.ndarray) -> float:
    """Spearman rank correlation × 100 (ties get average ranks)."""
    from scipy.stats import spearmanr

    return float(spearmanr(pred, gold).statistic * 100.0)


def sts_spearman(emb1: np.ndarray, emb2: np.ndarray, gold: np.ndarray) -> float:
    """Spearman×100 of the pairs' cosine similarities against the gold scores."""
    return spearman_x100(cosine_rows(emb1, emb2), gold)
