"""Output writers. Everything is staged in ``OUTPUT.partial/`` and moved into place when the
job completes, so OUTPUT is either absent or complete.

- ``.parquet``: one file; id column + ``embedding`` (a fixed-size list), one row group per
  chunk; the job record (arguments' fingerprint, dtype, int8 ranges) in the schema metadata
  under ``angle_rt.embed``. Chunks are staged as part files and joined at the end.
- a directory (OUTPUT without a suffix): the staged part files themselves, plus
  ``_angle_rt_embed.json``; for corpora too large to rewrite into one file.
- ``.npy``: an (n, width) array, its ids in ``OUTPUT.ids.jsonl`` (one JSON value a line) and
  the job record in ``OUTPUT.json``.

A writer's `write` makes a chunk durable (written, fsynced, renamed) before the job records it
in ``state.json``; `resume` cuts staged data back to what the state records.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from angle_rt.embed import _deps
from angle_rt.embed.errors import InputError, OutputExistsError
from angle_rt.embed.fs import Location, atomic_write, fsync_dir

META_KEY = "angle_rt.embed"
DIR_META = "_angle_rt_embed.json"
STATE = "state.json"
SKIPPED = "skipped.jsonl"
EMBEDDING = "embedding"
_NPY_HEADER = 128
COMPRESSIONS = ("zstd", "snappy", "gzip", "lz4", "brotli", "none")
DEFAULT_COMPRESSION = "zstd"


def move_if_present(src: Path, dst: Path) -> None:
    if src.exists():
        os.replace(src, dst)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class Writer:
    """Base: staging directory, side files, job-record lookup."""

    compression: str | None = None  # Parquet codec; None for .npy

    def __init__(self, output: Path, id_name: str, id_type: Any = None) -> None:
        self.output = output
        self.staging = output.with_name(output.name + ".partial")
        self.id_name, self.id_type = id_name, id_type

    def side_files(self) -> list[Path]:
        """Files beside OUTPUT that belong to it (removed and replaced with it)."""
        return [self.output.with_name(self.output.name + ".skipped.jsonl")]

    def final_meta(self) -> dict[str, Any] | None:
        """The job record of a complete OUTPUT, None if there is none; OutputExistsError
        if OUTPUT exists but was not written by this job runner."""
        raise NotImplementedError

    def remove_final(self) -> None:
        for p in [self.output, *self.side_files()]:
            remove(p)

    def check_replaceable(self) -> None:
        """OutputExistsError if OUTPUT must not be replaced even with --overwrite."""

    def resume(self, rows: int, parts: int, extra: dict[str, Any]) -> None:
        """Cut staged data back to `rows` rows in `parts` parts."""

    def write(self, ids: list[Any], vectors: np.ndarray, meta: dict[str, Any]) -> dict:
        """Stage one chunk durably; returns the writer's state to record."""
        raise NotImplementedError

    def finalize(self, meta: dict[str, Any]) -> None:
        """Move the staged output into place (idempotent: a rerun may repeat it)."""
        raise NotImplementedError

    def _foreign(self, why: str) -> OutputExistsError:
        return OutputExistsError(f"{self.output} exists but {why}: it was not written by "
                                 "`angle-rt embed`; pass --overwrite to replace it")

    # -- staging: the job's state and skipped-rows list ----------------------------------
    def lock(self) -> Any:
        """A context manager holding OUTPUT for this run (a second run refuses, exit 2)."""
        from angle_rt.embed.lock import output_lock
        return output_lock(self.output)

    state_name = STATE  # the state file in the staging directory

    def load_state(self) -> dict[str, Any] | None:
        # a staging of an older version holds state.json whatever the writer
        path = next((self.staging / n for n in (self.state_name, STATE)
                     if (self.staging / n).is_file()), None)
        if path is None:
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return None

    def save_state(self, state: dict[str, Any]) -> None:
        atomic_write(self.staging / self.state_name, json.dumps(state).encode())

    def staging_busy(self) -> bool:
        """Staging holds something of a run: more than what a run makes before its first
        state (a run killed then recorded no row, so starting over loses nothing)."""
        if not self.staging.exists():
            return False
        names = {p.name for p in self.staging.iterdir()}
        skipped = self.staging / SKIPPED
        unstarted = names <= {self.state_name + ".tmp", SKIPPED} and not (
            SKIPPED in names and skipped.stat().st_size)
        return not unstarted

    def clear_staging(self) -> None:
        remove(self.staging)

    def start_staging(self, skipping: bool) -> None:
        self.staging.mkdir(parents=True)
        if skipping:  # the list exists (maybe empty) whenever rows may be skipped
            (self.staging / SKIPPED).touch()

    def append_skipped(self, records: list[dict], state: dict[str, Any]) -> None:
        """Add one chunk's skipped rows durably; `state` records how far the list goes."""
        with open(self.staging / SKIPPED, "ab") as fh:
            fh.write("".join(json.dumps(r, default=str) + "\n" for r in records).encode())
            fh.flush()
            os.fsync(fh.fileno())
            state["skipped_bytes"] = fh.tell()

    def cut_skipped(self, state: dict[str, Any]) -> None:
        """Cut the skipped-rows list back to what `state` records (resume)."""
        path = self.staging / SKIPPED
        if path.exists():
            with open(path, "rb+") as fh:
                fh.truncate(state["skipped_bytes"])

    def finish_side_files(self, skipping: bool) -> None:
        """Move the skipped-rows list beside OUTPUT, then drop the staging directory."""
        move_if_present(self.staging / SKIPPED, self.skipped_path())
        remove(self.staging)

    def skipped_path(self) -> Any:
        return self.output.with_name(self.output.name + ".skipped.jsonl")

    def output_present(self) -> bool:
        """Whether OUTPUT or its side files exist."""
        return any(p.exists() for p in [self.output, *self.side_files()])

    def present_side_files(self) -> list[Any]:
        return [p for p in self.side_files() if p.exists()]


class _ParquetParts(Writer):
    """Chunks staged as part-NNNNNN.parquet files (one row group each)."""

    def _part(self, i: int) -> Path:
        return self.staging / f"part-{i:06d}.parquet"

    def _parts(self) -> list[Path]:
        return sorted(self.staging.glob("part-*.parquet"))

    def resume(self, rows: int, parts: int, extra: dict[str, Any]) -> None:
        have = self._parts()
        if [p.name for p in have[:parts]] != [self._part(i).name for i in range(parts)]:
            raise OutputExistsError(f"{self.staging} is missing part files its state lists; "
                                    "pass --overwrite to start again")
        for p in have[parts:]:
            p.unlink()
        for p in self.staging.glob("*.tmp"):
            p.unlink()
        if parts and self.id_type is None:
            self.id_type = _deps.parquet().read_schema(self._part(0)).field(self.id_name).type

    def write(self, ids: list[Any], vectors: np.ndarray, meta: dict[str, Any]) -> dict:
        pq = _deps.parquet()
        table = self._table(ids, vectors, meta)
        i = len(self._parts())
        tmp = self._part(i).with_suffix(".tmp")
        pq.write_table(table, tmp, **self._options(meta))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self._part(i))
        fsync_dir(self.staging)
        return {}

    def _table(self, ids: list[Any], vectors: np.ndarray, meta: dict[str, Any]) -> Any:
        pa = _deps.pyarrow()
        try:
            id_arr = pa.array(ids, type=self.id_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise InputError(f"ids of one chunk do not share a type ({exc}); "
                             f"{self.id_name!r} must hold one type") from exc
        self.id_type = id_arr.type
        emb = vector_column(vectors, meta["output_dtype"])
        return pa.table({self.id_name: id_arr, EMBEDDING: emb}).replace_schema_metadata(
            {META_KEY: json.dumps(meta, sort_keys=True)})

    def _options(self, meta: dict[str, Any]) -> dict[str, Any]:
        return parquet_options(self.compression or DEFAULT_COMPRESSION, self.id_name,
                               meta["output_dtype"])

    def _empty(self, meta: dict[str, Any]) -> Any:
        """A table of no rows with the output's schema (a job that embedded nothing)."""
        pa = _deps.pyarrow()
        empty = np.zeros((0, meta["width"]), dtype=np.dtype(meta["dtype"]))
        schema = pa.schema([(self.id_name, self.id_type or pa.int64()),
                            (EMBEDDING, vector_column(empty, meta["output_dtype"]).type)])
        return schema.empty_table().replace_schema_metadata(
            {META_KEY: json.dumps(meta, sort_keys=True)})


class ParquetFileWriter(_ParquetParts):
    """OUTPUT.parquet: the staged parts joined into one file, a row group per part."""

    def final_meta(self) -> dict[str, Any] | None:
        if not self.output.exists():
            return None
        pq = _deps.parquet()
        try:
            meta = pq.read_schema(self.output).metadata or {}
        except Exception:  # anything unreadable is not ours
            raise self._foreign("is not a readable Parquet file") from None
        if META_KEY.encode() not in meta:
            raise self._foreign(f"has no {META_KEY!r} metadata")
        return json.loads(meta[META_KEY.encode()])

    def finalize(self, meta: dict[str, Any]) -> None:
        pq = _deps.parquet()
        parts = self._parts()
        tmp = self.staging / "output.parquet.tmp"
        record = {META_KEY: json.dumps(meta, sort_keys=True)}
        schema = (pq.read_schema(parts[0]) if parts else self._empty(meta).schema)
        schema = schema.with_metadata(record)
        with pq.ParquetWriter(tmp, schema, **self._options(meta)) as out:
            for part in parts:
                table = pq.read_table(part).replace_schema_metadata(record)
                out.write_table(table, row_group_size=max(1, table.num_rows))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.output)
        fsync_dir(self.output.parent)


class ParquetDirWriter(_ParquetParts):
    """OUTPUT/: the part files themselves (one per chunk) and _angle_rt_embed.json; with
    `rows_per_file`, the parts regrouped into files of that many rows at the end."""

    rows_per_file: int | None = None
    # the staging becomes OUTPUT/ by one rename: a state file left there by a run killed
    # right after it must be one that dataset readers skip ("_" and "." names)
    state_name = "_" + STATE

    def remove_final(self) -> None:
        remove_output_dir(self.output)
        for p in self.side_files():
            remove(p)

    def check_replaceable(self) -> None:
        if self.output.is_dir() and not (self.output / DIR_META).is_file() \
                and any(self.output.iterdir()):
            remove_output_dir(self.output)  # raises: not ours

    def final_meta(self) -> dict[str, Any] | None:
        if not self.output.exists() or (self.output.is_dir()
                                        and not any(self.output.iterdir())):
            return None
        record = self.output / DIR_META
        if not self.output.is_dir() or not record.is_file():
            raise self._foreign(f"has no {DIR_META}")
        for name in (self.state_name, STATE):  # left by a run killed after its final rename
            remove(self.output / name)
        return json.loads(record.read_text(encoding="utf-8"))

    def finalize(self, meta: dict[str, Any]) -> None:
        if self.rows_per_file:
            self._finalize_grouped(meta)
            return
        if not self._parts():  # an empty result is still a readable dataset
            _deps.parquet().write_table(self._empty(meta), self._part(0), **self._options(meta))
        atomic_write(self.staging / DIR_META, json.dumps(meta, indent=1).encode())
        # side files go beside the dataset, never into it (readers would take them for data)
        move_if_present(self.staging / SKIPPED,
                        self.output.with_name(self.output.name + ".skipped.jsonl"))
        os.replace(self.staging, self.output)
        fsync_dir(self.output.parent)
        for name in (self.state_name, STATE):
            remove(self.output / name)


    def _finalize_grouped(self, meta: dict[str, Any]) -> None:
        """Files of `rows_per_file` rows (the last shorter), written from the staged parts
        one part at a time into STAGING/final/, then renamed into place. The parts stay
        until then, so a run killed here redoes this step."""
        final = self.staging / "final"
        remove(final)
        final.mkdir()
        record = {META_KEY: json.dumps(meta, sort_keys=True)}
        parts = self._parts()
        tables = (_deps.parquet().read_table(p).replace_schema_metadata(record)
                  for p in parts) if parts else iter([self._empty(meta)])
        files = regroup(tables, self.rows_per_file or 1, Location.parse(final),
                        self._options(meta))
        for f in files:
            with open(f.path, "rb+") as fh:
                os.fsync(fh.fileno())
        atomic_write(final / DIR_META, json.dumps(meta, indent=1).encode())
        move_if_present(self.staging / SKIPPED,
                        self.output.with_name(self.output.name + ".skipped.jsonl"))
        if self.output.exists():  # this run's own output, from a run killed just after
            remove_output_dir(self.output)
        os.replace(final, self.output)
        fsync_dir(self.output.parent)


def regroup(tables: Any, rows: int, folder: Location,
            options: dict[str, Any]) -> list[Location]:
    """Write the rows of `tables` (in order) as part-NNNNNN.parquet files of `rows` rows."""
    pq = _deps.parquet()
    files: list[Location] = []
    out, room = None, 0
    for table in tables:
        while table.num_rows or out is None:
            if out is None:
                files.append(folder.child(f"part-{len(files):06d}.parquet"))
                out = pq.ParquetWriter(files[-1].path, table.schema,
                                       filesystem=files[-1].fs, **options)
                room = rows
            take = min(room, table.num_rows)
            if take:
                out.write_table(table.slice(0, take), row_group_size=take)
            table, room = table.slice(take), room - take
            if room == 0:
                out.close()
                out = None
            if not table.num_rows:
                break
    if out is not None:
        out.close()
    return files


class NpyWriter(Writer):
    """OUTPUT.npy (n, width) + OUTPUT.ids.jsonl + OUTPUT.json (the job record)."""

    def __init__(self, output: Path, id_name: str, id_type: Any = None) -> None:
        super().__init__(output, id_name, id_type)
        self._vectors = self.staging / "vectors.npy"
        self._ids = self.staging / "ids.jsonl"

    def side_files(self) -> list[Path]:
        name = self.output.name
        return [*super().side_files(), self.output.with_name(name + ".ids.jsonl"),
                self.output.with_name(name + ".json")]

    def final_meta(self) -> dict[str, Any] | None:
        record = self.output.with_name(self.output.name + ".json")
        if not self.output.exists():
            return None
        if not record.is_file():
            raise self._foreign(f"has no {record.name} beside it")
        return json.loads(record.read_text(encoding="utf-8"))

    def resume(self, rows: int, parts: int, extra: dict[str, Any]) -> None:
        if not extra:  # no chunk recorded: what is staged is a chunk killed mid-write
            remove(self._vectors)
            remove(self._ids)
            return
        if self._vectors.exists():  # absent once a finalize (then killed) moved it
            with open(self._vectors, "rb+") as fh:
                fh.truncate(_NPY_HEADER + rows * extra["row_bytes"])
        if self._ids.exists():
            with open(self._ids, "rb+") as fh:
                fh.truncate(extra["ids_bytes"])

    def write(self, ids: list[Any], vectors: np.ndarray, meta: dict[str, Any]) -> dict:
        if not self._vectors.exists():
            with open(self._vectors, "wb") as fh:
                fh.write(_npy_header((0, vectors.shape[1]), vectors.dtype))
            self._ids.touch()
        with open(self._vectors, "ab") as fh:
            fh.write(np.ascontiguousarray(vectors).tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        with open(self._ids, "ab") as fh:
            fh.write("".join(json.dumps(i, default=str) + "\n" for i in ids).encode())
            fh.flush()
            os.fsync(fh.fileno())
            ids_bytes = fh.tell()
        return {"row_bytes": vectors.shape[1] * vectors.dtype.itemsize, "ids_bytes": ids_bytes}

    def finalize(self, meta: dict[str, Any]) -> None:
        if not self._vectors.exists() and not self.output.exists():
            with open(self._vectors, "wb") as fh:
                fh.write(_npy_header((0, meta["width"]), np.dtype(meta["dtype"])))
            self._ids.touch()
        if self._vectors.exists():
            with open(self._vectors, "rb+") as fh:
                fh.write(_npy_header((meta["rows"], meta["width"]),
                                     np.dtype(meta["dtype"])))
                os.fsync(fh.fileno())
        move_if_present(self._ids, self.output.with_name(self.output.name + ".ids.jsonl"))
        move_if_present(self._vectors, self.output)
        atomic_write(self.output.with_name(self.output.name + ".json"),
                     json.dumps(meta, indent=1).encode())


def parquet_options(codec: str, id_name: str, output_dtype: str) -> dict[str, Any]:
    """pyarrow.parquet writer options for an output of `output_dtype` vectors."""
    opts: dict[str, Any] = {"compression": None if codec == "none" else codec,
                            "use_dictionary": [id_name], "write_statistics": [id_name]}
    leaf = f"{EMBEDDING}.list.element"
    if output_dtype in ("int8", "uint8"):
        # Parquet has no 8-bit physical type (INT32 holds each code); a dictionary of at
        # most 256 codes stores one byte a value before the codec: smaller than .npy
        opts["use_dictionary"] = [id_name, leaf]
    elif output_dtype == "float32":
        # sign/exponent bytes apart from mantissa bytes: zstd gains ~9% on vectors
        opts["use_byte_stream_split"] = [leaf]
    return opts


def vector_column(vectors: np.ndarray, output_dtype: str) -> Any:
    """The `embedding` column: fixed_size_list<float32|float16|int8|uint8>, or for packed
    sign bits (binary, ubinary) fixed_size_binary(width), one byte a byte."""
    pa = _deps.pyarrow()
    v = np.ascontiguousarray(vectors)
    if output_dtype.endswith("binary"):
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(v.shape[1]), len(v),
                                                    [None, pa.py_buffer(v.tobytes())])
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])


def column_vectors(column: Any, dtype: str | np.dtype) -> np.ndarray:
    """(n, width) numpy array of an `embedding` column as `vector_column` writes it (a
    ChunkedArray or Array); `dtype`: the job record's "dtype"."""
    pa = _deps.pyarrow()
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_fixed_size_binary(arr.type):
        width = arr.type.byte_width
        raw = np.frombuffer(arr.buffers()[1], dtype=np.dtype(dtype))
        return raw[arr.offset * width:(arr.offset + len(arr)) * width].reshape(-1, width)
    width = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def remove_output_dir(path: Path) -> None:
    """Remove an output directory, refusing one that holds files but no job record (a
    mistyped OUTPUT must not cost a user's folder, --overwrite or not)."""
    if path.is_dir() and not (path / DIR_META).is_file() and any(path.iterdir()):
        raise OutputExistsError(f"{path} is a directory not written by `angle-rt embed`; "
                                "not replacing it even with --overwrite: remove it yourself "
                                "or choose another OUTPUT")
    remove(path)


def _npy_header(shape: tuple[int, int], dtype: np.dtype) -> bytes:
    """A version 1.0 .npy header padded to a fixed size, so it can be rewritten in place."""
    text = repr({"descr": np.dtype(dtype).str, "fortran_order": False, "shape": tuple(shape)})
    text = text.ljust(_NPY_HEADER - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


def check_compression(codec: str) -> str:
    """`codec` if it is one of COMPRESSIONS, else ValueError listing them."""
    if codec not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got "
                         f"{codec!r}")
    return codec
