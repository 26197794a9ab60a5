"""The file job's Parquet output on a remote filesystem (``s3://``, ``gs://``, ``hdfs://``).

Same layout and resume rules as the local writers, with what object stores offer instead of
fsync and rename: every file (part, state, record) is put whole (see `Location.open_write`),
so a run killed at any point leaves the parts and state of its last recorded chunk in
``OUTPUT.partial/``, and a rerun goes on from there. At the end the output is published:

- ``OUTPUT.parquet``: the parts joined into one file, put whole;
- ``OUTPUT/``: the parts (or the `rows_per_file` groups) copied into OUTPUT/, then
  ``_angle_rt_embed.json`` written last. A store has no directory rename, so OUTPUT/ is
  complete when its ``_angle_rt_embed.json`` exists (Spark's ``_SUCCESS`` rule); a run
  killed while copying repeats the copy.

The skipped-rows list is staged one file per chunk (an object cannot be appended to or cut)
and joined into ``OUTPUT.skipped.jsonl``. OUTPUT is held by a lease (`lock.lease_lock`).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np

from angle_rt.embed import _deps
from angle_rt.embed import writers as w
from angle_rt.embed.errors import OutputExistsError
from angle_rt.embed.fs import Location
from angle_rt.embed.lock import lease_lock


class RemoteParquetWriter(w._ParquetParts):
    """OUTPUT.parquet or OUTPUT/ on a pyarrow FileSystem."""

    rows_per_file: int | None = None

    def __init__(self, output: Location, id_name: str, id_type: Any = None, *,
                 single_file: bool) -> None:
        self.output, self.staging = output, output.sibling(".partial")
        self.id_name, self.id_type, self.single_file = id_name, id_type, single_file

    # -- names ---------------------------------------------------------------------------
    def side_files(self) -> list[Location]:
        return [self.skipped_path()]

    def skipped_path(self) -> Location:
        return self.output.sibling(".skipped.jsonl")

    def _part(self, i: int) -> Location:  # type: ignore[override]
        return self.staging.child(f"part-{i:06d}.parquet")

    def _parts(self) -> list[Location]:  # type: ignore[override]
        return [f for f in self.staging.files()
                if f.relative(self.staging).startswith("part-") and f.name.endswith(".parquet")]

    def _skipped_files(self) -> list[Location]:
        return self.staging.child("skipped").files()

    # -- the job's state -----------------------------------------------------------------
    def lock(self) -> Any:
        return lease_lock(self.output)

    def load_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.staging.child(w.STATE).read_bytes())
        except (OSError, ValueError):
            return None

    def save_state(self, state: dict[str, Any]) -> None:
        self.staging.child(w.STATE).write_bytes(json.dumps(state).encode())

    def staging_busy(self) -> bool:
        return bool(self.staging.files())

    def clear_staging(self) -> None:
        self.staging.remove()

    def start_staging(self, skipping: bool) -> None:
        self.staging.mkdir()

    def append_skipped(self, records: list[dict], state: dict[str, Any]) -> None:
        # named by the chunk's first input row: a resume drops those at or past rows_read
        name = f"skipped/{state['rows_read']:015d}.jsonl"
        self.staging.child(name).write_bytes(
            "".join(json.dumps(r, default=str) + "\n" for r in records).encode())

    def cut_skipped(self, state: dict[str, Any]) -> None:
        for f in self._skipped_files():
            if int(f.name.split(".")[0]) >= state["rows_read"]:
                f.remove()

    def finish_side_files(self, skipping: bool) -> None:
        files = self._skipped_files()
        if files or (skipping and self.staging.exists()):
            self.skipped_path().write_bytes(b"".join(f.read_bytes() for f in files))
        self.staging.remove()

    def output_present(self) -> bool:
        return self.output.exists() or self.skipped_path().exists()

    def present_side_files(self) -> list[Location]:
        return [p for p in self.side_files() if p.exists()]

    # -- parts ---------------------------------------------------------------------------
    def resume(self, rows: int, parts: int, extra: dict[str, Any]) -> None:
        have = self._parts()
        want = [self._part(i).path for i in range(parts)]
        if [p.path for p in have[:parts]] != want:
            raise OutputExistsError(f"{self.staging} is missing part files its state lists; "
                                    "pass --overwrite to start again")
        for p in have[parts:]:
            p.remove()
        if parts and self.id_type is None:
            schema = _deps.parquet().read_schema(self._part(0).parquet_source())
            self.id_type = schema.field(self.id_name).type

    def write(self, ids: list[Any], vectors: np.ndarray, meta: dict[str, Any]) -> dict:
        table = self._table(ids, vectors, meta)
        part = self._part(len(self._parts()))
        with part.open_write() as fh:
            _deps.parquet().write_table(table, fh, **self._options(meta))
        part.commit_write()
        return {}

    # -- the finished output -------------------------------------------------------------
    def final_meta(self) -> dict[str, Any] | None:
        if self.single_file:
            if not self.output.is_file():
                return None
            try:
                meta = _deps.parquet().read_schema(self.output.parquet_source()).metadata
            except Exception:  # anything unreadable is not ours
                raise self._foreign("is not a readable Parquet file") from None
            if not meta or w.META_KEY.encode() not in meta:
                raise self._foreign(f"has no {w.META_KEY!r} metadata")
            return json.loads(meta[w.META_KEY.encode()])
        record = self.output.child(w.DIR_META)
        if record.is_file():
            return json.loads(record.read_bytes())
        if self.output.files():
            raise self._foreign(f"has no {w.DIR_META}")
        return None

    def check_replaceable(self) -> None:
        if not self.single_file and self.output.files() \
                and not self.output.child(w.DIR_META).is_file():
            raise OutputExistsError(f"{self.output} holds files not written by `angle-rt "
                                    "embed`; not replacing it even with --overwrite: remove "
                                    "it yourself or choose another OUTPUT")

    def remove_final(self) -> None:
        self.output.remove()
        self.skipped_path().remove()

    def finalize(self, meta: dict[str, Any]) -> None:
        if self.single_file:
            self._join(meta)
        else:
            self._publish(meta)

    def _tables(self, meta: dict[str, Any]) -> Any:
        record = {w.META_KEY: json.dumps(meta, sort_keys=True)}
        pq = _deps.parquet()
        parts = self._parts()
        if not parts:
            yield self._empty(meta)
        for p in parts:
            yield pq.read_table(p.parquet_source()).replace_schema_metadata(record)

    def _join(self, meta: dict[str, Any]) -> None:
        pq = _deps.parquet()
        tables = self._tables(meta)
        first = next(tables)
        with self.output.open_write() as fh, \
                pq.ParquetWriter(fh, first.schema, **self._options(meta)) as out:
            for table in itertools.chain([first], tables):  # one part in memory at a time
                out.write_table(table, row_group_size=max(1, table.num_rows))
        self.output.commit_write()

    def _publish(self, meta: dict[str, Any]) -> None:
        if self.rows_per_file:
            final = self.staging.child("final")
            final.remove()
            final.mkdir()
            files = w.regroup(self._tables(meta), self.rows_per_file, final, self._options(meta))
        elif self._parts():
            files = self._parts()
        else:  # an empty result is still a readable dataset
            files = [self.staging.child("empty").child(self._part(0).name)]
            with files[0].open_write() as fh:
                _deps.parquet().write_table(self._empty(meta), fh, **self._options(meta))
            files[0].commit_write()
        self.output.remove()  # this run's own files, from a run killed while publishing
        self.output.mkdir()
        for f in files:
            f.copy_to(self.output.child(f.name))
        self.output.child(w.DIR_META).write_bytes(json.dumps(meta, indent=1).encode())
