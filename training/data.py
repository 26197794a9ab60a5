"""Dataset formats (detected from columns), loading, and the collator.

Formats, as the seed README names them:
  A  text1, text2, label      pairs with a float similarity label
  B  text, positive, negative triples
  C  text, positive           positive pairs only
angle_emb 0.6 writes `query` for `text`; both are accepted.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from angle_rt.tokenizer import TextTokenizer
from angle_torch.model import pad_ids

FORMATS = {
    "A": ("text1", "text2", "label"),
    "B": ("text", "positive", "negative"),
    "C": ("text", "positive"),
}
_SAVED = ("dataset_info.json", "dataset_dict.json", "state.json")
_HINTS = {
    ("sentence1", "sentence2", "score"): "sentence1:text1,sentence2:text2,score:label",
    ("anchor", "positive", "negative"): "anchor:text",
    ("anchor", "positive"): "anchor:text",
}


def parse_rename(spec: str | dict[str, str] | None) -> dict[str, str]:
    """'old:new,old2:new2' (';' also separates) → {'old': 'new', ...}."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    out = {}
    for item in spec.replace(";", ",").split(","):
        if not item.strip():
            continue
        old, sep, new = item.partition(":")
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f"bad column rename {item!r}; write old:new[,old2:new2]")
        out[old.strip()] = new.strip()
    return out


def detect_format(columns: Iterable[str]) -> str:
    """A, B or C from the column names (after renaming); ValueError naming them otherwise."""
    cols = {"text" if c == "query" else c for c in columns}
    if {"text1", "text2", "label"} <= cols:
        return "A"
    if {"text", "positive", "negative"} <= cols:
        return "B"
    if {"text", "positive"} <= cols and "label" not in cols:
        return "C"
    want = "; ".join(f"{k} = {', '.join(v)}" for k, v in FORMATS.items())
    msg = f"no dataset format fits columns {sorted(columns)}; expected {want}"
    for seen, rename in _HINTS.items():
        if set(seen) <= set(columns):
            msg += f" (try --column-rename {rename})"
            break
    else:
        if {"premise", "hypothesis", "label"} <= set(columns):
            msg += NLI_HINT
    raise ValueError(msg)


# NLI's classes are no similarity (renamed to format A, contradiction would rank above
# entailment and only entailment would be a negative)
NLI_HINT = (" (NLI labels are classes, 0 = entailment, 1 = neutral, 2 = contradiction, not "
            "similarity scores: keep the entailment rows as format C with --column-rename "
            "premise:text,hypothesis:positive, or build triples text, positive, negative)")


def record_problem(record: dict[str, Any], fmt: str) -> str | None:
    """Why `record` cannot train as format `fmt`, or None: each text a str (or a non-empty
    list of them), format A's label a finite number ≥ 0 (in-batch negatives take any
    label ≠ 0 as a positive, so a -1 "no label" would be one)."""
    for col in FORMATS[fmt] if fmt != "A" else FORMATS[fmt][:2]:
        if col not in record:
            return f"no {col!r} field"
        value = record[col]
        texts = value if isinstance(value, (list, tuple)) and value else [value]
        if not all(isinstance(t, str) for t in texts):
            return f"{col!r} is {value!r:.80}, not a text (or a non-empty list of texts)"
    if fmt == "A":
        label = record.get("label")
        try:
            number = float(label)  # CSV read as it streams gives "4.5"
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number >= 0):
            return f"'label' is {label!r:.80}: a similarity label is a finite number ≥ 0"
    return None


def check_records(records: Sequence[dict[str, Any]], fmt: str) -> None:
    """ValueError naming the first row (0-based) `record_problem` refuses, before training."""
    for i, record in enumerate(records):
        problem = record_problem(record, fmt)
        if problem is not None:
            raise ValueError(f"train row {i}: {problem}")


def load_records(source: Any, rename: str | dict[str, str] | None = None,
                 split: str = "train") -> list[dict[str, Any]]:
    """Rows from a .jsonl/.json/.csv/.parquet file, a `save_to_disk` folder, a hub dataset,
    or an in-memory `datasets.Dataset` / `DatasetDict` (its `split`) / list of dicts."""
    import datasets

    if isinstance(source, list):
        return [_renamed(dict(r), rename) for r in source]
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        ds = source[split] if isinstance(source, datasets.DatasetDict) else source
        return _columns(ds, rename).to_list()
    path = Path(source)
    kinds = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    if path.is_file():
        if path.suffix not in kinds:
            raise ValueError(f"{path}: unsupported file type; use {', '.join(kinds)}")
        ds = datasets.load_dataset(kinds[path.suffix], data_files=str(path), split="train")
    elif path.is_dir() and any((path / f).exists() for f in _SAVED):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    elif path.exists():
        raise ValueError(f"{path} is neither a data file nor a datasets.save_to_disk folder")
    else:
        ds = datasets.load_dataset(str(source), split=split)
    return _columns(ds, rename).to_list()


def _columns(ds: Any, rename: str | dict[str, str] | None) -> Any:
    # one mapping may serve train and valid data: rename what is present; a typo shows up
    # as a missing column in detect_format
    mapping = {k: v for k, v in parse_rename(rename).items() if k in ds.column_names}
    if mapping:
        ds = ds.rename_columns(mapping)
    if "query" in ds.column_names and "text" not in ds.column_names:
        ds = ds.rename_column("query", "text")
    return ds


def _renamed(row: dict[str, Any], rename: str | dict[str, str] | None) -> dict[str, Any]:
    for old, new in parse_rename(rename).items():
        if old in row:
            row[new] = row.pop(old)
    if "query" in row and "text" not in row:
        row["text"] = row.pop("query")
    return row


@dataclass
class Batch:
    """Zig-zag rows ready for the model, and the labels of format A."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    fmt: str
    n_samples: int


@dataclass
class AngleCollator:
    """Records → tokenized zig-zag batch, with prompts and in-batch duplicate filtering.

    Prompts: `text_prompt` for text1/text2 (A); `query_prompt` for text, `doc_prompt` for
    positive/negative (B, C). Truncation keeps the prompt. A sample whose texts repeat
    one already in the batch is dropped (`filter_duplicate`), so in-batch negatives are
    not false negatives; repeats inside one sample are allowed.
    """

    tokenizer: TextTokenizer
    fmt: str
    pad_token_id: int
    padding_side: str = "right"
    text_prompt: str | None = None
    query_prompt: str | None = None
    doc_prompt: str | None = None
    filter_duplicate: bool = True
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def rng_state(self) -> Any:
        """State of the RNG that picks one element of list-valued text fields."""
        return self._rng.getstate()

    def set_rng_state(self, state: Any) -> None:
        """Continue picking exactly where `rng_state()` was taken (training resume)."""
        self._rng.setstate(state)

    def __call__(self, records: Sequence[dict[str, Any]]) -> Batch:
        for record in records:  # streamed rows are seen first here
            problem = record_problem(record, self.fmt)
            if problem is not None:
                raise ValueError(f"train row {record!r:.200}: {problem}")
        columns = FORMATS[self.fmt][:2] if self.fmt == "A" else FORMATS[self.fmt]
        prompts = self._prompts(len(columns))
        per_col = [self.tokenizer.encode([self._pick(r[c]) for r in records], p)
                   for c, p in zip(columns, prompts, strict=True)]
        rows_by_sample = [[col[i] for col in per_col] for i in range(len(records))]
        keep = self._dedupe(rows_by_sample)
        rows = [row for i in keep for row in rows_by_sample[i]]
        ids, mask = pad_ids(rows, self.pad_token_id, self.padding_side)
        labels = None
        if self.fmt == "A":
            labels = torch.tensor([float(records[i]["label"]) for i in keep])
        return Batch(ids, mask, labels, self.fmt, len(keep))

    def _prompts(self, n: int) -> list[str | None]:
        if self.fmt == "A":
            return [self.text_prompt] * n
        return [self.query_prompt] + [self.doc_prompt] * (n - 1)

    def _pick(self, value: Any) -> str:
        if isinstance(value, (list, tuple)):  # angle_emb: one element per sample, at random
            value = self._rng.choice(value)
        return value  # a str: record_problem checked it

    def _dedupe(self, rows_by_sample: list[list[list[int]]]) -> list[int]:
        if not self.filter_duplicate:
            return list(range(len(rows_by_sample)))
        seen: set[tuple[int, ...]] = set()
        keep = []
        for i, rows in enumerate(rows_by_sample):
            keys = {tuple(r) for r in rows}
            if keys & seen:
                continue
            seen |= keys
            keep.append(i)
        return keep



class StreamingData:
    """`--streaming`: rows read from a .jsonl / .parquet / .csv file as training consumes
    them, through a shuffle buffer, so memory holds `buffer` rows whatever the file's size.

    Each epoch reads the file again in order; a row enters the buffer and a random one (from
    random.Random(seed + epoch)) leaves it, so an epoch is a permutation of the file, local
    within `buffer` rows. The row count comes from a first pass (the file's metadata for
    Parquet) and fixes the steps per epoch."""

    KINDS = (".jsonl", ".parquet", ".csv")

    def __init__(self, path: str | Path, rename: str | dict[str, str] | None = None,
                 buffer: int = 10_000) -> None:
        self.path, self.rename, self.buffer = Path(path), rename, buffer
        if self.path.suffix not in self.KINDS or not self.path.is_file():
            raise ValueError(f"--streaming reads a {', '.join(self.KINDS)} file; "
                             f"{path} is not one")
        if buffer < 1:
            raise ValueError(f"--shuffle-buffer must be ≥ 1, got {buffer}")
        self._len = self._count()

    def __len__(self) -> int:
        return self._len

    def first(self) -> dict[str, Any]:
        return next(iter(self.rows()))

    def rows(self) -> Iterator[dict[str, Any]]:
        """The file's rows in order, renamed as --column-rename says."""
        if self.path.suffix == ".jsonl":
            with open(self.path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        yield _renamed(json.loads(line), self.rename)
        elif self.path.suffix == ".csv":
            with open(self.path, encoding="utf-8-sig", newline="") as fh:
                for row in csv.DictReader(fh):
                    yield _renamed(dict(row), self.rename)
        else:
            import pyarrow.parquet as pq

            with pq.ParquetFile(self.path) as pf:
                for batch in pf.iter_batches(batch_size=1024):
                    for row in batch.to_pylist():
                        yield _renamed(row, self.rename)

    def batches(self, epoch: int, size: int, seed: int) -> Iterator[list[dict[str, Any]]]:
        """The epoch's micro-batches of `size` rows (the last may be shorter)."""
        rng = random.Random(seed + epoch)
        pool: list[dict[str, Any]] = []
        out: list[dict[str, Any]] = []
        for row in self.rows():
            if len(pool) < self.buffer:
                pool.append(row)
                continue
            k = rng.randrange(len(pool))
            pool[k], row = row, pool[k]
            out.append(row)
            if len(out) == size:
                yield out
                out = []
        rng.shuffle(pool)
        for row in pool:
            out.append(row)
            if len(out) == size:
                yield out
                out = []
        if out:
            yield out

    def _count(self) -> int:
        if self.path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows
        return sum(1 for _ in self.rows())
