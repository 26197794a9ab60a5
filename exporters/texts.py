"""The texts exports are checked, calibrated and benchmarked on: the built-in sentences
(exporters/data/sentences.txt), user files, worst-case inputs, STS-B test sentences."""

from __future__ import annotations

import json
import random
from pathlib import Path

MIN_SENTENCES = 1000
_JSONL_KEYS = ("text", "sentence", "sentence1", "sentence2", "text1", "text2", "query",
               "positive", "negative", "document")


def builtin_sentences() -> list[str]:
    """The 1,350 sentences this package ships: mixed domains, languages and lengths."""
    text = (Path(__file__).parent / "data" / "sentences.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


def benchmark_sentences() -> tuple[list[str], str]:
    """STS-B test sentences (text1 then text2) where the shared data is, else the built-in
    set; with a label for reports ("STS-B test" or "built-in")."""
    from angle_torch.sts import find_shared_data, load_sts

    data = find_shared_data()
    if data is None:
        return builtin_sentences(), "built-in"
    return load_sts(data / "sts" / "stsb-test.jsonl").sentences, "STS-B test"


def read_texts(path: str | Path) -> list[str]:
    """Texts from a .txt (one per line) or .jsonl file (text-like fields of each record)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [s for s in lines if s.strip()]
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n} is not JSON ({exc})") from exc
        texts += [rec[k] for k in _JSONL_KEYS if isinstance(rec.get(k), str) and rec[k].strip()]
    if not texts:
        raise ValueError(f"{path} has no fields named any of {', '.join(_JSONL_KEYS)}")
    return texts


def verification_texts(path: str | Path | None, n_long: int = 24, seed: int = 0) -> list[str]:
    """≥ MIN_SENTENCES real texts, plus joined paragraphs long enough to hit max_length.

    A user file with fewer than MIN_SENTENCES texts is topped up from the built-in set.
    """
    base = read_texts(path) if path else builtin_sentences()
    if len(base) < MIN_SENTENCES:
        base = base + builtin_sentences()[: MIN_SENTENCES - len(base)]
    rng = random.Random(seed)
    long = [" ".join(rng.sample(base, 40)) for _ in range(n_long)]
    return base + long


def stress_texts(max_length: int) -> list[str]:
    """Worst cases for reduced precision: tiny inputs, one token repeated to max_length,
    a single giant word, runs of punctuation and digits, mixed scripts."""
    return ["", "a", "?", "🙂", "OK.", "the " * max_length, "a" * 400, "!" * 300,
            "0123456789 " * (max_length // 4), "Straße 東京 Москва مرحبا 🙂 " * 20]


def calibration_texts(path: str | Path | None, size: int, seed: int = 0) -> list[str]:
    """`size` texts of mixed lengths for INT8 calibration: from `path` or built-in."""
    texts = read_texts(path) if path else builtin_sentences()
    if len(texts) > size:
        texts = random.Random(seed).sample(texts, size)
    return texts
