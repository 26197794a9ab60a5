"""Where the file job reads and writes: a local path, or a URI that `pyarrow.fs` resolves
(``s3://bucket/key``, ``gs://``, ``hdfs://``, ``file://``).

A `Location` is one file or folder on one filesystem. Local paths keep the builtin file API
(the writers fsync and rename there); remote ones go through the pyarrow FileSystem, whose
credentials and endpoint come from the usual environment (AWS_ACCESS_KEY_ID, AWS_REGION,
AWS_ENDPOINT_URL for an S3-compatible server, GOOGLE_APPLICATION_CREDENTIALS, …) or from the
URI's query (``s3://bucket/key?endpoint_override=host:port&scheme=http``).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path
from typing import Any, BinaryIO

from angle_rt.embed import _deps

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# stores where a file written through an output stream appears whole when the stream closes
# (a multipart or resumable upload), so a write needs no temporary name and rename
_ATOMIC_PUT = ("S3FileSystem", "GcsFileSystem")


def is_uri(target: str | Path) -> bool:
    return isinstance(target, str) and bool(_URI.match(target))


class Location:
    """A file or folder: `fs` None for the local filesystem (then `path` is a local path),
    else a pyarrow FileSystem and the path inside it; `uri` is how it is shown."""

    def __init__(self, fs: Any, path: str, uri: str) -> None:
        self.fs, self.path, self.uri = fs, path, uri

    @classmethod
    def parse(cls, target: str | Path) -> Location:
        """A local path (``file://`` included) or a URI pyarrow.fs resolves."""
        if isinstance(target, Location):
            return target
        if not is_uri(target):
            return cls(None, str(target), str(target))
        if str(target).startswith("file://"):
            path = str(target)[len("file://"):]
            return cls(None, path, path)
        pafs = _deps.need("pyarrow.fs", "remote paths")
        try:
            fs, path = pafs.FileSystem.from_uri(str(target))
        except (ValueError, OSError) as exc:
            raise ValueError(f"{target}: not a path pyarrow.fs can open ({exc})") from exc
        return cls(fs, path.rstrip("/"), str(target).split("?")[0].rstrip("/"))

    # -- names ---------------------------------------------------------------------------
    @property
    def local(self) -> bool:
        return self.fs is None

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    def child(self, name: str) -> Location:
        return Location(self.fs, f"{self.path}/{name}", f"{self.uri}/{name}")

    def sibling(self, extra: str) -> Location:
        """The path with `extra` appended to its name (``OUTPUT.partial``, ``.lock``)."""
        return Location(self.fs, self.path + extra, self.uri + extra)

    def resolved(self) -> str:
        """An absolute name for fingerprints."""
        return str(Path(self.path).resolve()) if self.local else self.uri

    def relative(self, root: Location) -> str:
        return self.path[len(root.path):].lstrip("/") or "."

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.fs, self.path) == (other.fs, other.path)

    def __hash__(self) -> int:
        return hash(self.path)

    # -- queries -------------------------------------------------------------------------
    def _info(self) -> Any:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        if self.local:
            return Path(self.path).exists()
        return self._info().type.name != "NotFound"

    def is_dir(self) -> bool:
        if self.local:
            return Path(self.path).is_dir()
        return self._info().type.name == "Directory"

    def is_file(self) -> bool:
        if self.local:
            return Path(self.path).is_file()
        return self._info().type.name == "File"

    def size(self) -> int:
        return Path(self.path).stat().st_size if self.local else self._info().size

    def files(self) -> list[Location]:
        """Every file under this folder, recursively, sorted by path."""
        if self.local:
            root = Path(self.path)
            return [Location(None, str(p), str(p))
                    for p in sorted(root.rglob("*")) if p.is_file()]
        pafs = _deps.need("pyarrow.fs", "remote paths")
        sel = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        out = [i.path for i in self.fs.get_file_info(sel) if i.type.name == "File"]
        return [Location(self.fs, p, f"{self.uri}/{p[len(self.path):].lstrip('/')}")
                for p in sorted(out)]

    def is_empty_dir(self) -> bool:
        return self.is_dir() and not self.files()

    # -- reading -------------------------------------------------------------------------
    def open_read(self) -> BinaryIO:
        """A buffered binary reader (seekable, iterates lines)."""
        if self.local:
            return open(self.path, "rb")
        return io.BufferedReader(self.fs.open_input_file(self.path), 1 << 20)

    def parquet_source(self) -> Any:
        """What pyarrow.parquet opens: the local path, or a random-access remote file."""
        return self.path if self.local else self.fs.open_input_file(self.path)

    def read_bytes(self) -> bytes:
        with self.open_read() as fh:
            return fh.read()

    # -- writing -------------------------------------------------------------------------
    def mkdir(self) -> None:
        if self.local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
        else:
            self.fs.create_dir(self.path, recursive=True)

    def write_bytes(self, data: bytes) -> None:
        """Put `data` whole: the file holds the old bytes or the new, never a part."""
        if self.local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(Path(self.path), data)
            return
        with self.open_write() as fh:
            fh.write(data)
        self.commit_write()

    def open_write(self) -> Any:
        """An output stream; call `commit_write` after closing it. On an object store the
        file appears whole when the stream closes; elsewhere it is written under a
        temporary name that `commit_write` renames."""
        if self.local or self._atomic_put():
            return self.fs.open_output_stream(self.path) if not self.local \
                else open(self.path, "wb")
        return self.fs.open_output_stream(self.path + ".tmp")

    def commit_write(self) -> None:
        if not self.local and not self._atomic_put():
            self.fs.move(self.path + ".tmp", self.path)

    def _atomic_put(self) -> bool:
        return type(self.fs).__name__ in _ATOMIC_PUT

    def remove(self) -> None:
        """Delete the file or folder (recursively); nothing if absent."""
        if self.local:
            p = Path(self.path)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
            return
        info = self._info()
        if info.type.name == "Directory":
            self.fs.delete_dir(self.path)
        elif info.type.name == "File":
            self.fs.delete_file(self.path)

    def copy_to(self, dst: Location) -> None:
        if self.local:
            shutil.copyfile(self.path, dst.path)
        else:
            self.fs.copy_file(self.path, dst.path)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` durably: a temporary file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
