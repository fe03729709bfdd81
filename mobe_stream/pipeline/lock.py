"""An output-directory lock so two runs never write the same output.

The lock is a file created with O_EXCL holding the owner's pid and host. A lock whose process is
gone (same host) is stale and is taken over with a warning. Release is idempotent and is called on
every exit path (context manager + atexit).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
from pathlib import Path
from typing import Callable

from ..checkpoint.mobe_format import LOCK_NAME
from ..errors import MobeError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    def __init__(self, out_dir: Path, warn: Callable[[str], None] = lambda msg: None):
        self.path = Path(out_dir) / LOCK_NAME
        self.warn = warn
        self.held = False

    def acquire(self) -> "OutputLock":
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read_owner()
                if owner is not None and owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                    self.warn(f"{self.path}: taking over stale lock of process {owner.get('pid')} (no longer running)")
                    self.path.unlink(missing_ok=True)
                    continue
                who = f"process {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
                raise MobeError(f"output is locked by {who}; if no run is active, delete the lock file", self.path)
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)
            return self
        raise MobeError("could not take the output lock", self.path)

    def _read_owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            owner = self._read_owner()
            if owner is None or owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
