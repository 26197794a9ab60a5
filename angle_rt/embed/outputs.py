"""Which writer an OUTPUT gets: .parquet, .npy or a Parquet directory, local or remote.

Kept apart from `writers` so that the remote writer (built on `writers`) and the local
ones are chosen in one place without an import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from angle_rt.embed import _deps
from angle_rt.embed.fs import Location
from angle_rt.embed.remote import RemoteParquetWriter
from angle_rt.embed.writers import (
    DEFAULT_COMPRESSION,
    NpyWriter,
    ParquetDirWriter,
    ParquetFileWriter,
    Writer,
    check_compression,
)


def _check_rows_per_file(rows_per_file: int | None, suffix: str, name: str) -> None:
    if rows_per_file is not None and (suffix or isinstance(rows_per_file, bool)
                                      or not isinstance(rows_per_file, int)
                                      or rows_per_file < 1):
        raise ValueError("--rows-per-file takes a positive int and applies to a directory "
                         f"OUTPUT (no suffix), got {rows_per_file!r} for {name}")


def _remote_writer(output: Location, id_name: str, id_type: Any, compression: str | None,
                   rows_per_file: int | None) -> Writer:
    """Parquet output on a pyarrow FileSystem (see angle_rt.embed.remote)."""
    suffix = output.suffix.lower()
    if suffix not in (".parquet", ""):
        raise ValueError(f"{output}: remote output is Parquet, a .parquet file or a "
                         f"directory (a path without a suffix), not {suffix!r}; write .npy "
                         "to a local path")
    _check_rows_per_file(rows_per_file, suffix, output.name)
    writer = RemoteParquetWriter(output, id_name, id_type, single_file=bool(suffix))
    writer.compression = check_compression(compression or DEFAULT_COMPRESSION)
    writer.rows_per_file = rows_per_file
    return writer




def open_writer(output: str | Path, id_name: str, id_type: Any = None,
                compression: str | None = None, rows_per_file: int | None = None) -> Writer:
    """The writer for OUTPUT's suffix: .parquet, .npy, or none (a directory of Parquet);
    OUTPUT a local path or a URI (angle_rt.embed.fs; Parquet only);
    `compression`: the Parquet codec (COMPRESSIONS; None: DEFAULT_COMPRESSION);
    `rows_per_file`: a directory output's file size in rows (None: one file per chunk)."""
    where = Location.parse(output)
    if not where.local:
        return _remote_writer(where, id_name, id_type, compression, rows_per_file)
    output = Path(where.path)
    suffix = output.suffix.lower()
    _check_rows_per_file(rows_per_file, suffix, output.name)
    if compression is not None:
        check_compression(compression)
    if suffix == ".npy":
        if compression is not None:
            raise ValueError("--compression applies to Parquet output, not .npy")
        return NpyWriter(output, id_name, id_type)
    if suffix in (".parquet", ""):
        _deps.parquet()  # fail before any work without pyarrow
        cls = ParquetFileWriter if suffix else ParquetDirWriter
        writer = cls(output, id_name, id_type)
        writer.compression = compression or DEFAULT_COMPRESSION
        if rows_per_file is not None:
            writer.rows_per_file = rows_per_file
        return writer
    raise ValueError(f"{output}: unknown output format {suffix!r}; write a .parquet file, "
                     "a .npy array, or a directory (a path without a suffix)")
