"""One run per OUTPUT: an advisory lock on ``OUTPUT.lock`` beside it.

`flock` is held by the open file, so the kernel drops it when the holder dies (kill -9
included): a lock file left by a dead run is simply taken over. The file names its holder
(pid, host, start) for the refusal message. Unlinking it at the end races with a run that
opened it meanwhile, so a run that gets the lock checks that the path still names the file
it locked, and tries again if not.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from angle_rt.embed.errors import OutputLockedError


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold OUTPUT's lock for the block; OutputLockedError (exit 2) naming the holder when
    another live run holds it."""
    import fcntl  # POSIX; imported here so that angle_rt imports anywhere

    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
            os.close(fd)
            raise OutputLockedError(
                f"{output} is being written by another run ({_describe(holder)}; lock "
                f"{path}); wait for it to finish, or stop it and rerun to resume") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the file was unlinked by the run that just finished: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        os.fsync(fd)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: see the module docstring
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
