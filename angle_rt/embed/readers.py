"""Input readers: Parquet (a file or a directory of files), JSONL, CSV, TXT → chunks of rows.

Each reader streams: memory is bounded by the chunk size, never the file. A row's id is the
`id_column` value, or its row number (0-based, counting every row of the input, bad ones
included). `chunks(size, skip)` starts at row `skip`, which is how a job resumes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from angle_rt.embed import _deps
from angle_rt.embed.errors import InputError
from angle_rt.embed.fs import Location

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".csv": "csv", ".txt": "txt"}
_PIECE = 1024  # rows a reader hands over at a time, before rechunking


@dataclass
class Chunk:
    """Consecutive input rows: `start` is the row number of the first."""

    start: int
    ids: list[Any]
    texts: list[Any]  # str, or whatever the input held (None, numbers, bytes …)


class Reader:
    """Base: subclasses yield (ids or None, texts) pieces from row `skip` on."""

    kind = ""
    row_rules = 0  # > 0: which rule for what is a row (in the fingerprint when set)

    def __init__(self, path: Location, text_column: str, id_column: str | None) -> None:
        self.path, self.text_column, self.id_column = path, text_column, id_column

    def files(self) -> list[Location]:
        return [self.path]

    def count_rows(self) -> int | None:
        """Rows in the input (for the progress bar; an estimate for CSV)."""
        return None

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input: its path, and each file's size and a sha256 of its
        first and last 64 KiB (a Parquet file's footer, with its row groups' statistics,
        is in the last). Content, not mtime: a copy that keeps the bytes resumes, an edit
        that keeps the size and mtime does not."""
        files = []
        for f in self.files():
            name = "." if f == self.path else f.relative(self.path)
            files.append([name, f.size(), head_tail_sha256(f)])
        fp = {"path": self.path.resolved(), "format": self.kind, "files": files}
        if self.row_rules:  # another rule numbers rows otherwise: no resume across it
            fp["row_rules"] = self.row_rules
        return fp

    def chunks(self, size: int, skip: int = 0) -> Iterator[Chunk]:
        """Chunks of `size` rows (the last may be shorter), from row `skip` on."""
        start, ids, texts = skip, [], []
        for piece_ids, piece_texts in self._pieces(skip):
            if piece_ids is None:
                first = start + len(texts)
                piece_ids = list(range(first, first + len(piece_texts)))
            ids.extend(piece_ids)
            texts.extend(piece_texts)
            while len(texts) >= size:
                yield Chunk(start, ids[:size], texts[:size])
                start += size
                ids, texts = ids[size:], texts[size:]
        if texts:
            yield Chunk(start, ids, texts)

    def _pieces(self, skip: int) -> Iterator[tuple[list[Any] | None, list[Any]]]:
        raise NotImplementedError

    def _missing(self, present: list[str], where: str) -> None:
        """InputError if the text or id column is not among `present`."""
        for flag, col in (("--text-column", self.text_column), ("--id-column", self.id_column)):
            if col is not None and col not in present:
                shown = ", ".join(map(repr, present[:50])) or "none"
                raise InputError(f"{where} has no column {col!r} ({flag}); its columns: {shown}")


class ParquetReader(Reader):
    """A Parquet file, or a directory of them read in sorted path order as one table."""

    kind = "parquet"

    def __init__(self, path: Location, text_column: str, id_column: str | None) -> None:
        super().__init__(path, text_column, id_column)
        pa, pq = _deps.pyarrow(), _deps.parquet()
        self._files = ([p for p in path.files() if p.name.endswith(".parquet")
                        and not _hidden(Path(p.relative(path)))]
                       if path.is_dir() else [path])
        if not self._files:
            raise InputError(f"{path} holds no .parquet files")
        self._meta = []
        for f in self._files:
            try:
                pf = pq.ParquetFile(f.parquet_source())
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"{f} is not a readable Parquet file ({exc})") from exc
            schema = pf.schema_arrow
            self._missing(schema.names, str(f))
            kind = schema.field(text_column).type
            if pa.types.is_dictionary(kind):  # dictionary-encoded strings read as strings
                kind = kind.value_type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                    or pa.types.is_string_view(kind)):
                raise InputError(f"{f}: column {text_column!r} is {kind}, not a string column "
                                 "(--text-column must name the text)")
            self._meta.append([pf.metadata.row_group(i).num_rows
                               for i in range(pf.metadata.num_row_groups)])
            pf.close()
        self.id_type = (pq.read_schema(self._files[0].parquet_source()).field(id_column).type
                        if id_column else None)

    def files(self) -> list[Location]:
        return list(self._files)

    def count_rows(self) -> int:
        return sum(sum(groups) for groups in self._meta)

    def _pieces(self, skip: int) -> Iterator[tuple[list[Any] | None, list[Any]]]:
        pq = _deps.parquet()
        # the id may be the text's own column: read it once (a column listed twice comes
        # back once)
        cols = [self.text_column] + ([self.id_column] if self.id_column
                                     and self.id_column != self.text_column else [])
        for f, groups in zip(self._files, self._meta, strict=True):
            todo = []
            for i, n in enumerate(groups):
                if not todo and skip >= n:  # whole groups before the first row wanted
                    skip -= n
                else:
                    todo.append(i)
            if not todo:
                continue
            with pq.ParquetFile(f.parquet_source()) as pf:
                for batch in self._batches(pf, todo, cols):
                    if skip:
                        cut = min(skip, batch.num_rows)
                        batch, skip = batch.slice(cut), skip - cut
                    if batch.num_rows:
                        texts = batch.column(0).to_pylist()
                        yield (batch.column(len(cols) - 1).to_pylist() if self.id_column
                               else None), texts


    @staticmethod
    def _batches(pf: Any, groups: list[int], cols: list[str]) -> Iterator[Any]:
        # One iter_batches per row group: over many groups at once, pyarrow (26) keeps
        # ~30 bytes a row allocated until the iterator ends (31 MB at 1M rows).
        for g in groups:
            yield from pf.iter_batches(batch_size=_PIECE, row_groups=[g], columns=cols)


# JSONL records a column check reads before it calls a column missing
_COLUMN_PROBE = 1000


class JsonlReader(Reader):
    """JSON Lines: one object per line; blank lines are not rows. A line that is not a JSON
    object is a bad row (skipped with --on-bad-row skip, else the job stops naming it)."""

    kind = "jsonl"

    def __init__(self, path: Location, text_column: str, id_column: str | None) -> None:
        super().__init__(path, text_column, id_column)
        self._check_columns()
        self.id_type = None

    def _check_columns(self) -> None:
        """A column that none of the first good records has is a wrong flag (refused here);
        one that only some lack makes those bad rows (the first record alone decided, so
        one bad first row refused the file even with --on-bad-row skip). No good record
        at all: the first line's error (the file is not JSON Lines)."""
        wanted = {c for c in (self.text_column, self.id_column) if c is not None}
        first_error, first, seen = None, None, set()
        columns: dict[str, None] = {}  # every record's, in order of first appearance
        good = 0
        for lineno, line in self._lines():
            try:
                rec = self._parse(line, lineno)
            except InputError as exc:
                first_error = first_error or exc
                continue
            first = first or lineno
            columns.update(dict.fromkeys(list(rec)[:50]))
            seen |= wanted & rec.keys()
            good += 1
            if seen == wanted or good == _COLUMN_PROBE:
                break
        if not good:
            if first_error is not None:
                raise first_error
            return
        where = (f"{self.path} (first record, line {first})" if good == 1
                 else f"{self.path} (any of its first {good} records)")
        self._missing(list(columns), where)

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        with self.path.open_read() as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield lineno, line

    def _parse(self, line: bytes, lineno: int) -> dict[str, Any]:
        try:
            rec = json.loads(line)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise InputError(f"{self.path}:{lineno} is not valid JSON ({exc})") from exc
        if not isinstance(rec, dict):
            raise InputError(f"{self.path}:{lineno} is a JSON {type(rec).__name__}, not an "
                             "object with a text field")
        return rec

    def count_rows(self) -> int:
        return sum(1 for _ in self._lines())

    def _pieces(self, skip: int) -> Iterator[tuple[list[Any] | None, list[Any]]]:
        ids: list[Any] = []
        texts: list[Any] = []
        for row, (lineno, line) in enumerate(self._lines()):
            if row < skip:
                continue
            try:
                rec = self._parse(line, lineno)
            except InputError as exc:
                rec = {self.text_column: BadRow(str(exc))}
            texts.append(rec.get(self.text_column))
            if self.id_column:
                ids.append(rec.get(self.id_column))
            if len(texts) == _PIECE:
                yield (ids if self.id_column else None), texts
                ids, texts = [], []
        if texts:
            yield (ids if self.id_column else None), texts


class CsvReader(Reader):
    """CSV with a header row; every value is a str (ids too); a short row's text is null."""

    kind = "csv"
    row_rules = 2  # 2: blank lines are no rows (they were null rows, counted)

    def __init__(self, path: Location, text_column: str, id_column: str | None) -> None:
        super().__init__(path, text_column, id_column)
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents exceed the 128 KB default
        with self._open() as fh:
            header = next(csv.reader(fh), None)
        if header is None:
            raise InputError(f"{path} is empty: a CSV needs a header row naming its columns")
        self._missing(header, str(path))
        self._width = len(header)
        self._text_at = header.index(text_column)
        self._id_at = header.index(id_column) if id_column else None
        self.id_type = None

    def _open(self) -> TextIO:
        # utf-8-sig: a byte-order mark is not part of the first column's name; bytes that are
        # not UTF-8 become lone surrogates, i.e. a bad row wherever they are
        return io.TextIOWrapper(self.path.open_read(), encoding="utf-8-sig",
                                errors="surrogateescape", newline="")

    def count_rows(self) -> int:
        with self.path.open_read() as fh:
            return max(0, sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20),
                                                                    b"")) - 1)

    def _pieces(self, skip: int) -> Iterator[tuple[list[Any] | None, list[Any]]]:
        ids: list[Any] = []
        texts: list[Any] = []
        with self._open() as fh:
            # strict: an unterminated quote is an error (else every later row ended up
            # inside one text, and the rows after it were silently gone)
            rows = csv.reader(fh, strict=True)
            next(rows)
            try:
                for row_no, row in enumerate(r for r in rows if r):  # a blank line: no row
                    if row_no < skip:
                        continue
                    rid, text = self._fields(row)
                    texts.append(text)
                    if self._id_at is not None:
                        ids.append(rid)
                    if len(texts) == _PIECE:
                        yield (ids if self._id_at is not None else None), texts
                        ids, texts = [], []
            except (csv.Error, UnicodeDecodeError) as exc:
                raise InputError(f"{self.path}: unreadable CSV near line {rows.line_num} "
                                 f"({exc})") from exc
        if texts:
            yield (ids if self._id_at is not None else None), texts


    def _fields(self, row: list[str]) -> tuple[Any, Any]:
        """(id, text) of a CSV row; the text a BadRow where the row cannot be trusted: a
        column count other than the header's (an unquoted comma would cut the text short)
        or an id that is not UTF-8 (it could not be written as the input has it)."""
        rid = row[self._id_at] if self._id_at is not None and self._id_at < len(row) else None
        if len(row) != self._width:
            return rid, BadRow(f"CSV row has {len(row)} columns, the header {self._width}")
        if rid is not None and bad_reason(rid) is not None:
            return rid, BadRow("id is not valid UTF-8")
        return rid, row[self._text_at]


class TxtReader(Reader):
    """One text per line (a final newline does not start another); ids are line numbers
    from 0. A line that is not valid UTF-8 is a bad row."""

    kind = "txt"

    def __init__(self, path: Location, text_column: str, id_column: str | None) -> None:
        if id_column:
            raise InputError(f"{path} is plain text (one text per line): it has no columns, "
                             "so --id-column does not apply; ids are line numbers from 0")
        super().__init__(path, text_column, None)
        self.id_type = None

    def count_rows(self) -> int:
        n, last = 0, b"\n"
        with self.path.open_read() as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                n, last = n + block.count(b"\n"), block[-1:]
        return n + (last != b"\n")

    def _pieces(self, skip: int) -> Iterator[tuple[list[Any] | None, list[Any]]]:
        texts: list[Any] = []
        with self.path.open_read() as fh:
            for row, line in enumerate(fh):
                if row < skip:
                    continue
                line = line[:-1] if line.endswith(b"\n") else line
                line = line[:-1] if line.endswith(b"\r") else line
                try:
                    texts.append(line.decode("utf-8"))
                except UnicodeDecodeError:
                    texts.append(line)  # bytes: reported as a bad row
                if len(texts) == _PIECE:
                    yield None, texts
                    texts = []
        if texts:
            yield None, texts


_READERS: dict[str, type[Reader]] = {"parquet": ParquetReader, "jsonl": JsonlReader,
                                      "csv": CsvReader, "txt": TxtReader}


def input_format(path: str | Path | Location) -> str:
    """'parquet', 'jsonl', 'csv' or 'txt' from the suffix (a directory: Parquet files)."""
    path = Location.parse(path)
    if path.is_dir():
        return "parquet"
    if not path.exists():
        raise InputError(f"{path} does not exist")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: unknown input format {path.suffix!r}; give a "
                         f"{', '.join(FORMATS)} file or a directory of Parquet files")
    return kind


def open_input(path: str | Path | Location, text_column: str = "text",
               id_column: str | None = None) -> Reader:
    """The reader for `path` (a local path or a URI, see angle_rt.embed.fs), its columns
    checked (a missing one names those present)."""
    path = Location.parse(path)
    return _READERS[input_format(path)](path, text_column, id_column)


def head_tail_sha256(path: Location, block: int = 1 << 16) -> str:
    """sha256 of a file's first and last `block` bytes (the whole file when smaller)."""
    digest = hashlib.sha256()
    with Location.parse(path).open_read() as fh:
        digest.update(fh.read(block))
        size = fh.seek(0, 2)
        if size > block:
            fh.seek(max(block, size - block))
            digest.update(fh.read(block))
    return digest.hexdigest()


class BadRow(str):
    """A row the reader could not parse (a malformed JSON line): its text is this, and
    `bad_reason` gives the reader's message."""

    __slots__ = ()


def _hidden(relative: Path) -> bool:
    """A path under a dataset directory that readers skip: any part starting with '.' or
    '_' (`_temporary/`, `.spark-staging/`, `_SUCCESS`), as pyarrow and Spark do."""
    return any(part.startswith((".", "_")) for part in relative.parts)


def bad_reason(text: Any) -> str | None:
    """Why `text` cannot be embedded, or None if it can.

    >>> bad_reason("ok"), bad_reason(None), bad_reason(3), bad_reason("\\ud800")
    (None, 'null text', 'text is int, not str', 'text is not valid Unicode (lone surrogate)')
    """
    if isinstance(text, BadRow):
        return str(text)
    if isinstance(text, str):
        if text.isascii():
            return None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "text is not valid Unicode (lone surrogate)"
        return None
    if text is None:
        return "null text"
    if isinstance(text, bytes):
        return "text is not valid UTF-8"
    return f"text is {type(text).__name__}, not str"
