"""An output-directory lock so two runs never write the same output.

The lock is an exclusive `flock` on the lock file, held for the life of the run. The kernel drops
it when the process dies (even on SIGKILL), so a stale lock is simply a file nobody has flocked:
taking it over is the same atomic `flock` call, and racing takers cannot both win (the earlier
O_EXCL-create + pid check + unlink let two of three racers each believe they held it). The file
also holds the owner's pid and host, only for the message naming who holds it.

A releasing owner unlinks the file while still holding the flock, so a racer that opened the old
file just before may win the flock on an unlinked inode; after flocking, the inode of the open file
is compared with the one at the path, and a mismatch means start over. Release is idempotent and is
called on every exit path (context manager + atexit).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

from ..checkpoint.mobe_format import LOCK_NAME
from ..errors import MobeError

_ATTEMPTS = 100  # each retry means the file was just released and replaced: a handful is plenty


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # kill(0 or -1, ...) would address process groups
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def _owner(fd: int) -> dict | None:
    """The pid/host record in the lock file (None when empty, half-written or not ours)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class OutputLock:
    def __init__(self, out_dir: Path, warn: Callable[[str], None] = lambda msg: None):
        self.path = Path(out_dir) / LOCK_NAME
        self.warn = warn
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(_ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise MobeError(f"cannot create the output lock ({e.strerror or e})", self.path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _owner(fd)
                os.close(fd)
                alive = owner is not None and _pid_alive(int(owner.get("pid", -1)))
                who = f"process {owner.get('pid')} on {owner.get('host')}" if owner and alive else "another process"
                raise MobeError(f"output is locked by {who}; wait for it to finish or stop it", self.path) from None
            if not self._same_file(fd):  # released (and unlinked) between our open and our flock
                os.close(fd)
                continue
            owner = _owner(fd)
            if owner is not None and owner.get("pid") != me["pid"]:
                self.warn(f"{self.path}: taking over stale lock of process {owner.get('pid')} on "
                          f"{owner.get('host')} (no longer running)")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            self._fd, self.held = fd, True
            atexit.register(self.release)
            return self
        raise MobeError("could not take the output lock (it kept being replaced)", self.path)

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)

    def release(self) -> None:
        if self.held and self._fd is not None:
            try:
                if self._same_file(self._fd):
                    self.path.unlink(missing_ok=True)  # while still flocked: see the module docstring
            finally:
                os.close(self._fd)
                self._fd, self.held = None, False
                atexit.unregister(self.release)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
