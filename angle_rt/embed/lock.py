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
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from angle_rt.embed.errors import OutputLockedError


def lock_output(output: Any) -> Any:
    """The lock for OUTPUT (an angle_rt.embed.fs.Location): flock locally, else a lease."""
    return output_lock(Path(output.path)) if output.local else lease_lock(output)


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


# -- remote OUTPUT (pyarrow.fs): a lease object ------------------------------------------
# Object stores have no flock and pyarrow.fs no create-if-absent, so the lock is a lease:
# OUTPUT.lock names its holder and an expiry the holder pushes forward every
# LEASE_SECONDS / 4. A run writes its lease, waits LEASE_SETTLE, and reads it back: of two
# runs that start together, the one whose lease was written last goes on and the other
# refuses. A lease whose holder died lapses after LEASE_SECONDS and is taken over. Hosts'
# clocks must agree to well within LEASE_SECONDS.
LEASE_SECONDS = 300.0
LEASE_SETTLE = 1.0


@contextmanager
def lease_lock(output: Any) -> Iterator[None]:
    """Hold a remote OUTPUT (an angle_rt.embed.fs.Location) for the block; OutputLockedError
    naming the holder while another run's lease is live."""
    path = output.sibling(".lock")
    held = _read_lease(path)
    if held is not None and held.get("expires", 0) > time.time():
        raise _locked(output, path, held)
    token = uuid.uuid4().hex
    _write_lease(path, token)
    time.sleep(LEASE_SETTLE)
    held = _read_lease(path)
    if held is None or held.get("token") != token:
        raise _locked(output, path, held or {})
    stop = threading.Event()
    beat = threading.Thread(target=_renew, args=(path, token, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        held = _read_lease(path)
        if held is not None and held.get("token") == token:
            path.remove()


def _renew(path: Any, token: str, stop: threading.Event) -> None:
    while not stop.wait(LEASE_SECONDS / 4):
        try:
            _write_lease(path, token)
        except OSError:  # a store hiccup: the next beat tries again, well within the lease
            continue


def _write_lease(path: Any, token: str) -> None:
    path.write_bytes(json.dumps({
        "token": token, "pid": os.getpid(), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "expires": time.time() + LEASE_SECONDS}).encode())


def _read_lease(path: Any) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):  # absent, or not ours to read: treated as free
        return None


def _locked(output: Any, path: Any, held: dict[str, Any]) -> OutputLockedError:
    left = max(0, int(held.get("expires", time.time()) - time.time()))
    return OutputLockedError(
        f"{output} is being written by another run ({_describe(json.dumps(held))}; lease "
        f"{path}, lapses in {left} s unless renewed); wait for it to finish, or stop it "
        "and rerun once the lease lapses to resume")
