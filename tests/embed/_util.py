"""Reading outputs back for the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from angle_rt.embed.writers import column_vectors


def read_output(path: Path, id_column: str = "id") -> tuple[list[Any], np.ndarray, dict]:
    """(ids, vectors, job record) of a .parquet file, a directory of Parquet, or a .npy."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    path = Path(path)
    if path.suffix == ".npy":
        ids = [json.loads(line) for line in
               path.with_name(path.name + ".ids.jsonl").read_text().splitlines()]
        meta = json.loads(path.with_name(path.name + ".json").read_text())
        return ids, np.load(path), meta
    if path.is_dir():
        table = ds.dataset(path, format="parquet").to_table()
        meta = json.loads((path / "_angle_rt_embed.json").read_text())
    else:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"angle_rt.embed"])
    vectors = column_vectors(table.column("embedding"), meta["dtype"])
    return table.column(id_column).to_pylist(), vectors, meta
